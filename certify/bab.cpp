// Branch and bound for one sample and one ε (see bab.h): what every search shares, and
// input splitting. docs/certification.md §22.
#include <torch/torch.h>

#include <algorithm>
#include <iostream>

#include "bab-impl.h"
#include "bounds/bounds-impl.h"
#include "moecert/error.h"
#include "moecert/runtime.h"

namespace moecert::bab {
namespace detail {

InputDomain ball(const Problem& p) {
  return {p.x, torch::full({1}, p.eps, p.x.options()), p.norm, p.box};
}

std::pair<torch::Tensor, torch::Tensor> root_box(const Problem& p) {
  return bp::region_ends(ball(p));
}

forms::Evaluation evaluate(const Problem& p, const std::vector<forms::MemberPass>& passes,
                           const InputDomain& d, const torch::Tensor& labels,
                           const std::vector<torch::Tensor>& only) {
  auto at = [&](size_t i) { return i < only.size() ? only[i] : torch::Tensor(); };
  if (p.members.size() == 2)
    return forms::dual_evaluate(passes[0], passes[1], p.alpha, d, labels, at(0), at(1));
  return forms::member_evaluate(passes[0], d, labels, at(0));
}

Search::Search(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
               Clock::time_point deadline, Float32Errors fp32)
    : p_(p), cfg_(cfg), deadline_(deadline), logits_(logits), attack_(attack) {
  opt_.method = BoundMethod::alpha_crown;
  opt_.alpha_steps = cfg.alpha_steps;
  opt_.input_planes = cfg.input_planes;
  opt_.fp32 = fp32;
}

Outcome Search::run() {
  if (!try_attack(0)) {
    last_attack_ = Clock::now();
    search();
  }
  out_.seconds = std::chrono::duration<double>(Clock::now() - start_).count();
  if (out_.rounds == 0)
    out_.root_seconds = out_.seconds;
  else  // the trace's end: the outcome's numbers (worst_slack already NaN when none is open)
    trace_.add(out_.trace, {out_.seconds, out_.bounded, out_.verified_mass, out_.worst_slack});
  return out_;
}

void Search::trace(double worst) {
  trace_.add(out_.trace, {std::chrono::duration<double>(Clock::now() - start_).count(),
                          out_.bounded, out_.verified_mass,
                          std::isfinite(worst) ? worst : std::numeric_limits<double>::quiet_NaN()});
}

void Search::report(size_t queued, double worst) {
  trace(worst);
  if (cfg_.progress.empty() || Clock::now() - last_report_ < std::chrono::seconds(5)) return;
  last_report_ = Clock::now();
  const double secs = std::chrono::duration<double>(last_report_ - start_).count();
  std::cerr << cfg_.progress << ": " << out_.bounded << " subproblems ("
            << fmt_fixed(static_cast<double>(out_.bounded) / secs, 1) << "/s), " << queued
            << " queued, " << fmt_fixed(100 * out_.verified_mass, 1) << "% verified";
  if (std::isfinite(worst)) std::cerr << ", worst open slack " << fmt_fixed(worst, 4);
  std::cerr << "\n";
}

torch::Tensor Search::into_region(const torch::Tensor& x32) const {
  torch::NoGradGuard ng;
  const auto x = x32.to(p_.x.device());
  if (p_.norm == Norm::linf) {
    // The float32 box inside [x − ε, x + ε] (∩ [0, 1]): each end rounded inwards.
    auto [lo, hi] = root_box(p_);
    auto lo32 = lo.to(torch::kFloat), hi32 = hi.to(torch::kFloat);
    lo32 = torch::where(lo32.to(torch::kFloat64).lt(lo),
                        torch::nextafter(lo32, torch::full_like(lo32, 2.0f)), lo32);
    hi32 = torch::where(hi32.to(torch::kFloat64).gt(hi),
                        torch::nextafter(hi32, torch::full_like(hi32, -1.0f)), hi32);
    return torch::max(torch::min(x, hi32), lo32);
  }
  // L2: the offset scaled into the ball, by a little more each time its float32
  // rounding still lands outside.
  const auto d = x.to(torch::kFloat64) - p_.x;
  const double n = d.norm().item<double>();
  if (!(n > p_.eps)) return x;
  for (double shrink : {1e-6, 1e-4, 1e-2}) {
    auto y = p_.x + d * (p_.eps / n * (1 - shrink));
    if (p_.box) y = y.clamp(0.0, 1.0);
    auto y32 = y.to(torch::kFloat);
    if ((y32.to(torch::kFloat64) - p_.x).norm().item<double>() <= p_.eps) return y32;
  }
  return x;
}

bool Search::counterexample(const torch::Tensor& x_found, Outcome::Found by, int round) {
  torch::NoGradGuard ng;
  const auto x32 = into_region(x_found);
  const auto xd = x32.to(torch::kFloat64);
  const auto d = (xd - p_.x).flatten();
  const double dist =
      p_.norm == Norm::linf ? d.abs().max().item<double>() : d.norm().item<double>();
  if (!(dist <= p_.eps)) return false;
  if (p_.box && (xd.lt(0).any().item<bool>() || xd.gt(1).any().item<bool>())) return false;
  const auto pred = logits_(x32).argmax(1).cpu()[0].item<int64_t>();
  if (pred == p_.label) return false;
  out_.verdict = Verdict::falsified, out_.counterexample = x32.cpu(), out_.distance = dist;
  out_.found_by = by, out_.found_round = round;
  return true;
}

bool Search::try_attack(int round) {
  if (!attack_) return false;
  const auto began = Clock::now();
  auto x = attack_(round, round > 0 ? starts_ : torch::Tensor());
  attack_seconds_ += std::chrono::duration<double>(Clock::now() - began).count();
  return x.defined() && counterexample(x, Outcome::Found::attack, round);
}

bool Search::check_primal(const torch::Tensor& primal, const std::vector<double>& slack,
                          const std::vector<bool>& open) {
  if (!primal.defined()) return false;
  std::vector<int64_t> order;
  for (size_t c = 0; c < slack.size(); ++c)
    if (open[c]) order.push_back(static_cast<int64_t>(c));
  if (order.empty()) return false;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return slack[static_cast<size_t>(a)] < slack[static_cast<size_t>(b)];
  });
  order.resize(std::min<size_t>(order.size(), kStarts));
  torch::NoGradGuard ng;
  auto points = primal.index_select(0, torch::tensor(order, torch::kLong).to(primal.device()))
                    .to(torch::kFloat);
  for (int64_t r = 0; r < points.size(0); ++r)
    points[r].copy_(into_region(points.narrow(0, r, 1))[0]);
  starts_ = points;
  auto wrong = logits_(points).argmax(1).ne(p_.label).nonzero().flatten().cpu();
  return wrong.numel() > 0 &&
         counterexample(points.narrow(0, wrong[0].item<int64_t>(), 1), Outcome::Found::minimiser);
}

