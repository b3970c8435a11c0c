// VNN-COMP properties on ONNX models (include/moecert/verify.h). Soundness of "holds":
// a case is refuted only when, for one of its constraints a·Y + b·X <= rhs, a lower bound
// of a·Ŷ over the case's box (Ŷ the float32 model's output: the exact-real lower bound of
// bound_specs minus its float32 error bound) plus the exact minimum of b·X over the box
// exceeds rhs; no counterexample then exists in that case (docs/certification.md §21).
#include "moecert/verify.h"

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <deque>
#include <iostream>
#include <optional>

#include "bab.h"
#include "moecert/bounds.h"
#include "moecert/error.h"
#include "moecert/runtime.h"

namespace moecert {
namespace {

using Clock = std::chrono::steady_clock;

/// The graph with every tensor in float32: what the attack differentiates.
LayerGraph float32_graph(const LayerGraph& g) {
  LayerGraph out;
  for (const auto& n : g) {
    Layer l = n.layer;
    for (torch::Tensor* t : {&l.weight, &l.bias, &l.shift_terms})
      if (t->defined()) *t = t->to(torch::kFloat);
    out.add(std::move(l), n.inputs);
  }
  return out;
}

struct CaseTensors {
  torch::Tensor lower, upper;  ///< [1, *input_shape] float64
  torch::Tensor C;             ///< [1, S, K] output coefficients
  torch::Tensor D;             ///< [S, n] input coefficients
  torch::Tensor rhs;           ///< [S]
};

CaseTensors tensors_of(const VnnCase& c, const Shape& in_shape, int64_t n, int64_t K) {
  CaseTensors t;
  std::vector<int64_t> shape{1};
  shape.insert(shape.end(), in_shape.begin(), in_shape.end());
  t.lower = torch::tensor(c.box.lower, torch::kFloat64).reshape(shape);
  t.upper = torch::tensor(c.box.upper, torch::kFloat64).reshape(shape);
  const auto S = static_cast<int64_t>(c.constraints.size());
  t.C = torch::zeros({1, S, K}, torch::kFloat64);
  t.D = torch::zeros({S, n}, torch::kFloat64);
  t.rhs = torch::zeros({S}, torch::kFloat64);
  for (int64_t s = 0; s < S; ++s) {
    const auto& k = c.constraints[static_cast<size_t>(s)];
    for (const auto& [j, a] : k.y_terms) t.C[0][s][j] += a;
    for (const auto& [i, b] : k.x_terms) t.D[s][i] += b;
    t.rhs[s] = k.rhs;
  }
  return t;
}

/// The bound pass over B boxes [lower, upper] ([B, *input_shape]).
BoundPass box_pass(const CompiledGraph& g, const torch::Tensor& lower, const torch::Tensor& upper,
                   BoundMethod method) {
  InputDomain d;
  d.x = (lower + upper) * 0.5;
  d.eps = std::get<0>(((upper - lower) * 0.5).flatten(1).max(1));
  d.norm = Norm::linf, d.box = false;
  d.lower = lower, d.upper = upper;
  BoundOptions opt;
  opt.method = method;
  opt.fp32 = Float32Errors::automatic;
  return bound_forward(g, d, opt);
}

/// Which of the boxes of `pass` some constraint of the case is impossible over (that
/// piece of the case refuted). -> [B] bool
torch::Tensor refuted_boxes(const BoundPass& pass, const CaseTensors& t) {
  const auto &lower = pass.domain.lower, &upper = pass.domain.upper;
  const int64_t B = lower.size(0), S = t.C.size(1);
  if (S == 0) return torch::zeros({B}, torch::kBool);
  const auto sb = bound_specs(pass, t.C.expand({B, S, t.C.size(2)}));
  // min over the box of b·x (separable), and L − E + m, in float64: the rounding of these
  // n + 3 operations is at most γ_{n+3} times the magnitudes summed (docs §21).
  const auto l = lower.flatten(1).unsqueeze(1), u = upper.flatten(1).unsqueeze(1);  // [B, 1, n]
  const auto xmin = torch::minimum(t.D * l, t.D * u).sum(2);                        // [B, S]
  const auto xmag = (t.D.abs() * torch::maximum(l.abs(), u.abs())).sum(2);
  const double unit = std::ldexp(1.0, -53), k = static_cast<double>(l.size(2) + 3);
  const double gamma = k * unit / (1 - k * unit);
  const auto low = sb.lower - sb.err32 + xmin - gamma * (sb.lower.abs() + sb.err32 + xmag);
  // rhs is the parser's float64 normal form (constants moved across, coefficients
  // scaled): allow it γ_{n+3} relative too.
  return low.gt(t.rhs + gamma * t.rhs.abs()).any(1);
}

/// Whether some constraint of case k is impossible over its whole box. Consecutive
/// cases with the same box (a disjunction over outputs) share one bound pass.
class CaseBounds {
 public:
  CaseBounds(const CompiledGraph& g, BoundMethod method) : g_(g), method_(method) {}
  bool refuted(const std::vector<CaseTensors>& t, size_t k) {
    if (t[k].C.size(1) == 0) return false;
    const bool same =
        pass_ && torch::equal(t[k].lower, t[at_].lower) && torch::equal(t[k].upper, t[at_].upper);
    if (!same) pass_ = box_pass(g_, t[k].lower, t[k].upper, method_), at_ = k;
    return refuted_boxes(*pass_, t[k]).item<bool>();
  }

