// The bound-propagation stage of a certification run: for IBP, CROWN and α-CROWN in
// turn, the radius search of the model's form (margin, candidate, mixture or dual).
// docs/certification.md §10–§14.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "run-impl.h"
#include "search.h"

namespace moecert::run {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

BoundMethod method_of(Estimator e) {
  return e == Estimator::ibp         ? BoundMethod::ibp
         : e == Estimator::crown_ibp ? BoundMethod::crown_ibp
         : e == Estimator::crown     ? BoundMethod::crown
                                     : BoundMethod::alpha_crown;
}

/// The member whose form sets the guess: the robust one of a dual-model.
const Member& leading(const Context& ctx) { return ctx.members.back(); }

/// The linearised distance of every sample to its decision boundary (docs §15): for
/// the expert the router picks at x, min_k (h_y − h_k) / ‖∇(h_y − h_k)‖_q, and for a
/// top-k router the same for its logit gaps. Only the search's first guess: gradients
/// by autograd of the float64 graph. [B]
torch::Tensor linearised_distance(const Context& ctx, const Batch& batch) {
  const Member& m = leading(ctx);
  const int64_t B = batch.size();
  const auto o = batch.x.options();
  // min over j of (v_i − v_j) / ‖∇(v_i − v_j)‖_q for the outputs v of `net` at x, with
  // i given by the one-hot rows `first` [n, 1, N]. [n]
  auto distance = [&](const LayerGraph& net, const torch::Tensor& x, const torch::Tensor& first) {
    const int64_t n = x.size(0), N = first.size(2);
    auto C = (first - torch::eye(N, o).unsqueeze(0)).reshape({n * N, N});
    torch::AutoGradMode grad_on(true);
    auto xr = x.repeat_interleave(N, 0).detach().requires_grad_(true);
    auto gap = (graph_forward(net, xr) * C).sum(1);
    auto g = torch::autograd::grad({gap.sum()}, {xr})[0].flatten(1);
    auto norm = (ctx.cfg.norm == Norm::linf ? g.abs().sum(1) : g.norm(2, 1)).view({n, N});
    return (gap.detach().view({n, N}) / norm.clamp_min(1e-12))
        .masked_fill(norm.le(0), kInf)
        .amin(1);
  };
  auto dist = torch::full({B}, kInf, o);
  std::vector<int64_t> top(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    const auto& g = batch.evals[static_cast<size_t>(b)].back().g;
    if (!g.empty()) top[static_cast<size_t>(b)] = std::max_element(g.begin(), g.end()) - g.begin();
  }
  auto tops = torch::tensor(top, torch::kLong).to(batch.x.device());
  auto ey = torch::nn::functional::one_hot(batch.labels.to(batch.x.device()), m.bp.classes)
                .to(o)
                .unsqueeze(1);
  for (int64_t j = 0; j < m.bp.experts; ++j) {
    auto rows = tops.eq(j).nonzero().flatten();
    if (rows.numel() == 0) continue;
    const auto uj = static_cast<size_t>(j);
    auto r = distance(m.experts[uj], batch.x.index_select(0, rows), ey.index_select(0, rows));
    dist.index_copy_(0, rows, r.clamp_min(0));
  }
  if (m.bp.router && m.bp.routing == Routing::top_k && m.bp.top_k < m.bp.experts) {
    auto et = torch::nn::functional::one_hot(tops, m.bp.experts).to(o).unsqueeze(1);
    dist = torch::min(dist, distance(m.router, batch.x, et));
  }
  return dist;
}

/// The full pass and probes of the model's form for the samples `rows`, seeded by an
/// earlier pass of theirs over larger regions.
search::Pass prepare(const Context& ctx, const Batch& batch, const BoundOptions& opt,
                     const torch::Tensor& rows, const torch::Tensor& eps_i,
                     const search::Pass* seed, const torch::Tensor& seed_index) {
  using Passes = std::vector<forms::MemberPass>;
  auto x = batch.x.index_select(0, rows);
  auto labels = batch.labels.to(batch.x.device()).index_select(0, rows);
  const InputDomain di{x, eps_i, ctx.cfg.norm, ctx.cfg.box};
  const bool fp32 = !ctx.cfg.exact_arithmetic;
  const auto* from = seed ? static_cast<const Passes*>(seed->state.get()) : nullptr;
  auto p = std::make_shared<Passes>();
  for (size_t i = 0; i < ctx.members.size(); ++i)
    p->push_back(forms::member_prepare(ctx.members[i].bp, di, labels, opt, fp32,
                                       from ? &(*from)[i] : nullptr, seed_index));
  search::Prober probe;
  if (ctx.dual) {
    probe = [&ctx, p, x, labels](const torch::Tensor& eps) {
      return forms::dual_evaluate((*p)[0], (*p)[1], ctx.alpha, {x, eps, ctx.cfg.norm, ctx.cfg.box},
                                  labels)
          .slack;
    };
  } else {
    probe = [&ctx, p, x, labels](const torch::Tensor& eps) {
      return forms::member_evaluate((*p)[0], {x, eps, ctx.cfg.norm, ctx.cfg.box}, labels).slack;
    };
  }
  return {probe, p};
}

}  // namespace