bool Search::attack_due() {
  const auto now = Clock::now();
  if (std::chrono::duration<double>(now - last_attack_).count() < cfg_.attack_interval ||
      !attack_allowed(attack_round_, cfg_.attack_cycle, attack_seconds_,
                      std::chrono::duration<double>(now - start_).count(), cfg_.attack_share))
    return false;
  const bool found = try_attack(++attack_round_);
  last_attack_ = Clock::now();
  return found;
}

std::vector<forms::MemberPass> Search::prepare(const InputDomain& d, const torch::Tensor& labels,
                                               bool root) const {
  std::vector<forms::MemberPass> passes;
  auto opt = opt_;
  if (root) opt.intermediate_alpha_steps = cfg_.intermediate_steps;
  for (const auto* m : p_.members) {
    passes.push_back(forms::member_prepare(*m, d, labels, opt, p_.fp32));
    forms::add_route_constraints(passes.back());
  }
  return passes;
}

torch::Tensor Search::labels(int64_t n) const {
  return torch::full({n}, p_.label,
                     torch::TensorOptions().dtype(torch::kLong).device(p_.x.device()));
}

void Search::round_begins() {
  if (out_.rounds++ == 0)
    out_.root_seconds = std::chrono::duration<double>(Clock::now() - start_).count();
}

