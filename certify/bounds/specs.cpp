// Bounds of specifications C·h(x): IBP (C folded into the last layer, then
// intervals), CROWN (one backward walk), α-CROWN (the lower ReLU slopes of every row
// optimised by projected Adam steps, the best bound of any step kept); the float32
// error of each row; the interval Jacobian of rows. docs/certification.md §11–§13.
#include <optional>

#include "bounds-impl.h"

namespace moecert {
namespace {

/// α-CROWN (Xu et al., ICLR 2021): the lower slope of every unstable ReLU unit, per
/// row, is a free parameter in [0, 1]; any choice gives a sound bound, so the bound
/// is maximised by gradient ascent from CROWN's choice, projected onto [0, 1] after
/// every step. Returns the elementwise best over the steps (step 0 is CROWN).
torch::Tensor alpha_crown(const BoundPass& pass, const Coeffs& rows) {
  const auto& nodes = pass.graph->nodes();
  bp::Alphas alphas(nodes.size());
  std::vector<torch::Tensor> params;
  for (size_t m = 0; m < nodes.size(); ++m) {
    const int i = nodes[m].inputs[0];
    const auto init = nodes[m].rule->alpha_init(
        *nodes[m].layer, i < 0 ? pass.input : pass.nodes[static_cast<size_t>(i)]);
    if (!init.defined()) continue;
    alphas[m] = init.index_select(0, rows.sample).clone().requires_grad_(true);
    params.push_back(alphas[m]);
  }
  auto zeros = torch::zeros({rows.A.size(0)}, rows.A.options());
  if (params.empty()) return bp::lower_rows(pass, pass.graph->output(), rows, zeros, nullptr, -1);
  torch::optim::Adam opt(params, torch::optim::AdamOptions(pass.opt.alpha_lr));
  torch::Tensor best;
  for (int it = 0;; ++it) {
    torch::AutoGradMode grad(true);
    auto low = bp::lower_rows(pass, pass.graph->output(), rows, zeros, &alphas, -1);
    best = best.defined() ? torch::max(best, low.detach()) : low.detach();
    if (it >= pass.opt.alpha_steps) break;
    opt.zero_grad();
    (-low.sum()).backward();
    opt.step();
    torch::NoGradGuard ng;
    for (auto& p : params) p.clamp_(0.0, 1.0);
  }
  return best;
}

}  // namespace

SpecBounds bound_specs(const BoundPass& pass_in, const torch::Tensor& C,
                       const InputDomain* final_domain) {
  torch::NoGradGuard no_grad;
  // The pass's own regions: narrowing would give the pass itself.
  const bool narrow = final_domain && !torch::equal(final_domain->eps, pass_in.domain.eps);
  BoundPass narrowed;
  if (narrow) narrowed = bound_narrow(pass_in, *final_domain);
  const BoundPass& pass = narrow ? narrowed : pass_in;
  const int64_t B = C.size(0), S = C.size(1);
  const auto rows = bp::spec_rows(C);
  auto zeros = torch::zeros({B * S}, C.options());
  torch::Tensor low;
  switch (pass.opt.method) {
    case BoundMethod::ibp:  // C·(W z + b) over the interval of z: C folded into the last layer
      low = bp::lower_rows_parallel(pass, pass.graph->output(), rows, zeros, 1);
      break;
    case BoundMethod::crown_ibp:  // the same walk; the pass's intermediate bounds are IBP's
    case BoundMethod::crown:
      low = bp::lower_rows_parallel(pass, pass.graph->output(), rows, zeros, -1);
      break;
    case BoundMethod::alpha_crown:
      low = alpha_crown(pass, rows);
      break;
  }
  // float32: |C·(ĥ − h)| <= |C|·err32 of the output.
  auto err = (C.abs() * pass.nodes.back().err32.unsqueeze(1)).sum(2);
  return {low.view({B, S}), err};
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
