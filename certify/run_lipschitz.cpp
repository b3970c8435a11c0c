// The Lipschitz stage of a certification run: Theorems 5.4 / 5.5 with global
// constants and with local constants found by bisection on ε, their margins reduced
// by the float32 allowances of the balls they certify. docs/certification.md §6–§8, §14.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "moecert/error.h"
#include "run-impl.h"

namespace moecert::run {
namespace {

using Request = std::pair<int64_t, double>;                       // (sample, ε)
using Selected = std::vector<std::vector<std::vector<int64_t>>>;  // [sample][member] experts

double finite_or(double v, double fallback) { return std::isfinite(v) ? v : fallback; }

/// All Lipschitz radii of one sample from its evaluations and constants (one per member).
Radii radii_of(const Context& ctx, const std::vector<MemberEval>& ev,
               const std::vector<MemberConstants>& c, int64_t label) {
  Radii r;
  if (ctx.dual) {
    auto d = radii_dual(ev[0], c[0], ev[1], c[1], ctx.alpha, label);
    r["thm55_a"] = d.eps_a, r["thm55_b"] = d.eps_b, r["thm55"] = d.thm55,
    r["thm55_tight"] = d.tight;
  } else {
    auto s = radii_single(ev[0], c[0], label);
    r["thm54_paper"] = s.paper, r["thm54_tight"] = s.tight;
    if (!std::isnan(s.candidate)) r["thm54_candidate"] = s.candidate;
    if (!std::isnan(s.margin)) r["margin"] = s.margin;
  }
  return r;
}

/// Local (shift) constants for requests (sample, ε), docs §5 (S4). Equal requests are computed
/// once, and an expert that cannot matter on the ball keeps its (sound, larger) global constant:
/// with top-k routing and global constants, expert i matters only if selected or if it
/// could overtake a selected one, (g_top − g_i) / (2 L_g) < ε.
std::vector<std::vector<MemberConstants>> local_constants(const Context& ctx, const Batch& batch,
                                                          const Selected& selected,
                                                          const std::vector<Request>& requests) {
  const auto& cfg = ctx.cfg;
  const bool global = ctx.uses(Estimator::global);
  std::map<Request, size_t> unique;
  std::vector<Request> todo;
  std::vector<size_t> slot(requests.size());
  for (size_t r = 0; r < requests.size(); ++r) {
    auto it = unique.find(requests[r]);
    if (it == unique.end())
      it = unique.emplace(requests[r], todo.size()).first, todo.push_back(requests[r]);
    slot[r] = it->second;
  }
  std::vector<std::vector<MemberConstants>> done(todo.size());
  for (size_t k = 0; k < ctx.members.size(); ++k) {
    const auto& m = ctx.members[k];
    const int64_t E = static_cast<int64_t>(m.experts.size());
    std::vector<MemberConstants> c(todo.size(), m.global);
    for (auto& ci : c) ci.experts.resize(static_cast<size_t>(E), 0.0);
    auto run = [&](const LayerGraph& g, const std::vector<size_t>& who, double bound,
                   const std::function<void(size_t, double)>& put) {
      if (who.empty()) return;
      std::vector<int64_t> rows;
      std::vector<double> eps;
      for (auto t : who) rows.push_back(todo[t].first), eps.push_back(todo[t].second);
      auto sel = torch::tensor(rows, torch::kLong).to(ctx.device);
      auto l = lipschitz_local_shift(g, cfg.norm, batch.x.index_select(0, sel),
                                     torch::tensor(eps, torch::kFloat64).to(ctx.device), cfg.box,
                                     cfg.jacobian_crown)
                   .cpu();
      for (size_t i = 0; i < who.size(); ++i) {
        double v = l[static_cast<int64_t>(i)].item<double>();
        if (bound > 0) v = std::min(v, bound);  // both sound; the local one can exceed for p = 2
        put(who[i], v);
      }
    };
    std::vector<size_t> all(todo.size());
    std::iota(all.begin(), all.end(), size_t{0});
    // Every router, affine ones too: its shift constant (docs §5, S4) can be below the
    // global constant even where its Jacobian is constant.
    if (!m.router.empty())
      run(m.router, all, m.global.router, [&](size_t t, double v) { c[t].router = v; });
    for (int64_t i = 0; i < E; ++i) {
      std::vector<size_t> who;
      for (size_t t = 0; t < todo.size(); ++t) {
        const auto& ev = batch.evals[static_cast<size_t>(todo[t].first)][k];
        bool need = ev.g.empty() || ev.routing == Routing::soft || !global;
        if (!need) {
          const auto& sel = selected[static_cast<size_t>(todo[t].first)][k];
          need = std::find(sel.begin(), sel.end(), i) != sel.end();
          const double top = *std::max_element(ev.g.begin(), ev.g.end());
          need =
              need || (top - ev.g[static_cast<size_t>(i)]) / (2 * m.global.router) < todo[t].second;
        }
        if (need)
          who.push_back(t);
        else
          c[t].experts[static_cast<size_t>(i)] = m.global.experts[static_cast<size_t>(i)];
      }
      run(m.experts[static_cast<size_t>(i)], who,
          m.global.experts.empty() ? 0.0 : m.global.experts[static_cast<size_t>(i)],
          [&](size_t t, double v) { c[t].experts[static_cast<size_t>(i)] = v; });
    }
    for (size_t t = 0; t < todo.size(); ++t) done[t].push_back(c[t]);
  }
  std::vector<std::vector<MemberConstants>> out(requests.size());
  for (size_t r = 0; r < requests.size(); ++r) out[r] = done[slot[r]];
  return out;
}

/// Sets every sample's float32 allowances for balls of radius up to r_up[b], and the
/// robust member's alone-allowance for balls up to r_alone[b] (docs §14).
void set_fp32(const Context& ctx, Batch& batch, const std::vector<double>& r_up,
              const std::vector<double>& r_alone) {
  if (ctx.cfg.exact_arithmetic) return;
  const double u32 = std::numeric_limits<float>::epsilon() / 2;
  for (size_t k = 0; k < ctx.members.size(); ++k) {
    const auto& m = ctx.members[k];
    const double arith = 2.0 * u32 * (forms::fp32_prob_constant(m.bp) + 8.0) * 1.05;
    auto at = [&](const std::vector<double>& r) {
      return member_fp32_errors(m, batch.x, torch::tensor(r, torch::kFloat64).to(ctx.device),
                                ctx.cfg);
    };
    const auto err = at(r_up);
    const auto alone = ctx.dual && k == 1 ? at(r_alone) : err;
    auto tie = forms::fp32_tie(err.hmax, m.bp.classes).cpu();
    auto logit = err.logit.cpu(), router = err.router.cpu();
    auto alone_sum = (alone.logit + alone.router).cpu();
    for (int64_t b = 0; b < batch.size(); ++b) {
      auto& ev = batch.evals[static_cast<size_t>(b)][k];
      const double el = logit[b].item<double>(), er = router[b].item<double>();
      ev.fp32_prob = el + er + arith;
      ev.fp32_prob_alone = alone_sum[b].item<double>() + arith;
      ev.fp32_const = arith;
      ev.fp32_logit = 2 * el + tie[b].item<double>();
      ev.fp32_gap = 2 * er;
    }
  }
}

/// Local radii: per form, the largest probe ε whose ball's constants certify ε
/// (docs §6, "With local constants"). Writes "<form>_local" and constants_local.
void bisect_local(const Context& ctx, Batch& batch, const Selected& selected,
                  const std::vector<Radii>& global_radii,
                  const std::vector<std::vector<MemberConstants>>& at0) {
  const auto& cfg = ctx.cfg;
  const int64_t B = batch.size();
  auto label = [&](int64_t b) { return batch.labels[b].item<int64_t>(); };
  std::vector<std::string> forms;
  for (const auto& [form, r] : radii_of(ctx, batch.evals[0], at0[0], label(0)))
    forms.push_back(form);
  // Every probe (ε, constants valid on B_p(x, ε)) at which any form certifies ε is a
  // certificate of radius ε for that form, so each form keeps the largest such probe.
  // At equal constants the tight form certifies whenever the paper form does.
  const std::string main_form =
      ctx.dual ? "thm55_tight"
               : (std::count(forms.begin(), forms.end(), "thm54_candidate") ? "thm54_candidate"
                                                                            : "thm54_tight");
  const auto F = static_cast<int64_t>(forms.size());
  std::vector<double> lo(static_cast<size_t>(F * B), 0.0), hi(static_cast<size_t>(F * B), 0.0);
  std::vector<Radii> best(static_cast<size_t>(B));
  std::vector<std::vector<MemberConstants>> main_consts(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const auto ub = static_cast<size_t>(b);
    auto r0 = radii_of(ctx, batch.evals[ub], at0[ub], label(b));
    for (int64_t f = 0; f < F; ++f) {
      const auto& form = forms[static_cast<size_t>(f)];
      const auto u = static_cast<size_t>(f * B + b);
      hi[u] = finite_or(r0[form], cfg.empirical_max * 4);
      // Global constants bound the local ones: the global radius is certified locally too.
      best[ub][form] = ctx.uses(Estimator::global)
                           ? std::min(hi[u], finite_or(global_radii[ub].at(form), 0.0))
                           : 0.0;
      lo[u] = best[ub][form];
    }
  }
  for (int it = 0; it < cfg.bisect_steps; ++it) {
    std::vector<Request> req;
    std::vector<size_t> req_u;
    for (int64_t f = 0; f < F; ++f)
      for (int64_t b = 0; b < B; ++b) {
        const auto u = static_cast<size_t>(f * B + b);
        if (hi[u] > lo[u]) req.emplace_back(b, 0.5 * (lo[u] + hi[u])), req_u.push_back(u);
      }
    if (req.empty()) break;
    auto consts = local_constants(ctx, batch, selected, req);
    for (size_t r = 0; r < req.size(); ++r) {
      const auto u = req_u[r];
      const auto [b, mid] = req[r];
      const auto ub = static_cast<size_t>(b);
      auto rad = radii_of(ctx, batch.evals[ub], consts[r], label(b));
      for (const auto& g : forms) {
        if (!(rad[g] >= mid) || mid < best[ub][g]) continue;
        best[ub][g] = mid;
        if (g == main_form) main_consts[ub] = consts[r];
      }
      (rad[forms[u / static_cast<size_t>(B)]] >= mid ? lo[u] : hi[u]) = mid;
    }
  }
  // The constants behind the main local certificate, at its radius.
  std::vector<Request> main_req;
  for (int64_t b = 0; b < B; ++b)
    if (main_consts[static_cast<size_t>(b)].empty())
      main_req.emplace_back(b, best[static_cast<size_t>(b)][main_form]);
  auto missing = local_constants(ctx, batch, selected, main_req);
  for (size_t r = 0; r < main_req.size(); ++r)
    main_consts[static_cast<size_t>(main_req[r].first)] = missing[r];
  for (int64_t b = 0; b < B; ++b) {
    const auto ub = static_cast<size_t>(b);
    for (const auto& f : forms) batch.radii[ub][RadiusKey{f, Estimator::local}] = best[ub][f];
    batch.extra[ub]["constants_local"] = {{"eps", best[ub][main_form]},
                                          {"form", main_form},
                                          {"constants", constants_json(ctx.dual, main_consts[ub])}};
  }
}

}  // namespace

void lipschitz_stage(const Context& ctx, Batch& batch) {
  const bool global = ctx.uses(Estimator::global), local = ctx.uses(Estimator::local);
  if (!global && !local) return;
  const int64_t B = batch.size();
  std::vector<MemberConstants> gc;
  for (const auto& m : ctx.members) gc.push_back(m.global);
  auto label = [&](int64_t b) { return batch.labels[b].item<int64_t>(); };
  // Without allowances first: the largest radius any form could report bounds the balls
  // whose float32 errors the allowances must cover.
  std::vector<double> r_up(static_cast<size_t>(B), 0.0), r_alone(static_cast<size_t>(B), 0.0);
  auto widen = [&](size_t b, const Radii& r) {
    for (const auto& [form, v] : r) {
      const double f = finite_or(v, ctx.cfg.empirical_max * 4);
      r_up[b] = std::max(r_up[b], f);
      if (form == "thm55_b") r_alone[b] = std::max(r_alone[b], f);
    }
  };
  Selected selected(static_cast<size_t>(B));
  for (size_t b = 0; b < static_cast<size_t>(B); ++b)
    for (size_t k = 0; k < ctx.members.size(); ++k)
      selected[b].push_back(global ? member_view(batch.evals[b][k], ctx.members[k].global).selected
                                   : std::vector<int64_t>{});
  if (global)
    for (int64_t b = 0; b < B; ++b)
      widen(static_cast<size_t>(b),
            radii_of(ctx, batch.evals[static_cast<size_t>(b)], gc, label(b)));
  std::vector<std::vector<MemberConstants>> at0;
  if (local) {
    // ε = 0: the exact gradient at x bounds every certifiable ε from above.
    std::vector<Request> zero;
    for (int64_t b = 0; b < B; ++b) zero.emplace_back(b, 0.0);
    at0 = local_constants(ctx, batch, selected, zero);
    for (int64_t b = 0; b < B; ++b)
      widen(static_cast<size_t>(b), radii_of(ctx, batch.evals[static_cast<size_t>(b)],
                                             at0[static_cast<size_t>(b)], label(b)));
  }
  set_fp32(ctx, batch, r_up, r_alone);
  std::vector<Radii> global_radii(static_cast<size_t>(B));
  if (global)
    for (int64_t b = 0; b < B; ++b) {
      const auto ub = static_cast<size_t>(b);
      global_radii[ub] = radii_of(ctx, batch.evals[ub], gc, label(b));
      for (const auto& [form, r] : global_radii[ub])
        batch.radii[ub][RadiusKey{form, Estimator::global}] = r;
    }
  if (local) bisect_local(ctx, batch, selected, global_radii, at0);
}

}  // namespace moecert::run