void Search::open_left(const Queue& q, const std::vector<Sub>& extra) {
  auto copy = q;
  double open = 0, worst = kInf;
  while (!copy.empty())
    open += copy.top().mass, worst = std::min(worst, copy.top().slack), copy.pop();
  for (const auto& s : extra) open += s.mass, worst = std::min(worst, s.slack);
  out_.open_mass = open;
  worst_left(worst);
}

void Search::worst_left(double worst) {
  out_.worst_slack = std::isfinite(worst) ? worst : std::numeric_limits<double>::quiet_NaN();
}

namespace {

bool use_input_splits(const Problem& p, const Config& cfg) {
  if (cfg.split == Split::relu || p.norm != Norm::linf) return false;
  if (cfg.split == Split::input) return true;
  auto [lo, hi] = root_box(p);
  return hi.gt(lo).sum().item<int64_t>() <= cfg.input_max_free;
}

/// Input splitting (docs §21, §22): pieces of the root box, each bounded whole, halved
/// across their widest free input.
class InputSearch : public Search {
 public:
  InputSearch(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
              Clock::time_point deadline)
      // Input splits take any float32 errors (relational ones where the graph has them).
      : Search(p, cfg, logits, attack, deadline,
               p.fp32 ? Float32Errors::automatic : Float32Errors::per_node) {}

 private:
  void search() override {
    auto [lo0, hi0] = root_box(p_);
    const auto width0 = (hi0 - lo0)[0];
    const auto free = width0.gt(0);
    const auto scale = torch::where(free, width0, torch::ones_like(width0));
    Queue q;
    std::vector<Sub> stuck;  // open pieces at the depth limit
    Sub root;
    root.lower = lo0, root.upper = hi0;
    q.push(std::move(root));
    bool first = true;
    while (!q.empty()) {
      if (!round_fits() || (!first && attack_due())) break;
      if (static_cast<int64_t>(q.size()) + 2 * cfg_.batch > cfg_.max_queue) break;
      first = false;
      std::vector<Sub> batch;
      while (!q.empty() && static_cast<int64_t>(batch.size()) < cfg_.batch)
        batch.push_back(q.top()), q.pop();
      const int64_t n = static_cast<int64_t>(batch.size());
      std::vector<torch::Tensor> lo, hi;
      for (const auto& s : batch) lo.push_back(s.lower[0]), hi.push_back(s.upper[0]);
      InputDomain d;
      d.lower = torch::stack(lo), d.upper = torch::stack(hi);
      d.x = (d.lower + d.upper) * 0.5;
      d.eps = std::get<0>(((d.upper - d.lower) * 0.5).flatten(1).max(1));
      d.norm = Norm::linf, d.box = false;
      const auto round_start = Clock::now();
      round_begins();
      const auto passes = prepare(d, labels(n));
      auto slack = evaluate(p_, passes, d, labels(n)).slack.cpu();
      last_round_ = Clock::now() - round_start;
      out_.bounded += n;
      // The open pieces' centres on the float32 model (inside the piece when rounding kept them).
      const auto centres = d.x.to(torch::kFloat);
      std::vector<Sub> open;
      for (int64_t c = 0; c < n; ++c) {
        auto& s = batch[static_cast<size_t>(c)];
        s.slack = slack[c].item<double>();
        if (s.slack > 0) {
          out_.verified_mass += s.mass;
          continue;
        }
        const auto xc = centres.narrow(0, c, 1);
        const auto xd = xc.to(torch::kFloat64);
        if (xd.ge(s.lower).all().item<bool>() && xd.le(s.upper).all().item<bool>() &&
            counterexample(xc, Outcome::Found::centre)) {
          for (int64_t r = c; r < n; ++r) open.push_back(batch[static_cast<size_t>(r)]);
          break;
        }
        open.push_back(std::move(s));
      }
      if (out_.verdict == Verdict::falsified) {
        open.insert(open.end(), stuck.begin(), stuck.end());
        open_left(q, open);
        return;
      }
      for (auto& s : open) {
        if (s.depth >= cfg_.max_depth) {
          out_.exhausted = true;
          stuck.push_back(std::move(s));
          continue;
        }
        auto [lower_half, upper_half] =
            bisect_widest(s.lower, s.upper, free.unsqueeze(0), scale.unsqueeze(0));
        for (const auto& [lo, hi] : {lower_half, upper_half}) {
          Sub c;
          c.lower = lo, c.upper = hi, c.depth = s.depth + 1, c.slack = s.slack, c.mass = s.mass / 2;
          q.push(std::move(c));
        }
      }
      double worst = q.empty() ? kInf : q.top().slack;  // the open pieces' lowest
      for (const auto& s : stuck) worst = std::min(worst, s.slack);
      report(q.size() + stuck.size(), worst);
    }
    open_left(q, stuck);
    if (out_.verdict != Verdict::falsified && q.empty() && stuck.empty())
      out_.verdict = Verdict::verified;
  }
};

}  // namespace
}  // namespace detail

