// The attack registry and suites (SPEC §3): each run attacks only the samples no
// earlier run broke, and success is always judged on the whole float32 model.
//   standard: APGD-CE, APGD-T (targeted DLR, the `targets` highest other classes),
//             FMN (min-norm; broken when its radius <= ε), the MoE-aware runs (APGD on
//             each route-aware / member objective), Square (5,000 queries);
//   fast:     APGD-CE, APGD-T;
//   pgd:      PGD as `--steps/--restarts/--loss` say (moecert's former attack).
#include <torch/torch.h>

#include <chrono>
#include <map>

#include "moecert/attack_suite.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/runtime.h"

namespace moecert {

Suite suite_parse(const std::string& s) {
  if (s == "standard") return Suite::standard;
  if (s == "fast") return Suite::fast;
  if (s == "pgd") return Suite::pgd;
  throw ConfigError::invalid("--suite", s, "standard | fast | pgd");
}

std::string suite_name(Suite s) {
  switch (s) {
    case Suite::standard:
      return "standard";
    case Suite::fast:
      return "fast";
    case Suite::pgd:
      return "pgd";
  }
  return "?";
}

namespace {

/// What one run of an attack sees: the still-robust samples of a batch.
struct Problem {
  LogProbFn f;  ///< the whole model (differentiable)
  const AttackBall& ball;
  const torch::Tensor& y;
  const RowSampler& sampler;
  const SuiteConfig& cfg;
  const AwareObjective* aware = nullptr;  ///< the objective of a MoE-aware run
  /// The target restricted to some of these rows, for the component targets: they
  /// hold per-sample state (RA-E the clean routing, RA-R the clean experts' input), so
  /// their f takes these rows alone, and an attack that narrows its samples calls
  /// this instead. Empty for the whole model, whose f takes any rows.
  std::function<LogProbFn(const torch::Tensor& rows)> on_rows;
};

/// One attack of the registry.
class Attack {
 public:
  virtual ~Attack() = default;
  virtual AttackFound run(const Problem& p) const = 0;
};

class ApgdCe final : public Attack {
  AttackFound run(const Problem& p) const override {
    auto y = p.y;
    auto f = p.f;
    return attack_apgd([f, y](const torch::Tensor& x) { return loss_ce(f(x), y); }, p.f, p.ball,
                       p.y, p.sampler, p.cfg.apgd_steps, 1);
  }
};

/// APGD-T: one run per target class, the classes by decreasing clean logit (the label
/// excluded), each on the samples the earlier targets left robust.
class ApgdT final : public Attack {
  AttackFound run(const Problem& p) const override {
    torch::Tensor order;
    {
      torch::NoGradGuard ng;
      auto lp = p.f(p.ball.x).scatter(1, p.y.unsqueeze(1), -std::numeric_limits<float>::infinity());
      order = std::get<1>(lp.sort(1, /*descending=*/true));
    }
    const int64_t targets = std::min<int64_t>(p.cfg.targets, order.size(1) - 1);
    AttackFound out{p.ball.x.clone(),
                    torch::zeros({p.ball.x.size(0)}, torch::kBool).to(p.ball.x.device())};
    for (int64_t t = 0; t < targets; ++t) {
      auto rows = (~out.success).nonzero().flatten();
      if (rows.numel() == 0) break;
      auto ball = p.ball.subset(rows);
      auto y = p.y.index_select(0, rows), target = order.select(1, t).index_select(0, rows);
      auto f = p.on_rows && rows.numel() < p.ball.x.size(0) ? p.on_rows(rows) : p.f;
      auto r = attack_apgd(
          [f, y, target](const torch::Tensor& x) { return loss_dlr_targeted(f(x), y, target); }, f,
          ball, y, p.sampler.subset(rows), p.cfg.apgd_steps, 100 + static_cast<uint64_t>(t));
      out.x_adv.index_copy_(0, rows, r.x_adv);
      out.success.index_copy_(0, rows, r.success);
    }
    return out;
  }
};

class MinNorm final : public Attack {
  AttackFound run(const Problem& p) const override {
    auto r =
        attack_min_norm(p.f, p.f, p.ball.x, p.y, p.ball.norm, p.ball.box, p.cfg.min_norm_steps);
    return {r.x_adv, r.radius.le(p.ball.eps.to(torch::kFloat64)).to(p.ball.x.device())};
  }
};

class Square final : public Attack {
  AttackFound run(const Problem& p) const override {
    return attack_square(p.f, p.ball, p.y, p.sampler, p.cfg.square_queries, 200, p.on_rows);
  }
};

class Aware final : public Attack {
  AttackFound run(const Problem& p) const override {
    return attack_apgd(p.aware->f, p.f, p.ball, p.y, p.sampler, p.cfg.apgd_steps, 300);
  }
};

class Pgd final : public Attack {
  AttackFound run(const Problem& p) const override {
    PgdConfig c = p.cfg.pgd;
    c.norm = p.ball.norm, c.box = p.ball.box, c.eps = p.cfg.eps;
    auto xa = attack_pgd(p.f, p.ball.x, p.y, c);
    torch::NoGradGuard ng;
    return {xa, p.f(xa).argmax(1).ne(p.y)};
  }
};

const Attack& attack_for(const std::string& name) {
  static const std::map<std::string, std::shared_ptr<Attack>> registry = {
      {"apgd-ce", std::make_shared<ApgdCe>()}, {"apgd-t", std::make_shared<ApgdT>()},
      {"fmn", std::make_shared<MinNorm>()},    {"square", std::make_shared<Square>()},
      {"aware", std::make_shared<Aware>()},    {"pgd", std::make_shared<Pgd>()}};
  auto it = registry.find(name);
  if (it == registry.end())
    throw Error(ExitCode::internal, "attack suite: no attack '" + name + "' registered");
  return *it->second;
}

/// The runs of a suite; "aware" stands for one run per MoE-aware objective.
std::vector<std::string> suite_runs(Suite s) {
  switch (s) {
    case Suite::standard:
      return {"apgd-ce", "apgd-t", "fmn", "aware", "square"};
    case Suite::fast:
      return {"apgd-ce", "apgd-t"};
    case Suite::pgd:
      return {"pgd"};
  }
  return {};
}

/// Restores a module's training flag on scope exit.
class EvalMode {
 public:
  explicit EvalMode(torch::nn::Module& m) : m_(m), was_(m.is_training()) { m_.eval(); }
  ~EvalMode() {
    if (was_) m_.train();
  }
  EvalMode(const EvalMode&) = delete;
  EvalMode& operator=(const EvalMode&) = delete;