void bound_stage(const Context& ctx, Batch& batch) {
  const auto& cfg = ctx.cfg;
  const std::string form =
      ctx.dual ? "dual" : forms::form_name(forms::member_form(ctx.members[0].bp));
  const auto todo = batch.correct.to(batch.x.device());
  torch::Tensor linear, previous, failed;
  for (Estimator e :
       {Estimator::ibp, Estimator::crown_ibp, Estimator::crown, Estimator::alpha_crown}) {
    if (!ctx.uses(e)) continue;
    if (!linear.defined()) linear = linearised_distance(ctx, batch);
    BoundOptions opt;
    opt.method = method_of(e);
    opt.alpha_steps = cfg.alpha_steps;
    opt.input_planes = cfg.input_planes;
    // Relational float32 errors where per-node worst cases compound (docs §12); an
    // exact-arithmetic run reads no float32 error at all.
    opt.fp32 = cfg.exact_arithmetic ? Float32Errors::per_node : Float32Errors::automatic;
    search::Config sc;
    sc.rounds = e == Estimator::alpha_crown ? cfg.alpha_rounds : cfg.search_rounds;
    // An α-CROWN probe is an optimisation of its own: two probes below a failed pass.
    if (e == Estimator::alpha_crown) sc.scan = {0.97, 0.93}, sc.bisections = 0;
    sc.tol = cfg.search_tol;
    sc.grid = cfg.eps_grid.values();
    sc.cap = cfg.norm == Norm::linf && cfg.box ? 1.0 : cfg.empirical_max * 4;
    // The first full pass: a fixed share of the linearised distance (on the demo MoE the
    // median ratio of the CROWN radius to it is 0.59 for p = ∞ and 0.10 for p = 2, of the
    // dual-model's to its robust member's 0.25 for p = ∞; IBP's radii are far smaller).
    // For p = 2 the share shrinks with the input size d as min(1, 4.7/sqrt(d)) (1/6 at
    // d = 784; 1 on the 2-D toys, where CROWN is nearly exact). Only tightness depends
    // on it, never soundness. Fixed, so that a sample's radius never depends on the
    // batches before it (shards merge exactly).
    const double d = static_cast<double>(batch.x[0].numel());
    const double p2 = cfg.norm == Norm::l2 ? std::min(1.0, 4.7 / std::sqrt(d)) : 1.0;
    // CROWN-IBP's share is IBP's and CROWN's geometric middle (not measured on its own).
    const double crown_share = ctx.dual ? 0.3 : 0.6;
    const double share = (e == Estimator::ibp         ? 0.1
                          : e == Estimator::crown_ibp ? std::sqrt(0.1 * crown_share)
                                                      : crown_share) *
                         p2;
    auto guess = (linear * share).clamp_max(sc.cap);
    auto lo = torch::zeros_like(guess);
    // α-CROWN bounds are never below CROWN's (its first step is CROWN): start there,
    // with a first full pass where CROWN's failed.
    if (e == Estimator::alpha_crown && previous.defined())
      lo = previous, guess = torch::where(failed.isinf(), previous * 1.1, failed);
    auto res = search::radius_search(
        [&](const torch::Tensor& rows, const torch::Tensor& eps_i, const search::Pass* seed,
            const torch::Tensor& seed_index) {
          return prepare(ctx, batch, opt, rows, eps_i, seed, seed_index);
        },
        todo, guess, lo, sc);
    auto r = torch::where(todo, res.radius, torch::zeros_like(res.radius)).cpu();
    for (int64_t b = 0; b < batch.size(); ++b)
      batch.radii[static_cast<size_t>(b)][RadiusKey{form, e}] = r[b].item<double>();
    if (e == Estimator::crown) previous = res.radius, failed = res.failed;
  }
}

}  // namespace moecert::run