std::pair<std::pair<torch::Tensor, torch::Tensor>, std::pair<torch::Tensor, torch::Tensor>>
bisect_widest(const torch::Tensor& lower, const torch::Tensor& upper, const torch::Tensor& free,
              const torch::Tensor& scale) {
  auto rel = torch::where(free, (upper - lower) / scale, torch::zeros_like(scale));
  const int64_t dim = rel.flatten().argmax().item<int64_t>();
  const double mid = ((lower.flatten()[dim] + upper.flatten()[dim]) * 0.5).item<double>();
  auto a_upper = upper.clone(), b_lower = lower.clone();
  a_upper.view({-1})[dim] = mid;
  b_lower.view({-1})[dim] = mid;
  return {{lower, a_upper}, {b_lower, upper}};
}

bool attack_allowed(int done, int64_t cycle, double attack_seconds, double elapsed, double share) {
  return cycle <= 0 || done < cycle || attack_seconds <= share * elapsed;
}

AttackRound attack_round(int round, int64_t aware, int64_t targets) {
  const int64_t kinds = aware + targets;
  if (round <= 0 || kinds <= 0) return {AttackRound::Kind::untargeted, 0, std::max(round, 0)};
  const int64_t which = (round - 1) % kinds, cycle = (round - 1) / kinds;
  if (which < aware) return {AttackRound::Kind::aware, which, cycle};
  return {AttackRound::Kind::targeted, which - aware, cycle};
}

nlohmann::json trace_json(const std::vector<Outcome::Point>& trace) {
  auto out = nlohmann::json::array();
  for (const auto& p : trace)
    out.push_back({{"seconds", p.seconds},
                   {"subproblems", p.subproblems},
                   {"verified_share", p.verified_share},
                   {"worst_slack", std::isfinite(p.worst_slack) ? nlohmann::json(p.worst_slack)
                                                                : nlohmann::json(nullptr)}});
  return out;
}

void TraceBuilder::add(std::vector<Outcome::Point>& trace, const Outcome::Point& p) {
  if (!trace.empty() && (provisional_ || trace.back().subproblems == p.subproblems))
    trace.pop_back();
  provisional_ = calls_++ % stride_ != 0;
  trace.push_back(p);
  if (trace.size() <= Outcome::kTracePoints) return;
  // Every other point of the grid (the first kept), and the grid's step doubled.
  const size_t grid = trace.size() - (provisional_ ? 1 : 0);
  size_t keep = 0;
  for (size_t i = 0; i < grid; i += 2) trace[keep++] = trace[i];
  if (provisional_) trace[keep++] = trace.back();
  trace.resize(keep);
  stride_ *= 2;
}

double slack_at(const std::vector<Outcome::Point>& trace, double seconds) {
  double out = std::numeric_limits<double>::quiet_NaN();
  for (const auto& p : trace)
    if (p.seconds <= seconds) out = p.worst_slack;
  return out;
}

nlohmann::json open_program_json(const Outcome::OpenProgram& o) {
  if (o.cls < 0) return nullptr;
  return {{"class", o.cls},           {"route", o.route},           {"weight_lo", o.weight_lo},
          {"weight_hi", o.weight_hi}, {"margin_low", o.margin_low}, {"value", o.value}};
}

Outcome solve(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
              Clock::time_point deadline) {
  if (p.members.empty() || p.members.size() > 2)
    throw Error(ExitCode::internal, "certify: branch and bound of one member or a dual pair");
  if (detail::use_input_splits(p, cfg))
    return detail::InputSearch(p, cfg, logits, attack, deadline).run();
  return detail::relu_search(p, cfg, logits, attack, deadline);
}

}  // namespace moecert::bab
