// Bounds of specifications C·h(x): IBP (C folded into the last layer, then
// intervals), CROWN (one backward walk), α-CROWN (the lower ReLU slopes of every row
// optimised by projected Adam steps, the best bound of any step kept); the float32
// error of each row; the interval Jacobian of rows. docs/certification.md §11–§13.
#include <optional>

#include "bounds-impl.h"

namespace moecert {

/// α-CROWN (Xu et al., ICLR 2021): the lower slope of every unstable ReLU unit, per
/// row, is a free parameter in [0, 1]; any choice gives a sound bound, so the bound
/// is maximised by gradient ascent from CROWN's choice, projected onto [0, 1] after
/// every step. Returns the elementwise best over the steps (step 0 is CROWN).
/// β-CROWN (Wang et al., NeurIPS 2021; docs §22): on a split pass, every split unit z
/// with sign s adds −β·s·z (β >= 0) to the rows where they reach its node, and every
/// input constraint D_i·x <= e_i adds β_i·(D_i·x − e_i); on the restricted region both
/// terms are <= 0, so every β >= 0 gives a lower bound there. The β are optimised with
/// the slopes and projected onto β >= 0.
torch::Tensor bp::alpha_rows(const BoundPass& pass, int start, const Coeffs& rows,
                             const InputConstraints* ic, int steps, torch::Tensor* primal,
                             const RowParams* warm, RowParams* best_params, bool planes_last) {
  const auto& nodes = pass.graph->nodes();
  const int64_t R = rows.A.size(0);
  // A warm start's value where its row has one, `init` elsewhere.
  auto start_from = [&](const std::vector<torch::Tensor>* of, size_t m, const torch::Tensor& init) {
    if (!warm || !warm->has.defined() || !of || m >= of->size() || !(*of)[m].defined()) return init;
    std::vector<int64_t> per(static_cast<size_t>(init.dim()), 1);
    per[0] = R;
    const auto& w = (*of)[m];
    return torch::where(warm->has.to(init.device()).view(per), w.to(init.options()), init);
  };
  bp::Alphas alphas(nodes.size());
  std::vector<torch::Tensor> params, betas;
  // The nodes a walk from `start` reaches: those up to it (the later ones may not be bounded yet).
  for (size_t m = 0; m <= static_cast<size_t>(start); ++m) {
    const int i = nodes[m].inputs[0];
    const auto init = nodes[m].rule->alpha_init(
        *nodes[m].layer, i < 0 ? pass.input : pass.nodes[static_cast<size_t>(i)]);
    if (!init.defined()) continue;
    alphas[m] = start_from(warm ? &warm->alpha : nullptr, m, init.index_select(0, rows.sample))
                    .clone()
                    .requires_grad_(true);
    params.push_back(alphas[m]);
  }
  // The split units' signs per row, and their multipliers.
  std::vector<torch::Tensor> signs(nodes.size()), beta(nodes.size());
  for (size_t m = 0; m < pass.split.size(); ++m) {
    if (!pass.split[m].defined()) continue;
    auto s = pass.split[m].index_select(0, rows.sample);
    if (!s.ne(0).any().item<bool>()) continue;
    signs[m] = s;
    beta[m] = start_from(warm ? &warm->beta : nullptr, m, torch::zeros_like(s))
                  .clone()
                  .requires_grad_(true);
    betas.push_back(beta[m]);
  }
  torch::Tensor D, e, beta_in;
  if (ic && ic->D.defined() && ic->D.size(1) > 0) {
    D = ic->D.index_select(0, rows.sample), e = ic->e.index_select(0, rows.sample);
    beta_in = torch::zeros({R, D.size(1)}, D.options());
    if (warm && warm->beta_in.defined() && warm->beta_in.size(1) == D.size(1)) {
      const std::vector<torch::Tensor> one{warm->beta_in};
      beta_in = start_from(&one, 0, beta_in);
    }
    beta_in = beta_in.clone().requires_grad_(true);
    betas.push_back(beta_in);
  }
  // The parameters of each row's best step so far (best_params).
  RowParams snap;
  auto keep_best = [&](const torch::Tensor& better) {
    if (!best_params) return;
    torch::NoGradGuard ng;
    auto take = [&](torch::Tensor& to, const torch::Tensor& p) {
      if (!p.defined()) return;
      auto v = p.detach().to(torch::kFloat32);
      if (!to.defined()) {
        to = v.clone();
        return;
      }
      std::vector<int64_t> per(static_cast<size_t>(v.dim()), 1);
      per[0] = R;
      to = torch::where(better.view(per), v, to);
    };
    snap.alpha.resize(nodes.size()), snap.beta.resize(nodes.size());
    for (size_t m = 0; m < nodes.size(); ++m)
      take(snap.alpha[m], alphas[m]), take(snap.beta[m], beta[m]);
    take(snap.beta_in, beta_in);
  };
  auto zeros = torch::zeros({R}, rows.A.options());
  RefinedRows kept;  // the last step's rows at the input, for `primal`
  if (params.empty() && betas.empty()) {
    auto low =
        bp::lower_rows(pass, start, rows, zeros, nullptr, -1, nullptr, primal ? &kept : nullptr);
    if (primal) *primal = primal_points(pass, kept, rows.sample);
    return low;
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!params.empty())
    groups.emplace_back(params, std::make_unique<torch::optim::AdamOptions>(pass.opt.alpha_lr));
  if (!betas.empty())
    groups.emplace_back(betas, std::make_unique<torch::optim::AdamOptions>(pass.opt.beta_lr));
  torch::optim::Adam opt(groups, torch::optim::AdamOptions(pass.opt.alpha_lr));
  torch::Tensor best;
  for (int it = 0;; ++it) {
    torch::AutoGradMode grad(true);
    bp::Lagrangian lag;
    lag.at_node.resize(nodes.size());
    for (size_t m = 0; m < nodes.size(); ++m)
      if (beta[m].defined()) lag.at_node[m] = -signs[m] * beta[m];
    auto b0 = zeros;
    if (beta_in.defined()) {
      std::vector<int64_t> shape{R, D.size(1)};
      for (int64_t d = 2; d < D.dim(); ++d) shape.push_back(1);
      lag.at_input = (beta_in.view(shape) * D).sum(1);
      b0 = -(beta_in * e).sum(1);
    }
    auto low = bp::lower_rows(
        pass, start, rows, b0, &alphas, -1, nullptr, primal && it >= steps ? &kept : nullptr,
        betas.empty() ? nullptr : &lag, !planes_last || it == 0 || it >= steps);
    keep_best(best.defined() ? low.detach().gt(best)
                             : torch::ones({R}, low.options().dtype(torch::kBool)));
    best = best.defined() ? torch::max(best, low.detach()) : low.detach();
    if (it >= steps) break;
    opt.zero_grad();
    (-low.sum()).backward();
    opt.step();
    torch::NoGradGuard ng;
    for (auto& p : params) p.clamp_(0.0, 1.0);
    for (auto& p : betas) p.clamp_min_(0.0);
  }
  if (primal) *primal = primal_points(pass, kept, rows.sample);
  if (best_params) {
    snap.has = torch::ones({R}, torch::kBool);
    *best_params = std::move(snap);
  }
  return best;
}

/// Each row's minimiser over its sample's region (SpecBounds::primal, bounds-impl.h).
torch::Tensor bp::primal_points(const BoundPass& pass, const RefinedRows& kept,
                                const torch::Tensor& sample) {
  torch::NoGradGuard ng;
  const auto& in = pass.graph->input_shape();
  // The region's own box (the pass's input box is widened by the rounding allowance).
  const auto& d = pass.domain;
  auto [lo_all, hi_all] = bp::region_ends(d);
  auto lo = lo_all.index_select(0, sample), hi = hi_all.index_select(0, sample);
  auto centre = (lo + hi) * 0.5;
  if (!kept.at_input.A.defined()) return centre;  // no row reached the input: constant
  const Coeffs dense =
      kept.at_input.patches ? bp::patches_to_dense(kept.at_input, in) : kept.at_input;
  const auto A = dense.A.detach().view(lo.sizes());  // the rows, in order
  if (d.norm == Norm::linf)  // each coordinate at the end its coefficient prefers
    return torch::where(A.gt(0), lo, torch::where(A.lt(0), hi, centre));
  // L2: x − ε·A/‖A‖ minimises A·x over the ball; the box then clamps it.
  std::vector<int64_t> per(in.size() + 1, 1);
  per[0] = -1;
  auto norm = A.flatten(1).norm(2, 1).clamp_min(1e-300).view(per);
  auto x = d.x.index_select(0, sample) - d.eps.index_select(0, sample).view(per) * A / norm;
  return d.box ? x.clamp(0.0, 1.0) : x;
}

SpecBounds bound_spec_rows(const BoundPass& pass, const torch::Tensor& C,
                           const torch::Tensor& sample, const InputConstraints* constraints,
                           const RowParams* warm, RowParams* best) {
  torch::NoGradGuard no_grad;
  Coeffs rows;
  rows.A = C, rows.sample = sample;
  auto zeros = torch::zeros({C.size(0)}, C.options());
  torch::Tensor low, primal;
  switch (pass.opt.method) {
    case BoundMethod::ibp:  // C·(W z + b) over the interval of z: C folded into the last layer
      low = bp::lower_rows_parallel(pass, pass.graph->output(), rows, zeros, 1);
      break;
    case BoundMethod::crown_ibp:  // the same walk; the pass's intermediate bounds are IBP's
    case BoundMethod::crown:
      low = bp::lower_rows_parallel(pass, pass.graph->output(), rows, zeros, -1);
      break;
    case BoundMethod::alpha_crown:
      low = bp::alpha_rows(pass, pass.graph->output(), rows, constraints, pass.opt.alpha_steps,
                           pass.opt.primal ? &primal : nullptr, warm, best);
      break;
  }
  // float32: |C·(ĥ − h)| <= |C|·err32 of the output.
  auto err = (C.abs() * pass.nodes.back().err32.index_select(0, sample)).sum(1);
  return {low, err, primal};
}

SpecBounds bound_specs(const BoundPass& pass_in, const torch::Tensor& C,
                       const InputDomain* final_domain, const InputConstraints* constraints) {
  torch::NoGradGuard no_grad;
  // The pass's own regions: narrowing would give the pass itself.
  const bool narrow = final_domain && !torch::equal(final_domain->eps, pass_in.domain.eps);
  BoundPass narrowed;
  if (narrow) narrowed = bound_narrow(pass_in, *final_domain);
  const BoundPass& pass = narrow ? narrowed : pass_in;
  const int64_t B = C.size(0), S = C.size(1);
  const auto rows = bp::spec_rows(C);
  auto sb = bound_spec_rows(pass, rows.A, rows.sample, constraints);
  return {sb.lower.view({B, S}), sb.err32.view({B, S}), sb.primal};
}

LinearBounds bound_linear(const BoundPass& pass, const torch::Tensor& C) {
  torch::NoGradGuard no_grad;
  const int64_t B = C.size(0), S = C.size(1);
  const auto rows = bp::spec_rows(C);
  RefinedRows keep;
  bp::lower_rows(pass, pass.graph->output(), rows, torch::zeros({B * S}, C.options()), nullptr, -1,
                 nullptr, &keep);
  const Shape& in = pass.graph->input_shape();
  std::vector<int64_t> shape{B * S};
  shape.insert(shape.end(), in.begin(), in.end());
  torch::Tensor A = torch::zeros(shape, C.options());
  auto mag = keep.mag;
  if (keep.at_input.A.defined()) {
    const Coeffs dense =
        keep.at_input.patches ? bp::patches_to_dense(keep.at_input, in) : keep.at_input;
    A = dense.A;
    // The float64 sum A·x at any x of the region: |A|·max|x| more magnitude.
    auto peak = torch::max(pass.input.lo.abs(), pass.input.hi.abs()).index_select(0, dense.sample);
    mag = mag + (A.abs() * peak).flatten(1).sum(1);
  }
  std::vector<int64_t> out{B, S};
  out.insert(out.end(), in.begin(), in.end());
  return {A.view(out), (keep.b - bp::rho * mag).view({B, S})};
}

torch::Tensor bound_jacobian_norms(const BoundPass& pass, const torch::Tensor& C) {
  torch::NoGradGuard no_grad;
  const auto& nodes = pass.graph->nodes();
  const int64_t B = C.size(0), S = C.size(1);
  const auto rows = bp::spec_rows(C);
  auto gather = bp::gatherer(rows);
  std::vector<std::optional<JacobianBox>> pending(nodes.size());
  std::optional<JacobianBox> at_input;
  pending.back() = JacobianBox{rows.A, torch::zeros_like(rows.A)};
  for (int m = static_cast<int>(nodes.size()) - 1; m >= 0; --m) {
    auto& slot = pending[static_cast<size_t>(m)];
    if (!slot) continue;
    const auto& node = nodes[static_cast<size_t>(m)];
    BackwardArgs args{*node.layer, node.in_shapes, node.out_shape, {}, gather, {}};
    for (int i : node.inputs)
      args.in.push_back(i < 0 ? &pass.input : &pass.nodes[static_cast<size_t>(i)]);
    auto ins = node.rule->jacobian(args, *slot);
    slot.reset();
    for (size_t k = 0; k < ins.size(); ++k) {
      const int i = node.inputs[k];
      auto& target = i < 0 ? at_input : pending[static_cast<size_t>(i)];
      if (target)
        target = JacobianBox{target->c + ins[k].c, target->r + ins[k].r};
      else
        target = ins[k];
    }
  }
  auto magnitude = (at_input->c.abs() + at_input->r).flatten(1);  // max |J| over the interval
  auto norms = pass.domain.norm == Norm::linf ? magnitude.sum(1) : magnitude.pow(2).sum(1).sqrt();
  return norms.view({B, S});
}

}  // namespace moecert