 private:
  torch::nn::Module& m_;
  bool was_;
};

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

SuiteResult attack_suite(const AttackSubject& subject, const Dataset& data, const SuiteConfig& cfg,
                         int64_t batch_size, torch::Device device, bool progress) {
  if (!(cfg.eps >= 0)) throw ConfigError::invalid("--eps", std::to_string(cfg.eps), ">= 0");
  if (batch_size < 1)
    throw ConfigError::invalid("--batch-size", std::to_string(batch_size), ">= 1");
  if (cfg.apgd_steps < 1)
    throw ConfigError::invalid("--apgd-steps", std::to_string(cfg.apgd_steps), ">= 1");
  if (cfg.square_queries < 1)
    throw ConfigError::invalid("--square-queries", std::to_string(cfg.square_queries), ">= 1");
  if (cfg.targets < 1) throw ConfigError::invalid("--targets", std::to_string(cfg.targets), ">= 1");
  EvalMode eval(*subject.module);
  FrozenParameters frozen(*subject.module);
  SuiteResult res;
  res.samples = data.size();
  res.rows.resize(static_cast<size_t>(data.size()));
  std::vector<torch::Tensor> adv;
  Progress meter("attack " + suite_name(cfg.suite), data.size(), progress);
  std::map<std::string, size_t> run_index;
  auto count_run = [&](const std::string& name, int64_t broke, double s) {
    auto it = run_index.find(name);
    if (it == run_index.end()) {
      it = run_index.emplace(name, res.runs.size()).first;
      res.runs.push_back(name), res.broken.push_back(0), res.run_seconds.push_back(0);
    }
    res.broken[it->second] += broke, res.run_seconds[it->second] += s;
  };
  int64_t sa = 0, ra = 0, ra_e = 0, ra_r = 0;
  if (subject.route) {
    res.usage.clean.assign(static_cast<size_t>(subject.experts), 0);
    res.usage.adversarial.assign(static_cast<size_t>(subject.experts), 0);
  }
  for (int64_t start = 0; start < data.size(); start += batch_size) {
    const int64_t n = std::min(batch_size, data.size() - start);
    auto idx = torch::arange(start, start + n, torch::kLong);
    auto x = data.batch_images(idx).to(device);
    auto y = data.batch_labels(idx).to(device);
    // Seeded by each sample's index in its split: a shard (`attack --shard`) draws
    // what the unsharded run draws for the same image.
    std::vector<uint64_t> seeds;
    for (int64_t i = 0; i < n; ++i)
      seeds.push_back(cfg.seed * 1000003ULL + static_cast<uint64_t>(data.source_index(start + i)));
    const RowSampler sampler(seeds);
    auto f = subject.target(AttackTarget::whole, x);
    torch::Tensor correct;
    {
      torch::NoGradGuard ng;
      correct = f(x).argmax(1).eq(y);
    }
    auto correct_cpu = correct.cpu();
    const AttackBall whole_ball{x, torch::full({n}, cfg.eps, x.options()), cfg.norm, cfg.box};
    // The runs of `runs` against target t on the samples still robust; returns the
    // robust mask, and (for t = whole) fills x_adv and broken_by.
    torch::Tensor x_adv = x.clone(), x_first = x.clone();
    bool first_run = true;
    std::vector<std::string> broken_by(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      if (!correct_cpu[i].item<bool>()) broken_by[static_cast<size_t>(i)] = "clean";
    auto attack_target = [&](AttackTarget t, const std::vector<std::string>& runs) {
      const bool whole = t == AttackTarget::whole;
      torch::Tensor robust;
      {
        torch::NoGradGuard ng;
        robust = whole ? correct.clone() : subject.target(t, x)(x).argmax(1).eq(y);
      }
      auto attempt = [&](const std::string& run, const std::string& label,
                         const AwareObjective* aware) {
        auto rows = robust.nonzero().flatten();
        if (rows.numel() == 0) return;
        const auto t0 = std::chrono::steady_clock::now();
        auto ball = whole_ball.subset(rows);
        auto ys = y.index_select(0, rows);
        auto sub = sampler.subset(rows);
        auto fr = subject.target(t, ball.x);
        std::vector<AwareObjective> rebuilt;
        const AwareObjective* obj = nullptr;
        if (aware) {  // the objective for these samples' labels
          rebuilt = subject.aware(ys);
          for (const auto& o : rebuilt)
            if (o.name == aware->name) obj = &o;
        }
        std::function<LogProbFn(const torch::Tensor&)> on_rows;
        if (!whole)
          on_rows = [&subject, t, bx = ball.x](const torch::Tensor& r) {
            return subject.target(t, bx.index_select(0, r));
          };
        auto found = attack_for(run).run({fr, ball, ys, sub, cfg, obj, on_rows});
        if (whole && first_run)
          x_first.index_copy_(0, rows, found.x_adv.detach()), first_run = false;
        // Count only what the judge confirms inside the ball (the float32 model at a
        // point of the set).
        torch::NoGradGuard ng;
        auto inside = ball.distance(found.x_adv).le(ball.eps * (1 + 1e-6) + 1e-7);
        auto wrong = fr(found.x_adv).argmax(1).ne(ys) & inside;
        auto hit = rows.masked_select(wrong);
        robust.index_fill_(0, hit, false);
        if (!whole) return;
        x_adv.index_copy_(0, hit, found.x_adv.index_select(0, wrong.nonzero().flatten()));
        auto hit_cpu = hit.cpu();
        for (int64_t i = 0; i < hit_cpu.size(0); ++i)
          broken_by[static_cast<size_t>(hit_cpu[i].item<int64_t>())] = label;
        count_run(label, hit.numel(), seconds_since(t0));
      };
      for (const auto& run : runs) {
        if (run != "aware") {
          attempt(run, run, nullptr);
          continue;
        }
        if (!cfg.aware || !subject.aware) continue;
        for (const auto& o : subject.aware(y)) attempt("aware", o.name, &o);
      }
      return robust;
    };
    auto robust = attack_target(AttackTarget::whole, suite_runs(cfg.suite));
    if (cfg.components) {
      const std::vector<std::string> runs =
          cfg.suite == Suite::pgd ? suite_runs(Suite::pgd) : suite_runs(Suite::fast);
      for (auto t : {AttackTarget::experts, AttackTarget::router}) {
        auto r = subject.has_router ? attack_target(t, runs) : robust;
        (t == AttackTarget::experts ? ra_e : ra_r) += r.sum().item<int64_t>();
      }
    }
    if (subject.route) {
      torch::NoGradGuard ng;
      auto count = [&](const torch::Tensor& at, std::vector<int64_t>& into) {
        auto c = torch::bincount(subject.route(at).cpu(), /*weights=*/{}, subject.experts);
        for (int64_t e = 0; e < subject.experts; ++e)
          into[static_cast<size_t>(e)] += c[e].item<int64_t>();
      };
      count(x, res.usage.clean);
      count(x_first, res.usage.adversarial);
    }
    auto norms = whole_ball.distance(x_adv).to(torch::kFloat64).cpu();
    auto robust_cpu = robust.cpu();
    for (int64_t i = 0; i < n; ++i) {
      auto& row = res.rows[static_cast<size_t>(start + i)];
      row.clean_correct = correct_cpu[i].item<bool>();
      row.robust = robust_cpu[i].item<bool>();
      row.broken_by = broken_by[static_cast<size_t>(i)];
      row.norm = row.robust || !row.clean_correct ? 0.0 : norms[i].item<double>();
    }
    sa += correct_cpu.sum().item<int64_t>(), ra += robust_cpu.sum().item<int64_t>();
    adv.push_back(x_adv.to(torch::kFloat32).cpu());
    meter.advance(n,
                  "RA " + fmt_fixed(static_cast<double>(ra) / static_cast<double>(start + n), 3));
  }
  const double N = static_cast<double>(std::max<int64_t>(1, data.size()));
  res.sa = static_cast<double>(sa) / N, res.ra = static_cast<double>(ra) / N;
  if (cfg.components)
    res.ra_e = static_cast<double>(ra_e) / N, res.ra_r = static_cast<double>(ra_r) / N;
  res.x_adv = adv.empty() ? torch::empty({0}) : torch::cat(adv, 0);
  res.seconds = meter.elapsed();
  return res;
}

std::vector<double> ExpertUsage::shares(const std::vector<int64_t>& counts) {
  int64_t total = 0;
  for (auto c : counts) total += c;
  std::vector<double> out;
  for (auto c : counts)
    out.push_back(total > 0 ? static_cast<double>(c) / static_cast<double>(total) : 0.0);
  return out;
}

std::pair<int64_t, std::string> ExpertUsage::argmax_share() const {
  std::pair<int64_t, std::string> best{-1, ""};
  double top = -1;
  for (const auto* set : {&clean, &adversarial}) {
    const auto sh = shares(*set);
    for (size_t i = 0; i < sh.size(); ++i)
      if (sh[i] > top)
        top = sh[i], best = {static_cast<int64_t>(i), set == &clean ? "clean" : "adversarial"};
  }
  return best;
}

std::string ExpertUsage::text(const std::vector<double>& shares) {
  std::string s;
  for (double v : shares) s += (s.empty() ? "" : "/") + fmt_fixed(v, 2);
  return s;
}

std::string ExpertUsage::share_violation(double limit, const std::string& where) const {
  if (limit >= 1 || clean.empty() || max_share() <= limit) return "";
  const auto [expert, set] = argmax_share();
  return "routing health: expert " + std::to_string(expert) + " takes " +
         fmt_fixed(100 * max_share(), 1) + "% of the " + where + " " + set +
         " samples, more than --max-expert-share " + fmt_fixed(100 * limit, 1) + "%";
}

std::string ExpertUsage::floor_violation(double floor, const std::string& where) const {
  if (floor <= 0) return "";
  for (const auto* set : {&clean, &adversarial}) {
    const auto sh = shares(*set);
    for (size_t i = 0; i < sh.size(); ++i)
      if (sh[i] < floor)
        return "routing health: expert " + std::to_string(i) + " takes " +
               fmt_fixed(100 * sh[i], 1) + "% of the " + where + " " +
               (set == &clean ? "clean" : "adversarial") +
               " samples, less than --min-expert-share " + fmt_fixed(100 * floor, 1) + "%";
  }
  return "";
}

double ExpertUsage::max_share() const {
  double top = 0;
  for (const auto* set : {&clean, &adversarial})
    for (double v : shares(*set)) top = std::max(top, v);
  return top;
}

void save_adversarial(const std::string& path, const SuiteResult& r, const torch::Tensor& labels,
                      const torch::Tensor& index) {
  c10::Dict<std::string, torch::Tensor> d;
  d.insert("x_adv", r.x_adv.contiguous());
  d.insert("label", labels.to(torch::kLong).cpu().contiguous());
  d.insert("index", index.to(torch::kLong).cpu().contiguous());
  std::vector<uint8_t> robust;
  for (const auto& row : r.rows) robust.push_back(row.robust ? 1 : 0);
  d.insert("robust", torch::tensor(std::vector<int64_t>(robust.begin(), robust.end()), torch::kLong)
                         .to(torch::kBool));
  auto bytes = torch::pickle_save(c10::IValue(d));
  write_file_atomic(path, std::string(bytes.begin(), bytes.end()));
}

}  // namespace moecert