 private:
  const CompiledGraph& g_;
  BoundMethod method_;
  std::optional<BoundPass> pass_;
  size_t at_ = 0;
};

/// PGD on the case's box: minimises Σ_s relu(a_s·ŷ + b_s·x − rhs_s) from `restarts`
/// random starts; returns true with x, y when every constraint holds on the float32 model.
bool falsify(const CompiledGraph& g32, const VnnCase& vc, const CaseTensors& t,
             const VerifyOptions& o, int64_t steps, Clock::time_point deadline,
             std::vector<double>& x_out, std::vector<double>& y_out) {
  // The box in float32, rounded inwards so that every float32 point lies in the real box.
  auto lo = t.lower.to(torch::kFloat), hi = t.upper.to(torch::kFloat);
  lo = torch::where(lo.to(torch::kDouble) < t.lower, torch::nextafter(lo, hi), lo);
  hi = torch::where(hi.to(torch::kDouble) > t.upper, torch::nextafter(hi, lo), hi);
  const int64_t R = o.restarts;
  std::vector<int64_t> rep(static_cast<size_t>(lo.dim()), 1);
  rep[0] = R;
  auto L = lo.repeat(rep), H = hi.repeat(rep);
  auto x = L + (H - L) * torch::rand(L.sizes());
  if (R > 1) x[0].copy_(((lo + hi) * 0.5)[0]);
  const auto C = t.C[0].to(torch::kFloat), D = t.D.to(torch::kFloat), rhs = t.rhs.to(torch::kFloat);
  auto check = [&](const torch::Tensor& xs, const torch::Tensor& ys) {
    auto xd = xs.to(torch::kDouble).flatten(1), yd = ys.to(torch::kDouble).flatten(1);
    for (int64_t r = 0; r < xs.size(0); ++r) {
      std::vector<double> xv(xd[r].data_ptr<double>(), xd[r].data_ptr<double>() + xd.size(1));
      std::vector<double> yv(yd[r].data_ptr<double>(), yd[r].data_ptr<double>() + yd.size(1));
      if (vnnlib_case_satisfied(vc, xv, yv, 0)) {
        x_out = xv, y_out = yv;
        return true;
      }
    }
    return false;
  };
  const auto step_size = (H - L) * 0.1;
  for (int64_t it = 0; it <= steps; ++it) {
    x = x.detach().requires_grad_(true);
    auto y = g32.forward(x).flatten(1);
    {
      torch::NoGradGuard ng;
      if (check(x.detach(), y.detach())) return true;
    }
    if (it == steps || Clock::now() > deadline) break;
    auto viol = torch::relu(torch::matmul(y, C.t()) + torch::matmul(x.flatten(1), D.t()) - rhs);
    auto grad = torch::autograd::grad({viol.sum()}, {x})[0];
    torch::NoGradGuard ng;
    const double decay = 1.0 - static_cast<double>(it) / static_cast<double>(steps + 1);
    x = torch::min(torch::max(x - step_size * decay * grad.sign(), L), H);
  }
  return false;
}

/// Input-domain branch and bound on one case (docs §21): pieces of its box are bounded
/// by CROWN in batches; a refuted piece is done, an open one has its centre checked on
/// the float32 model and is bisected along its free input that is widest relative to
/// the case's box (the first such on ties). The two halves [l, m] and [m, u] of a piece
/// cover it (m a float64 number inside), so the refuted pieces cover what they claim.
/// Returns 1 (refuted), -1 (a counterexample in out.x, out.y) or 0 (open: budget).
int split_case(const CompiledGraph& g, const CompiledGraph& g32, const VnnCase& vc,
               const CaseTensors& t, const VerifyOptions& o, Clock::time_point deadline,
               size_t case_no, VerifyOutcome& out) {
  struct Piece {
    torch::Tensor lower, upper;  // [*input_shape]
    int depth;
  };
  const auto width0 = (t.upper - t.lower)[0];
  const auto free = width0.gt(0);
  const auto scale = torch::where(free, width0, torch::ones_like(width0));
  std::deque<Piece> queue{{t.lower[0], t.upper[0], 0}};
  double refuted = 0;
  auto last_print = Clock::now();
  const auto begin = last_print;
  const int64_t boxes0 = out.boxes;
  auto open_left = [&] {
    double f = 0;
    for (const auto& p : queue) f += std::ldexp(1.0, -p.depth);
    return f;
  };
  while (!queue.empty()) {
    if (Clock::now() > deadline) break;
    const auto take = std::min<size_t>(queue.size(), static_cast<size_t>(o.split_batch));
    std::vector<Piece> batch(queue.begin(), queue.begin() + static_cast<std::ptrdiff_t>(take));
    queue.erase(queue.begin(), queue.begin() + static_cast<std::ptrdiff_t>(take));
    std::vector<torch::Tensor> lo, hi;
    for (const auto& p : batch) lo.push_back(p.lower), hi.push_back(p.upper);
    const auto L = torch::stack(lo), U = torch::stack(hi);
    const auto done = refuted_boxes(box_pass(g, L, U, BoundMethod::crown), t);
    out.boxes += static_cast<int64_t>(take);
    // The open pieces' centres on the float32 model.
    const auto centre = ((L + U) * 0.5).to(torch::kFloat);
    const auto y = g32.forward(centre).flatten(1).to(torch::kDouble);
    const auto xc = centre.to(torch::kDouble).flatten(1);
    bool spent = false;
    for (size_t i = 0; i < take; ++i) {
      const auto& p = batch[i];
      if (done[static_cast<int64_t>(i)].item<bool>()) {
        refuted += std::ldexp(1.0, -p.depth);
        continue;
      }
      const auto xr = xc[static_cast<int64_t>(i)], yr = y[static_cast<int64_t>(i)];
      std::vector<double> xv(xr.data_ptr<double>(), xr.data_ptr<double>() + xr.numel());
      std::vector<double> yv(yr.data_ptr<double>(), yr.data_ptr<double>() + yr.numel());
      // The float32 centre lies in the piece when the rounding kept it there.
      const bool inside = (xr.view_as(p.lower) >= p.lower).all().item<bool>() &&
                          (xr.view_as(p.upper) <= p.upper).all().item<bool>();
      if (inside && vnnlib_case_satisfied(vc, xv, yv, 0)) {
        out.x = xv, out.y = yv;
        return -1;
      }
      if (spent || p.depth >= o.split_max_depth ||
          static_cast<int64_t>(queue.size()) + 2 > o.split_max_boxes) {
        queue.push_back(p);  // kept open: the budget is spent
        spent = true;
        continue;
      }
      auto [a, b] = bab::bisect_widest(p.lower, p.upper, free, scale);
      queue.push_back({a.first, a.second, p.depth + 1});
      queue.push_back({b.first, b.second, p.depth + 1});
    }
    if (spent) break;
    if (o.progress && Clock::now() - last_print > std::chrono::seconds(5)) {
      last_print = Clock::now();
      const double secs = std::chrono::duration<double>(last_print - begin).count();
      std::cerr << "verify: case " << case_no + 1 << " input splits: " << out.boxes - boxes0
                << " boxes (" << fmt_fixed(static_cast<double>(out.boxes - boxes0) / secs, 1)
                << " boxes/s), " << queue.size() << " queued, " << 100 * refuted
                << "% of the box refuted\n";
    }
  }
  out.refuted_fraction += refuted, out.open_fraction += open_left();
  return queue.empty() ? 1 : 0;
}

}  // namespace

VerifyOutcome verify_property(const OnnxModel& m, const VnnProperty& p, const VerifyOptions& o) {
  const auto start = Clock::now();
  const auto deadline =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.timeout));
  int64_t n = 1;
  for (int64_t d : m.input_shape) n *= d;
  if (p.num_inputs != n || p.num_outputs != m.outputs)
    throw ShapeError("verify: the property has " + std::to_string(p.num_inputs) + " inputs and " +
                     std::to_string(p.num_outputs) + " outputs; model " + m.path + " has " +
                     std::to_string(n) + " and " + std::to_string(m.outputs));
  torch::manual_seed(o.seed);
  const CompiledGraph g(m.graph, m.input_shape);
  const CompiledGraph g32(float32_graph(m.graph), m.input_shape);
  VerifyOutcome out;
  out.cases = static_cast<int64_t>(p.cases.size());
  auto finish = [&](VnnResult r, std::string detail) {
    out.result = r, out.detail = std::move(detail);
    out.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return out;
  };
  std::vector<CaseTensors> t;
  for (const auto& c : p.cases) t.push_back(tensors_of(c, m.input_shape, n, m.outputs));
  // A quick attack on every case first: a counterexample ends the run.
  for (size_t k = 0; k < p.cases.size(); ++k) {
    if (falsify(g32, p.cases[k], t[k], o, std::min<int64_t>(o.attack_steps, 20), deadline, out.x,
                out.y))
      return finish(VnnResult::violated,
                    "PGD found a counterexample in case " + std::to_string(k + 1));
    if (Clock::now() > deadline)
      return finish(VnnResult::timeout, "the quick attacks ran out of time");
  }
  std::vector<size_t> open;
  CaseBounds crown(g, BoundMethod::crown), alpha(g, BoundMethod::alpha_crown);
  for (size_t k = 0; k < p.cases.size(); ++k) {
    bool done = crown.refuted(t, k);
    if (!done && o.alpha_crown && Clock::now() < deadline) done = alpha.refuted(t, k);
    const int64_t free = (t[k].upper > t[k].lower).sum().item<int64_t>();
    if (!done && free > 0 && free <= o.split_max_inputs && Clock::now() < deadline) {
      const int r = split_case(g, g32, p.cases[k], t[k], o, deadline, k, out);
      if (r < 0)
        return finish(VnnResult::violated,
                      "input splitting found a counterexample in case " + std::to_string(k + 1));
      done = r > 0;
    }
    if (done)
      ++out.refuted;
    else
      open.push_back(k);
    if (Clock::now() > deadline) return finish(VnnResult::timeout, "bounding ran out of time");
  }
  if (open.empty())
    return finish(VnnResult::holds, "every case refuted by CROWN / α-CROWN bounds" +
                                        std::string(out.boxes ? " and input splitting" : ""));
  // The cases the bounds leave open get the full attack, round after round, until time runs out.
  for (int round = 0; Clock::now() < deadline && round < 8; ++round)
    for (size_t k : open) {
      if (falsify(g32, p.cases[k], t[k], o, o.attack_steps, deadline, out.x, out.y))
        return finish(VnnResult::violated,
                      "PGD found a counterexample in case " + std::to_string(k + 1));
      if (Clock::now() > deadline)
        return finish(VnnResult::timeout,
                      std::to_string(open.size()) + " case(s) open at the timeout");
    }
  return finish(VnnResult::unknown,
                std::to_string(open.size()) + " of " + std::to_string(out.cases) +
                    " case(s) neither refuted by the bounds nor falsified by the attack");
}

}  // namespace moecert
