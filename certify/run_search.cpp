// The searches around each sample (SPEC §4): the empirical radius of the cross-check
// (attacks on the float32 model, upper bounds on the true radius) and branch and bound
// (docs §22, complete verification up the ε grid), which share the attack starts.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <limits>
#include <map>
#include <string>

#include "bab.h"
#include "moecert/attack_suite.h"
#include "moecert/checkpoint.h"
#include "moecert/defaults.h"
#include "moecert/error.h"
#include "moecert/runtime.h"
#include "run-impl.h"

namespace moecert::run {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// The seed of an image's attack starts: the run's seed and the image's split index, so
/// that a sample's starts never depend on its batch or shard.
uint64_t image_seed(const CertifyConfig& cfg, int64_t image) {
  return cfg.seed * 1000003ULL + static_cast<uint64_t>(image);
}

/// APGD with the cross-check's loss and --restarts random starts (start r + `round`·1000
/// of each row's sampler), each on the rows the earlier ones left, on the balls of
/// `radius` around xs (float32): the points found and whether the float32 model
/// misclassifies them (success, on the CPU).
AttackFound apgd_points(const Context& ctx, const AttackSubject& subject, const torch::Tensor& xs,
                        const torch::Tensor& ys, const std::vector<double>& radius,
                        const std::vector<uint64_t>& seeds, int round) {
  const auto& cfg = ctx.cfg;
  auto fs = subject.target(AttackTarget::whole, xs);
  const AttackBall ball{xs, torch::tensor(radius, torch::kFloat32).to(xs.device()), cfg.norm,
                        cfg.box};
  const RowSampler sampler(seeds);
  AttackFound found{xs.clone(), torch::zeros({xs.size(0)}, torch::kBool).to(xs.device())};
  for (int r = 0; r < std::max(1, cfg.attack.restarts); ++r) {
    auto rows = (~found.success).nonzero().flatten();
    if (rows.numel() == 0) break;
    auto yr = ys.index_select(0, rows);
    auto fr = subject.target(AttackTarget::whole, xs.index_select(0, rows));
    Objective loss =
        cfg.attack.loss == AttackLoss::ce
            ? Objective([fr, yr](const torch::Tensor& v) { return loss_ce(fr(v), yr); })
            : Objective([fr, yr](const torch::Tensor& v) { return loss_dlr(fr(v), yr); });
    auto run = attack_apgd(loss, fr, ball.subset(rows), yr, sampler.subset(rows), cfg.attack.steps,
                           static_cast<uint64_t>(r + 1000 * round));
    found.x_adv.index_copy_(0, rows, run.x_adv);
    found.success.index_copy_(0, rows, run.success);
  }
  torch::NoGradGuard ng;
  found.success = fs(found.x_adv).argmax(1).ne(ys).cpu();
  return found;
}

/// Branch and bound's attack round `round` on one sample's ball of radius eps (docs §22,
/// bab::attack_round): APGD on the cross-check's loss, or with the standard suite's step
/// budget on one of its other objectives: a MoE-aware one (route-aware per expert, per
/// member of a dual-model) or targeted DLR towards another class (APGD-T); that one from
/// each of `starts` too when given (the worst open subproblems' minimisers). Returns a
/// point found, undefined when the float32 model still classifies every one correctly;
/// `objective` names the round's objective.
torch::Tensor search_attack(const Context& ctx, const AttackSubject& subject,
                            const torch::Tensor& x32, const torch::Tensor& y, double eps,
                            uint64_t seed, int round, const torch::Tensor& starts,
                            std::string& objective) {
  const auto& cfg = ctx.cfg;
  // One random start, and the given ones: m rows of the same ball.
  const int64_t m = 1 + (starts.defined() ? starts.size(0) : 0);
  const auto xs = x32.expand({m, -1, -1, -1}).contiguous();
  const auto ys = y.expand({m}).contiguous();
  auto fm = subject.target(AttackTarget::whole, xs);
  std::vector<AwareObjective> aware;
  if (subject.aware) aware = subject.aware(ys);
  torch::Tensor order;  // the other classes, the most likely first
  {
    torch::NoGradGuard ng;
    auto lp = fm(x32).scatter(1, y.unsqueeze(1), -std::numeric_limits<float>::infinity());
    order = std::get<1>(lp.sort(1, /*descending=*/true)).select(0, 0).narrow(0, 0, lp.size(1) - 1);
  }
  const auto pick = bab::attack_round(round, static_cast<int64_t>(aware.size()), order.size(0));
  if (pick.kind == bab::AttackRound::Kind::untargeted) {
    objective = "APGD on the cross-check's loss";
    auto f = apgd_points(ctx, subject, x32, y, {eps}, {seed}, round + 1);
    return f.success[0].item<bool>() ? f.x_adv : torch::Tensor();
  }
  Objective loss;
  if (pick.kind == bab::AttackRound::Kind::aware) {
    objective = "APGD, MoE-aware objective " + aware[static_cast<size_t>(pick.index)].name;
    loss = aware[static_cast<size_t>(pick.index)].f;
  } else {
    auto target = order.narrow(0, pick.index, 1).expand({m});
    objective = "APGD-T towards class " + std::to_string(target[0].item<int64_t>());
    loss = [fm, ys, target](const torch::Tensor& v) {
      return loss_dlr_targeted(fm(v), ys, target);
    };
  }
  const AttackBall ball{xs, torch::full({m}, eps, x32.options()), cfg.norm, cfg.box};
  const uint64_t stream =
      1000 * static_cast<uint64_t>(pick.cycle + 1) + static_cast<uint64_t>(round);
  torch::Tensor start;
  if (starts.defined())
    start = torch::cat({RowSampler({seed}).start(
                            AttackBall{x32, ball.eps.narrow(0, 0, 1), cfg.norm, cfg.box}, stream),
                        starts.to(x32.device())});
  auto run = attack_apgd(loss, fm, ball, ys, RowSampler(std::vector<uint64_t>(m, seed)),
                         SuiteConfig{}.apgd_steps, stream, start);
  torch::NoGradGuard ng;
  auto wrong = fm(run.x_adv).argmax(1).ne(ys).nonzero().flatten().cpu();
  return wrong.numel() > 0 ? run.x_adv.narrow(0, wrong[0].item<int64_t>(), 1) : torch::Tensor();
}

}  // namespace

