// VNN-COMP properties on ONNX models (include/moecert/verify.h). Soundness of "holds":
// a case is refuted only when, for one of its constraints a·Y + b·X <= rhs, a lower bound
// of a·Ŷ over the case's box (Ŷ the float32 model's output: the exact-real lower bound of
// bound_specs minus its float32 error bound) plus the exact minimum of b·X over the box
// exceeds rhs; no counterexample then exists in that case (docs/certification.md §21).
#include "moecert/verify.h"

#include <torch/torch.h>

#include <chrono>
#include <cmath>

#include "moecert/bounds.h"
#include "moecert/error.h"

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

/// Whether some constraint of the case is impossible over its box (the case refuted).
bool refuted(const CompiledGraph& g, const CaseTensors& t, BoundMethod method) {
  if (t.C.size(1) == 0) return false;
  InputDomain d;
  d.x = (t.lower + t.upper) * 0.5;
  d.eps = ((t.upper - t.lower) * 0.5).flatten().max().view({1});
  d.norm = Norm::linf, d.box = false;
  d.lower = t.lower, d.upper = t.upper;
  BoundOptions opt;
  opt.method = method;
  const auto pass = bound_forward(g, d, opt);
  const auto sb = bound_specs(pass, t.C);
  // min over the box of b·x (separable), and L − E + m, in float64: the rounding of these
  // n + 3 operations is at most γ_{n+3} times the magnitudes summed (docs §21).
  const auto l = t.lower.flatten(), u = t.upper.flatten();
  const auto xmin = torch::minimum(t.D * l, t.D * u).sum(1);
  const auto xmag = (t.D.abs() * torch::maximum(l.abs(), u.abs())).sum(1);
  const double unit = std::ldexp(1.0, -53), k = static_cast<double>(l.numel() + 3);
  const double gamma = k * unit / (1 - k * unit);
  const auto lower = sb.lower[0], err = sb.err32[0];
  const auto low = lower - err + xmin - gamma * (lower.abs() + err + xmag);
  // rhs is the parser's float64 normal form (constants moved across, coefficients
  // scaled): allow it γ_{n+3} relative too.
  return low.gt(t.rhs + gamma * t.rhs.abs()).any().item<bool>();
}

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
  for (size_t k = 0; k < p.cases.size(); ++k) {
    bool done = refuted(g, t[k], BoundMethod::crown);
    if (!done && o.alpha_crown && Clock::now() < deadline)
      done = refuted(g, t[k], BoundMethod::alpha_crown);
    if (done)
      ++out.refuted;
    else
      open.push_back(k);
    if (Clock::now() > deadline) return finish(VnnResult::timeout, "bounding ran out of time");
  }
  if (open.empty()) return finish(VnnResult::holds, "every case refuted by CROWN / α-CROWN bounds");
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
