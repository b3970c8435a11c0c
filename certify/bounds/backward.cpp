// The backward (CROWN) walk: rows of linear coefficients stepped from a node back to
// the graph input through each node's rule, summed where branches meet, and
// concretised over the input region (L∞ box; L2 ball, with the pixel box by weak
// duality) or, where a rule stops, over a node's interval. docs/certification.md §11–§12.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "bounds-impl.h"
#include "kernels.h"
#include "moecert/error.h"

namespace moecert::bp {
namespace {

namespace F = torch::nn::functional;

/// Every site's window of a per-sample grid tensor t [B, C, H, W] in the geometry of
/// `c`: -> [B·Ht·Wt, C, K, K] (zero outside the grid).
torch::Tensor unfold_sites(const torch::Tensor& t, const Coeffs& c) {
  const int64_t h = t.size(2), w = t.size(3), k = c.kernel, s = c.stride;
  const int64_t eh = std::max<int64_t>(0, (c.Ht - 1) * s + k - h - c.pad);
  const int64_t ew = std::max<int64_t>(0, (c.Wt - 1) * s + k - w - c.pad);
  auto padded = F::pad(t, F::PadFuncOptions({c.pad, ew, c.pad, eh}));
  auto cols = F::unfold(padded, F::UnfoldFuncOptions({k, k}).stride(s));  // [B, C·K·K, nh·nw]
  const int64_t nh = (padded.size(2) - k) / s + 1, nw = (padded.size(3) - k) / s + 1;
  cols = cols.view({t.size(0), -1, nh, nw}).narrow(2, 0, c.Ht).narrow(3, 0, c.Wt);
  return cols.permute({0, 2, 3, 1}).reshape({-1, t.size(1), k, k});
}

}  // namespace

torch::Tensor abs_dot(const Coeffs& c, const torch::Tensor& t) {
  auto peak = t.flatten(1).amax(1).index_select(0, c.sample);
  return (rows_fusable(c) ? rows_l1(c.A) : c.A.abs().flatten(1).sum(1)) * peak;
}

namespace {

/// Where each entry of patch rows `c` lies in a node of shape [C, H, W]: the flat
/// position [R, C, K, K] of each row's window entry (0 off the grid) and [R, 1, K, K]
/// whether it is on the grid.
std::pair<torch::Tensor, torch::Tensor> window_positions(const Coeffs& c, const Shape& shape) {
  const int64_t R = c.A.size(0), C = shape[0], H = shape[1], W = shape[2], K = c.kernel;
  auto opts = torch::TensorOptions().dtype(torch::kLong).device(c.A.device());
  auto local = c.site.remainder(c.Ht * c.Wt);
  auto i0 = torch::div(local, c.Wt, "floor") * c.stride - c.pad,
       j0 = local.remainder(c.Wt) * c.stride - c.pad;
  auto k = torch::arange(K, opts);
  auto y = i0.view({-1, 1, 1, 1}) + k.view({1, 1, -1, 1}),
       x = j0.view({-1, 1, 1, 1}) + k.view({1, 1, 1, -1});
  auto ch = torch::arange(C, opts).view({1, -1, 1, 1});
  auto valid = (y >= 0) & (y < H) & (x >= 0) & (x < W);
  auto flat = torch::where(valid, (ch * H + y.clamp(0, H - 1)) * W + x.clamp(0, W - 1),
                           torch::zeros_like(y));
  return {flat.expand({R, C, K, K}), valid};
}

/// A per-row tensor t [R, C, H, W] (α-CROWN's slopes of each row) in the layout of the
/// patch rows `c`: each row's window of its own map -> [R, C, K, K] (0 off the grid).
/// Differentiable in t.
torch::Tensor row_windows(const torch::Tensor& t, const Coeffs& c) {
  const int64_t R = t.size(0);
  auto [flat, valid] = window_positions(c, {t.size(1), t.size(2), t.size(3)});
  return t.reshape({R, -1}).gather(1, flat.reshape({R, -1})).view(flat.sizes()) * valid;
}

}  // namespace

/// Patch rows as dense rows over a node of shape [C, H, W] (each row's window placed at
/// its site; entries outside the grid are zero by construction).
Coeffs patches_to_dense(const Coeffs& c, const Shape& shape) {
  const int64_t R = c.A.size(0);
  auto [flat, valid] = window_positions(c, shape);
  Coeffs d;
  d.sample = c.sample;
  d.A = torch::zeros({R, shape[0] * shape[1] * shape[2]}, c.A.options())
            .scatter_add_(1, flat.reshape({R, -1}), (c.A * valid).reshape({R, -1}))
            .view({R, shape[0], shape[1], shape[2]});
  return d;
}

namespace {

/// Adds `more` into `into` (rows of the same bound rows at the same node): dense
/// tensors add; patches of equal stride are padded to a common window first.
void accumulate(std::optional<Coeffs>& into, const Coeffs& more, const Shape& shape) {
  if (!into) {
    into = more;
    return;
  }
  if (into->patches != more.patches) {  // one branch went dense: both do
    if (into->patches) *into = patches_to_dense(*into, shape);
    into->A = into->A + (more.patches ? patches_to_dense(more, shape) : more).A;
    return;
  }
  if (!more.patches) {
    into->A = into->A + more.A;
    return;
  }
  if (into->stride != more.stride)
    throw Error(ExitCode::internal, "certify: patch rows of different strides meet at one node");
  const int64_t pad = std::max(into->pad, more.pad);
  const int64_t end = std::max(into->kernel - into->pad, more.kernel - more.pad);
  auto widen = [&](const Coeffs& c) {
    const int64_t before = pad - c.pad, after = pad + end - c.kernel - before;
    return F::pad(c.A, F::PadFuncOptions({before, after, before, after}));
  };
  into->A = widen(*into) + widen(more);
  into->pad = pad, into->kernel = pad + end;
}

/// b += min over the interval [lo, hi] of Σ A·z; mag += Σ |A|·max(|lo|, |hi|).
void concretise_box(const Coeffs& c, const torch::Tensor& lo, const torch::Tensor& hi,
                    torch::Tensor& b, torch::Tensor& mag) {
  if (rows_fusable(c)) {
    auto [low, m] = rows_box(c, lo, hi);
    b = b + low, mag = mag + m;
    return;
  }
  auto g = gatherer(c);
  auto l = g(lo), h = g(hi);
  b = b + (c.A.clamp_min(0) * l + c.A.clamp_max(0) * h).flatten(1).sum(1);
  mag = mag + (c.A.abs() * torch::max(l.abs(), h.abs())).flatten(1).sum(1);
}

/// L2: b += min of Σ A·x over the ball (‖x − x0‖ <= ε) and, with the box, over
/// ball ∩ [lo, hi]: max over λ of the dual D(λ) = Σ_i min_{x_i ∈ [lo_i, hi_i]}
/// (A_i x_i + λ (x_i − x0_i)²) − λ ε², each D(λ) a lower bound (weak duality).
void concretise_ball(const Coeffs& c, const BoundPass& pass, torch::Tensor& b, torch::Tensor& mag) {
  auto g = gatherer(c);
  auto x0 = g(pass.domain.x), A = c.A;
  auto eps = pass.domain.eps.index_select(0, c.sample);
  auto norm = A.flatten(1).norm(2, 1);
  auto centre = (A * x0).flatten(1).sum(1);
  mag = mag + (A.abs() * x0.abs()).flatten(1).sum(1) + eps * norm;
  if (!pass.domain.box) {
    b = b + centre - eps * norm;
    return;
  }
  auto lo = g(pass.input.lo), hi = g(pass.input.hi);
  auto best = (A.clamp_min(0) * lo + A.clamp_max(0) * hi).flatten(1).sum(1);  // D(0): the box alone
  auto lam0 = (norm / (2 * eps.clamp_min(1e-300))).clamp_min(1e-300);         // the ball's optimum
  auto dual = [&](const torch::Tensor& t) {  // t = log(λ / λ0) [R]
    auto lam = (lam0 * torch::exp(t)).view({-1, 1});
    auto a = A.flatten(1), xc = x0.flatten(1);
    auto x = torch::max(torch::min(xc - a / (2 * lam), hi.flatten(1)), lo.flatten(1));
    auto d = x - xc;
    return (a * x + lam * d * d).sum(1) - lam.view({-1}) * eps * eps;
  };
  // Golden-section search on log λ over λ0·[e^-8, e^8] (D is concave in λ); every
  // evaluated point is a valid bound, so the best of them is kept.
  const double phi = (std::sqrt(5.0) - 1) / 2;
  auto lo_t = torch::full_like(norm, -8.0), hi_t = torch::full_like(norm, 8.0);
  auto t1 = hi_t - phi * (hi_t - lo_t), t2 = lo_t + phi * (hi_t - lo_t);
  auto f1 = dual(t1), f2 = dual(t2);
  best = torch::max(best, torch::max(f1, f2));
  for (int it = 0; it < 18; ++it) {
    auto left = f1.gt(f2);  // the maximum lies in [lo, t2]
    hi_t = torch::where(left, t2, hi_t), lo_t = torch::where(left, lo_t, t1);
    t1 = hi_t - phi * (hi_t - lo_t), t2 = lo_t + phi * (hi_t - lo_t);
    f1 = dual(t1), f2 = dual(t2);
    best = torch::max(best, torch::max(f1, f2));
  }
  b = b + best;
  mag = mag + (A.abs() * torch::max(lo.abs(), hi.abs())).flatten(1).sum(1) + best.abs();
}

}  // namespace

std::function<torch::Tensor(const torch::Tensor&)> gatherer(const Coeffs& c) {
  if (!c.patches)
    return [sample = c.sample](const torch::Tensor& t) { return t.index_select(0, sample); };
  return [c](const torch::Tensor& t) { return unfold_sites(t, c).index_select(0, c.site); };
}

Coeffs spec_rows(const torch::Tensor& C) {
  const int64_t B = C.size(0), S = C.size(1);
  Coeffs c;
  c.A = C.reshape({B * S, C.size(2)});
  c.sample = torch::arange(B, torch::TensorOptions().dtype(torch::kLong).device(C.device()))
                 .repeat_interleave(S);
  return c;
}

void concretise_input(const Coeffs& c, const BoundPass& pass, torch::Tensor& b,
                      torch::Tensor& mag) {
  if (pass.domain.norm == Norm::linf)
    concretise_box(c, pass.input.lo, pass.input.hi, b, mag);
  else
    concretise_ball(c, pass, b, mag);
}

torch::Tensor lower_rows(const BoundPass& pass, int start, Coeffs c, torch::Tensor b0,
                         const Alphas* alphas, int max_steps, int64_t* widest, RefinedRows* keep,
                         const Lagrangian* lag, bool planes) {
  const auto& nodes = pass.graph->nodes();
  std::vector<std::optional<Coeffs>> pending(static_cast<size_t>(start) + 1);
  std::optional<Coeffs> at_input;
  const torch::Tensor row_sample = c.sample;
  pending[static_cast<size_t>(start)] = std::move(c);
  torch::Tensor b = b0, mag = b0.abs();
  int steps = 0;
  std::vector<bool> skip(static_cast<size_t>(start) + 1, false);  // taken with the ReLU after it
  // The Lagrangian term rows take at node k's output, or null.
  auto lag_at = [&](int k) -> const torch::Tensor* {
    const auto at = static_cast<size_t>(k);
    return lag && at < lag->at_node.size() && lag->at_node[at].defined() ? &lag->at_node[at]
                                                                         : nullptr;
  };
  // Rows `in` over node i's output (-1: the graph input) join the rows waiting there.
  auto send = [&](int i, const Coeffs& in) {
    auto& target = i < 0 ? at_input : pending[static_cast<size_t>(i)];
    if (target) {  // rows meet: the sum's rounding, u(|A1| + |A2|)·M
      const NodeBounds& tb = i < 0 ? pass.input : pass.nodes[static_cast<size_t>(i)];
      for (const Coeffs* part : {static_cast<const Coeffs*>(&*target), &in})
        mag = mag + abs_dot(*part, tb.mag);
    }
    accumulate(target, in,
               i < 0 ? pass.graph->input_shape() : nodes[static_cast<size_t>(i)].out_shape);
  };
  for (int m = start; m >= 0; --m) {
    if (skip[static_cast<size_t>(m)]) continue;
    auto& slot = pending[static_cast<size_t>(m)];
    const torch::Tensor* extra = lag_at(m);
    if (!slot && !extra) continue;
    const auto& node = nodes[static_cast<size_t>(m)];
    Coeffs cur;
    if (slot) {
      cur = std::move(*slot);
      slot.reset();
    } else {
      cur.A = torch::zeros_like(*extra), cur.sample = row_sample;
    }
    // A window as large as the grid saves nothing (and some rules take only dense
    // rows): continue with dense rows. Rows that take a Lagrangian term here or at the
    // affine layer of an input-planes step are dense; rows with optimised slopes read
    // each row's slopes at its window (row_windows).
    const bool alpha = alphas && (*alphas)[static_cast<size_t>(m)].defined();
    const int fused = planes && max_steps < 0 ? input_planes_node(pass, m) : -1;
    if (cur.patches && (extra || (fused >= 0 && lag_at(fused)) || !node.rule->takes_patches() ||
                        cur.kernel * cur.kernel >= node.out_shape[1] * node.out_shape[2]))
      cur = patches_to_dense(cur, node.out_shape);
    torch::Tensor slopes;  // this node's α, laid out like the rows
    if (alpha) {
      const auto& a = (*alphas)[static_cast<size_t>(m)];
      slopes = cur.patches ? row_windows(a, cur) : a;
    }
    if (extra) cur.A = cur.A + *extra;
    if (widest && cur.A.size(0) > 0) *widest = std::max(*widest, cur.A.numel() / cur.A.size(0));
    const NodeBounds& out = pass.nodes[static_cast<size_t>(m)];
    auto gather = gatherer(cur);
    mag = mag + abs_dot(cur, out.mag);  // this step's rounding
    std::vector<Coeffs> ins;
    if (fused >=
        0) {  // the ReLU and the affine layer it reads, with hull planes (docs §10, input planes)
      Coeffs in = input_planes_step(pass, m, cur, slopes, lag_at(fused), b, mag);
      steps += 2;
      skip[static_cast<size_t>(fused)] = true;
      if (widest)  // a few working copies of the rows, and per unit of a row its inputs
        *widest = std::max(*widest, 4 * (cur.A.numel() / std::max<int64_t>(1, cur.A.size(0))) *
                                        (cur.patches ? 10 : 1));
      send(nodes[static_cast<size_t>(fused)].inputs[0], in);
      continue;
    }
    if (max_steps < 0 || steps < max_steps) {
      BackwardArgs args{*node.layer, node.in_shapes, node.out_shape, {}, gather, {}};
      for (int i : node.inputs)
        args.in.push_back(i < 0 ? &pass.input : &pass.nodes[static_cast<size_t>(i)]);
      args.alpha = slopes;
      ins = node.rule->backward(args, cur, b);
      ++steps;
    }
    if (ins.empty()) {  // the rule stops here (or the step budget): use this node's interval
      concretise_box(cur, out.lo, out.hi, b, mag);
      continue;
    }
    if (pass.relational()) {  // the node's own float32 rounding δ, |δ| <= r: A·δ >= −Σ|A|·r
      const auto& r = pass.round32[static_cast<size_t>(m)];
      concretise_box(cur, -r, r, b, mag);
    }
    for (size_t k = 0; k < ins.size(); ++k)
      if (ins[k].A.defined()) send(node.inputs[k], ins[k]);
  }
  if (lag && lag->at_input.defined()) {
    Coeffs term;
    term.A = lag->at_input, term.sample = row_sample;
    accumulate(at_input, term, pass.graph->input_shape());
  }
  if (keep) {
    if (at_input) keep->at_input = *at_input;
    keep->b = b, keep->mag = mag;
  }
  if (at_input) concretise_input(*at_input, pass, b, mag);
  return b - rho * mag;
}

torch::Tensor lower_rows_parallel(const BoundPass& pass, int start, const Coeffs& c,
                                  const torch::Tensor& b0, int max_steps) {
  const int64_t R = c.A.size(0), threads = std::max(1, at::get_num_threads());
  if (threads == 1 || R < 2 * threads || !rows_fusable(c))
    return lower_rows(pass, start, c, b0, nullptr, max_steps);
  const int64_t chunk = (R + threads - 1) / threads;
  std::vector<torch::Tensor> parts(static_cast<size_t>(threads));
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t from = t * chunk, len = std::min(chunk, R - from);
      if (len <= 0) continue;
      Coeffs part = c;
      part.A = c.A.narrow(0, from, len), part.sample = c.sample.narrow(0, from, len);
      if (c.site.defined()) part.site = c.site.narrow(0, from, len);
      parts[static_cast<size_t>(t)] =
          lower_rows(pass, start, part, b0.narrow(0, from, len), nullptr, max_steps);
    }
  });
  std::vector<torch::Tensor> done;
  for (auto& p : parts)
    if (p.defined()) done.push_back(p);
  return torch::cat(done);
}

}  // namespace moecert::bp