/// The empirical radius of each correct sample on the float32 model over the certified
/// domain (the ball, ∩ the pixel box unless --no-box): the smaller of the FMN
/// minimum-norm attack's radius and a bisection of APGD-CE (with --restarts random
/// starts; DLR with --loss margin). Both are distances of points the model
/// misclassifies: upper bounds on the true minimal radius.
std::vector<double> empirical_radii(const Context& ctx, LoadedModel& loaded, const Batch& batch,
                                    const std::vector<int64_t>& index) {
  const auto& cfg = ctx.cfg;
  const int64_t B = batch.size();
  torch::nn::Module& module = loaded.is_dual() ? static_cast<torch::nn::Module&>(*loaded.dual)
                                               : static_cast<torch::nn::Module&>(*loaded.model);
  auto subject = loaded.subject();
  auto x = batch.x.to(torch::kFloat32), y = batch.labels.to(ctx.device);
  std::vector<double> lo(static_cast<size_t>(B), 0.0), hi(static_cast<size_t>(B), kInf);
  std::vector<int64_t> active;
  for (int64_t b = 0; b < B; ++b) {
    if (!batch.correct[b].item<bool>())
      hi[static_cast<size_t>(b)] = 0.0;
    else
      active.push_back(b);
  }
  FrozenParameters frozen(module);
  // The distance of a found point, in float64 (the radii it is compared with are float64).
  auto distance = [&](const torch::Tensor& x_adv, const torch::Tensor& xs) {
    auto d = (x_adv.to(torch::kFloat64) - xs.to(torch::kFloat64)).flatten(1);
    return (cfg.norm == Norm::linf ? d.abs().amax(1) : d.norm(2, 1)).cpu();
  };
  auto probe = [&](const std::vector<int64_t>& who, const std::vector<double>& radius) {
    auto sel = torch::tensor(who, torch::kLong).to(ctx.device);
    auto xs = x.index_select(0, sel), ys = y.index_select(0, sel);
    std::vector<uint64_t> seeds;
    for (auto b : who) seeds.push_back(image_seed(cfg, index[static_cast<size_t>(b)]));
    auto found = apgd_points(ctx, subject, xs, ys, radius, seeds, 0);
    auto dist = distance(found.x_adv, xs);
    std::vector<std::pair<bool, double>> res;
    for (size_t i = 0; i < who.size(); ++i)
      res.emplace_back(found.success[static_cast<int64_t>(i)].item<bool>(),
                       dist[static_cast<int64_t>(i)].item<double>());
    return res;
  };
  if (active.empty()) return hi;
  {  // the minimum-norm attack
    auto sel = torch::tensor(active, torch::kLong).to(ctx.device);
    auto xs = x.index_select(0, sel), ys = y.index_select(0, sel);
    auto fs = subject.target(AttackTarget::whole, xs);
    auto mn = attack_min_norm(fs, fs, xs, ys, cfg.norm, cfg.box, cfg.min_norm_steps);
    torch::NoGradGuard ng;
    auto wrong = fs(mn.x_adv).argmax(1).ne(ys).cpu();
    auto r = distance(mn.x_adv, xs);  // the point's own distance, not FMN's float32 estimate
    for (size_t i = 0; i < active.size(); ++i)
      if (wrong[static_cast<int64_t>(i)].item<bool>())
        hi[static_cast<size_t>(active[i])] =
            std::min(cfg.empirical_max, r[static_cast<int64_t>(i)].item<double>());
  }
  if (active.empty()) return hi;
  std::vector<double> top;
  for (auto b : active) top.push_back(std::min(cfg.empirical_max, hi[static_cast<size_t>(b)]));
  auto first = probe(active, top);
  std::vector<int64_t> found;
  for (size_t i = 0; i < active.size(); ++i) {
    const auto ub = static_cast<size_t>(active[i]);
    if (first[i].first) hi[ub] = std::min(hi[ub], first[i].second);
    if (std::isfinite(hi[ub])) found.push_back(active[i]);
  }
  while (true) {
    std::vector<int64_t> who;
    std::vector<double> mids;
    for (auto b : found) {
      const auto ub = static_cast<size_t>(b);
      if (hi[ub] - lo[ub] > cfg.empirical_tol)
        who.push_back(b), mids.push_back(0.5 * (lo[ub] + hi[ub]));
    }
    if (who.empty()) break;
    auto res = probe(who, mids);
    for (size_t i = 0; i < who.size(); ++i) {
      const auto ub = static_cast<size_t>(who[i]);
      if (res[i].first)
        hi[ub] = std::min(hi[ub], std::max(res[i].second, lo[ub]));
      else
        lo[ub] = mids[i];
    }
  }
  return hi;
}

/// Branch and bound (docs §22) of every correct sample, ε by ε up the grid: an ε the
/// sample's other radii reach is verified already, one its empirical radius reaches is
/// falsified already; the others get branch and bound within the sample's budget
/// (cfg.bab_timeout for the whole grid). A counterexample lowers the sample's empirical
/// radius to its distance. Writes the radius {form, bab} (the largest verified ε of the
/// grid) and the row field "bab" (verdict per ε, subproblems bounded, seconds).
void bab_stage(const Context& ctx, LoadedModel& loaded, Batch& batch,
               const std::vector<int64_t>& ids, std::vector<double>& empirical, bool progress) {
  using bab::Clock;
  const auto& cfg = ctx.cfg;
  auto subject = loaded.subject();
  std::vector<const forms::MemberGraphs*> members;
  for (const auto& m : ctx.members) members.push_back(&m.bp);
  const std::string form =
      ctx.dual ? "dual" : forms::form_name(forms::member_form(ctx.members[0].bp));
  bab::Config bc;
  bc.batch = cfg.bab_batch, bc.split = cfg.bab_split, bc.input_max_free = cfg.bab_input_max_free;
  bc.alpha_steps = cfg.alpha_steps, bc.intermediate_steps = cfg.bab_intermediate_steps;
  bc.sub_steps = cfg.bab_steps;
  bc.warm_start = cfg.bab_warm_start, bc.fsb_candidates = cfg.bab_fsb;
  bc.expertwise = cfg.bab_expertwise, bc.mixture_row_settled = cfg.bab_row_carry;
  bc.input_planes = cfg.input_planes;
  for (int64_t b = 0; b < batch.size(); ++b) {
    const auto ub = static_cast<size_t>(b);
    auto& radii = batch.radii[ub];
    if (!batch.correct[b].item<bool>()) {
      radii[RadiusKey{form, Estimator::bab}] = 0.0;
      continue;
    }
    double known = 0;
    for (const auto& [k, r] : radii) known = std::max(known, r);
    const auto start = Clock::now();
    const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(cfg.bab_timeout));
    const auto x = batch.x.narrow(0, b, 1);
    const auto x32 = x.to(torch::kFloat32);
    const auto y = batch.labels.narrow(0, b, 1).to(ctx.device);
    const uint64_t seed = image_seed(cfg, ids[ub]) + 7777;
    const bab::Logits logits = [&subject](const torch::Tensor& v) {
      torch::NoGradGuard ng;
      return subject.target(AttackTarget::whole, v)(v);
    };
    // One pass through search_attack's objectives: the MoE-aware ones, then a target per
    // other class.
    bc.attack_cycle = (subject.aware ? static_cast<int64_t>(subject.aware(y).size()) : 0) +
                      logits(x32).size(1) - 1;
    double verified = 0;
    int64_t bounded = 0;
    bool stop = false;
    nlohmann::json verdicts = nlohmann::json::object(), searches = nlohmann::json::array();
    // One search at eps, recorded; a counterexample lowers the empirical radius.
    auto search = [&](double eps, bool bisecting, Clock::time_point until) {
      const std::string key = eps_key(eps);
      std::map<int, std::string> objectives;  // per attack round
      const bab::Attack attack = [&](int round, const torch::Tensor& starts) {
        return search_attack(ctx, subject, x32, y, eps, seed, round, starts, objectives[round]);
      };
      const bab::Problem pr{members, ctx.alpha, x,       batch.labels[b].item<int64_t>(),
                            eps,     cfg.norm,  cfg.box, !cfg.exact_arithmetic};
      if (progress)
        bc.progress =
            "certify: branch and bound, image " + std::to_string(ids[ub]) + ", eps " + key;
      const auto out = bab::solve(pr, bc, logits, attack, until);
      bounded += out.bounded;
      const char* verdict = out.verdict == bab::Verdict::verified    ? "verified"
                            : out.verdict == bab::Verdict::falsified ? "falsified"
                                                                     : "unknown";
      searches.push_back(
          {{"eps", eps},
           {"verdict", verdict},
           {"subproblems", out.bounded},
           {"seconds", out.seconds},
           {"root_seconds", out.root_seconds},
           {"verified_share", out.verified_mass},
           {"worst_slack", std::isfinite(out.worst_slack) ? nlohmann::json(out.worst_slack)
                                                          : nlohmann::json(nullptr)},
           {"route_splits", out.route_splits},
           {"screened", out.screened},
           {"carried", out.carried},
           {"bisect", bisecting}});
      if (!out.trace.empty()) searches.back()["trace"] = bab::trace_json(out.trace);
      if (out.open_program.cls >= 0)
        searches.back()["open_program"] = bab::open_program_json(out.open_program);
      switch (out.found_by) {
        case bab::Outcome::Found::none:
          break;
        case bab::Outcome::Found::attack:
          searches.back()["found_by"] = "attack round " + std::to_string(out.found_round) + ": " +
                                        objectives[out.found_round];
          break;
        case bab::Outcome::Found::minimiser:
          searches.back()["found_by"] = "bound minimiser";
          break;
        case bab::Outcome::Found::centre:
          searches.back()["found_by"] = "subproblem centre";
          break;
      }
      if (progress) {
        std::cerr << "certify: branch and bound, image " << ids[ub] << ", eps " << key << ": "
                  << verdict << " in " << fmt_fixed(out.seconds, 1) << " s, " << out.bounded
                  << " subproblems ("
                  << fmt_fixed(static_cast<double>(out.bounded) / std::max(out.seconds, 1e-9), 1)
                  << "/s), " << fmt_fixed(100 * out.verified_mass, 1) << "% verified, root "
                  << fmt_fixed(out.root_seconds, 1) << " s";
        if (std::isfinite(out.worst_slack)) {
          std::cerr << ", worst open slack " << fmt_fixed(out.worst_slack, 4);
          // How far it rose over the second half (one that stopped rising is unlikely to
          // close with more time: a rule of thumb, docs §22).
          const double half = bab::slack_at(out.trace, out.seconds / 2);
          if (out.verdict == bab::Verdict::unknown && std::isfinite(half))
            std::cerr << " (" << fmt_fixed(half, 4) << " at half the time)";
        }
        std::cerr << "\n";
      }
      if (progress && out.open_program.cls >= 0) {  // what holds a mixture's search open
        const auto& o = out.open_program;
        std::cerr << "certify:   its least open program, against class " << o.cls;
        if (!o.route.empty()) {
          std::cerr << " on expert set {";
          for (size_t j = 0; j < o.route.size(); ++j) std::cerr << (j ? ", " : "") << o.route[j];
          std::cerr << "}";
        }
        std::cerr << ": experts' margin bounds";
        for (double m : o.margin_low) std::cerr << " " << fmt_fixed(m, 4);
        std::cerr << ", router weights";
        for (size_t j = 0; j < o.weight_lo.size(); ++j)
          std::cerr << " [" << fmt_fixed(o.weight_lo[j], 4) << ", " << fmt_fixed(o.weight_hi[j], 4)
                    << "]";
        std::cerr << "\n";
      }
      if (out.verdict == bab::Verdict::falsified) {
        if (cfg.empirical) empirical[ub] = std::min(empirical[ub], out.distance);
        const auto& prior = batch.extra[ub];
        if (!prior.contains("bab_counterexample_distance") ||
            prior["bab_counterexample_distance"].get<double>() > out.distance)
          batch.extra[ub]["bab_counterexample_distance"] = out.distance;
      }
      return out;
    };
    for (double eps : cfg.eps_grid.values()) {
      const std::string key = eps_key(eps);
      if (eps <= known) {
        verified = eps, verdicts[key] = "verified";
        continue;
      }
      if (cfg.empirical && empirical[ub] <= eps) {
        verdicts[key] = "falsified";
        continue;
      }
      if (stop || Clock::now() > deadline) {
        verdicts[key] = "unknown";
        continue;
      }
      const auto out = search(eps, false, deadline);
      if (out.verdict == bab::Verdict::verified) {
        verified = eps, verdicts[key] = "verified";
      } else if (out.verdict == bab::Verdict::falsified) {
        verdicts[key] = "falsified";
        stop = true;
      } else {
        verdicts[key] = "unknown";
        stop = true;  // larger regions are harder: their budget is left to the attacks
      }
    }
    if (cfg.bab_bisect > 0) {
      // The verified radius between the grid's points: bisection from the best radius
      // proven (by search or by another estimator) towards the first grid ε not verified
      // or the smallest distance of a misclassified point, whichever is smaller. Regions
      // nest, so what is verified at ε is verified below it.
      double lo = std::max(verified, known), hi = kInf;
      for (double eps : cfg.eps_grid.values())
        if (eps > lo && verdicts[eps_key(eps)] != "verified") {
          hi = eps;
          break;
        }
      if (cfg.empirical) hi = std::min(hi, empirical[ub]);
      for (int step = 0;
           step < cfg.bab_bisect && lo < hi && std::isfinite(hi) && Clock::now() < deadline;
           ++step) {
        // Each step gets an equal share of what is left, so that one hard midpoint
        // does not take the steps after it.
        const double mid = 0.5 * (lo + hi);
        const auto out =
            search(mid, true, Clock::now() + (deadline - Clock::now()) / (cfg.bab_bisect - step));
        if (out.verdict == bab::Verdict::verified)
          lo = mid;
        else
          hi = out.verdict == bab::Verdict::falsified ? std::min(mid, out.distance) : mid;
      }
      verified = lo;
    }
    radii[RadiusKey{form, Estimator::bab}] = verified;
    batch.extra[ub]["bab"] = {
        {"verdicts", verdicts},
        {"searches", searches},
        {"subproblems", bounded},
        {"seconds", std::chrono::duration<double>(Clock::now() - start).count()}};
  }
}

}  // namespace moecert::run
