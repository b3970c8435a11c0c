// The certification run (SPEC §4): float64 graphs of every router and expert,
// global and local constants, per-sample radii of every bound form (local radii by
// bisection on ε), the PGD-bisection empirical radius, and results.json.
#include "moecert/certify.h"
#include "moecert/checkpoint.h"
#include "moecert/defaults.h"
#include "moecert/error.h"
#include "moecert/runtime.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <numeric>

namespace moecert {
namespace {

using Shape = std::vector<int64_t>;
using Radii = std::map<std::string, double>;
constexpr double kInf = std::numeric_limits<double>::infinity();

/// The float64 graphs and global constants of one MoE.
struct MemberGraphs {
  MoeImpl* model = nullptr;
  LayerGraph router;
  std::vector<LayerGraph> experts;
  MemberConstants global;
  std::vector<GlobalBound> global_detail;  // router first (if any), then experts
};

MemberGraphs member_graphs(MoeImpl& m, Norm p, bool global) {
  MemberGraphs g;
  g.model = &m;
  const auto& s = m.spec();
  const Shape input{s.in_channels, s.height, s.width};
  if (s.experts > 1) g.router = m.component_graph(-1);
  for (int64_t i = 0; i < s.experts; ++i) g.experts.push_back(m.component_graph(i));
  if (global) {
    if (!g.router.empty()) {
      g.global_detail.push_back(lipschitz_global(g.router, p, input));
      g.global.router = g.global_detail.back().value;
    }
    for (const auto& e : g.experts) {
      g.global_detail.push_back(lipschitz_global(e, p, input));
      g.global.experts.push_back(g.global_detail.back().value);
    }
  }
  return g;
}

/// Logits of a batch: router [B, E] (undefined if dense) and each expert [B, C].
struct MemberBatch {
  torch::Tensor g;
  std::vector<torch::Tensor> h;
};

MemberBatch member_evaluate(const MemberGraphs& m, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  MemberBatch b;
  if (!m.router.empty()) b.g = graph_forward(m.router, x).cpu();
  for (const auto& e : m.experts) b.h.push_back(graph_forward(e, x).cpu());
  return b;
}

std::vector<double> row_of(const torch::Tensor& t, int64_t b) {
  auto r = t[b].contiguous();
  return std::vector<double>(r.data_ptr<double>(), r.data_ptr<double>() + r.numel());
}

MemberEval member_eval(const MemberGraphs& m, const MemberBatch& batch, int64_t b) {
  MemberEval e;
  if (batch.g.defined()) e.g = row_of(batch.g, b);
  for (const auto& h : batch.h) e.h.push_back(row_of(h, b));
  e.routing = m.model->spec().routing;
  e.top_k = m.model->spec().top_k;
  return e;
}

nlohmann::json constants_json(const MemberConstants& c) {
  nlohmann::json j = {{"experts", c.experts}};
  if (c.router > 0 || !c.experts.empty()) j["router"] = c.router;
  return j;
}

double finite_or(double v, double fallback) { return std::isfinite(v) ? v : fallback; }

/// JSON number, or null for +inf / NaN.
nlohmann::json num(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(); }

std::string eps_key(double e) {
  std::ostringstream s;
  s << e;
  return s.str();
}

double median(std::vector<double> v) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

nlohmann::json certify_run(LoadedModel& loaded, const Dataset& data,
                           const std::vector<int64_t>& indices, const CertifyConfig& cfg,
                           torch::Device device, bool progress) {
  if (!cfg.global && !cfg.local) throw ConfigError("certify: choose at least one estimator");
  for (double e : cfg.eps_grid)
    if (!(e >= 0)) throw ConfigError::invalid("--eps-grid", std::to_string(e), "values >= 0");
  if (cfg.bisect_steps < 1) throw ConfigError::invalid("--bisect-steps", std::to_string(cfg.bisect_steps), ">= 1");
  for (auto i : indices)
    if (i < 0 || i >= data.size())
      throw ConfigError("certify: sample index " + std::to_string(i) + " is outside the data set (" +
                        std::to_string(data.size()) + " images)");
  torch::nn::Module& module = loaded.is_dual() ? static_cast<torch::nn::Module&>(*loaded.dual)
                                               : static_cast<torch::nn::Module&>(*loaded.model);
  module.eval();
  module.to(torch::kFloat64);  // the cross-check attacks the same float64 function
  const Norm p = cfg.norm;
  const auto t0 = std::chrono::steady_clock::now();

  std::vector<MemberGraphs> members;
  if (loaded.is_dual()) {
    members.push_back(member_graphs(loaded.dual->standard(), p, cfg.global));
    members.push_back(member_graphs(loaded.dual->robust(), p, cfg.global));
  } else {
    members.push_back(member_graphs(*loaded.model, p, cfg.global));
  }
  const double alpha = loaded.is_dual() ? loaded.dual->alpha() : 1.0;
  const bool dual = loaded.is_dual();
  const double global_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // All radii of one sample from its evaluations and constants (one per member).
  auto radii_of = [&](const std::vector<MemberEval>& ev, const std::vector<MemberConstants>& c,
                      int64_t label) {
    Radii r;
    if (dual) {
      auto d = radii_dual(ev[0], c[0], ev[1], c[1], alpha, label);
      r["thm55_a"] = d.eps_a, r["thm55_b"] = d.eps_b, r["thm55"] = d.thm55, r["thm55_tight"] = d.tight;
    } else {
      auto s = radii_single(ev[0], c[0], label);
      r["thm54_paper"] = s.paper, r["thm54_tight"] = s.tight;
      if (!std::isnan(s.candidate)) r["thm54_candidate"] = s.candidate;
      if (!std::isnan(s.margin)) r["margin"] = s.margin;
    }
    return r;
  };

  nlohmann::json rows = nlohmann::json::array();
  Progress meter("certify", static_cast<int64_t>(indices.size()), progress);
  double certify_seconds = 0, empirical_seconds = 0;
  for (size_t start = 0; start < indices.size(); start += static_cast<size_t>(cfg.batch_size)) {
    const auto tb = std::chrono::steady_clock::now();
    const size_t n = std::min(static_cast<size_t>(cfg.batch_size), indices.size() - start);
    auto idx = torch::tensor(std::vector<int64_t>(indices.begin() + static_cast<long>(start),
                                                  indices.begin() + static_cast<long>(start + n)),
                             torch::kLong);
    auto x = data.batch_images(idx).to(torch::kFloat64).to(device);
    auto y = data.batch_labels(idx);
    const int64_t B = static_cast<int64_t>(n);

    std::vector<MemberBatch> batches;
    for (const auto& m : members) batches.push_back(member_evaluate(m, x));
    std::vector<std::vector<MemberEval>> evals(n);  // [sample][member]
    for (int64_t b = 0; b < B; ++b)
      for (size_t k = 0; k < members.size(); ++k)
        evals[static_cast<size_t>(b)].push_back(member_eval(members[k], batches[k], b));

    std::vector<nlohmann::json> out(n);
    std::vector<int64_t> preds(n);
    for (int64_t b = 0; b < B; ++b) {
      const auto ub = static_cast<size_t>(b);
      // F of each member and its routing (the views' constants are not used here).
      std::vector<double> probs;
      nlohmann::json weights = nlohmann::json::array();
      for (size_t k = 0; k < members.size(); ++k) {
        const auto& ev = evals[ub][k];
        MemberConstants unit;
        unit.experts.assign(ev.h.size(), 1.0);
        const auto v = member_view(ev, unit);
        const double w = dual ? (k == 0 ? 1 - alpha : alpha) : 1.0;
        if (probs.empty()) probs.assign(v.probs.size(), 0.0);
        for (size_t c = 0; c < v.probs.size(); ++c) probs[c] += w * v.probs[c];
        if (ev.g.empty()) continue;
        std::vector<double> a(ev.h.size(), 0.0);
        for (size_t j = 0; j < v.selected.size(); ++j) a[static_cast<size_t>(v.selected[j])] = v.weights[j];
        weights.push_back(a);
      }
      const int64_t label = y[b].item<int64_t>();
      const int64_t pred = std::max_element(probs.begin(), probs.end()) - probs.begin();
      preds[ub] = pred;
      double other = -kInf;
      for (size_t c = 0; c < probs.size(); ++c)
        if (static_cast<int64_t>(c) != label) other = std::max(other, probs[c]);
      auto& row = out[ub];
      row = {{"index", indices[start + ub]}, {"label", label}, {"pred", pred},
             {"correct", pred == label}, {"margin", probs[static_cast<size_t>(label)] - other},
             {"radii", nlohmann::json::object()}};
      row["router_weights"] = dual ? weights : (weights.empty() ? nlohmann::json() : weights[0]);
    }

    // global radii
    std::vector<Radii> global_radii(n);
    if (cfg.global) {
      std::vector<MemberConstants> gc;
      for (const auto& m : members) gc.push_back(m.global);
      for (int64_t b = 0; b < B; ++b) {
        const auto ub = static_cast<size_t>(b);
        global_radii[ub] = radii_of(evals[ub], gc, y[b].item<int64_t>());
        for (const auto& [form, r] : global_radii[ub]) out[ub]["radii"][form + "_global"] = num(r);
      }
    }

    // local radii: for each form, the largest ε at which the bound computed with the
    // constants valid on B_p(x, ε) still certifies ε (bisection on ε).
    if (cfg.local) {
      // Constants for requests (sample, ε). Equal requests are computed once, and an
      // expert that cannot matter on the ball keeps its (sound, larger) global constant:
      // with top-k routing and global constants, expert i matters only if selected or
      // if it could overtake a selected one, (g_top - g_i) / (2 L_g) < ε.
      // The selected experts of every sample and member (they do not depend on ε).
      std::vector<std::vector<std::vector<int64_t>>> selected(n);
      for (size_t b = 0; b < n; ++b)
        for (size_t k = 0; k < members.size(); ++k)
          selected[b].push_back(cfg.global ? member_view(evals[b][k], members[k].global).selected
                                           : std::vector<int64_t>{});
      auto local_at = [&](const std::vector<std::pair<int64_t, double>>& requests) {
        std::map<std::pair<int64_t, double>, size_t> unique;
        std::vector<std::pair<int64_t, double>> todo;
        std::vector<size_t> slot(requests.size());
        for (size_t r = 0; r < requests.size(); ++r) {
          auto it = unique.find(requests[r]);
          if (it == unique.end()) it = unique.emplace(requests[r], todo.size()).first, todo.push_back(requests[r]);
          slot[r] = it->second;
        }
        std::vector<std::vector<MemberConstants>> done(todo.size());
        for (size_t k = 0; k < members.size(); ++k) {
          const auto& m = members[k];
          const int64_t E = static_cast<int64_t>(m.experts.size());
          std::vector<MemberConstants> c(todo.size(), m.global);
          for (auto& ci : c) ci.experts.resize(static_cast<size_t>(E), 0.0);
          auto run = [&](const LayerGraph& g, const std::vector<size_t>& who, double global,
                         const std::function<void(size_t, double)>& put) {
            if (who.empty()) return;
            std::vector<int64_t> rows;
            std::vector<double> eps;
            for (auto t : who) rows.push_back(todo[t].first), eps.push_back(todo[t].second);
            auto sel = torch::tensor(rows, torch::kLong).to(device);
            auto l = lipschitz_local(g, p, x.index_select(0, sel),
                                     torch::tensor(eps, torch::kFloat64).to(device)).cpu();
            for (size_t i = 0; i < who.size(); ++i) {
              double v = l[static_cast<int64_t>(i)].item<double>();
              if (global > 0) v = std::min(v, global);  // both sound; the local one can exceed for p = 2
              put(who[i], v);
            }
          };
          std::vector<size_t> all(todo.size());
          std::iota(all.begin(), all.end(), size_t{0});
          if (!m.router.empty()) {
            const bool has_relu = std::any_of(m.router.begin(), m.router.end(),
                                              [](const Layer& l) { return rule_for(l).relaxed() || !l.main.empty(); });
            if (has_relu || !cfg.global)  // an affine router's Jacobian is constant: local = global
              run(m.router, all, m.global.router, [&](size_t t, double v) { c[t].router = v; });
          }
          for (int64_t i = 0; i < E; ++i) {
            std::vector<size_t> who;
            for (size_t t = 0; t < todo.size(); ++t) {
              const auto& ev = evals[static_cast<size_t>(todo[t].first)][k];
              bool need = ev.g.empty() || ev.routing == Routing::soft || !cfg.global;
              if (!need) {
                const auto& sel = selected[static_cast<size_t>(todo[t].first)][k];
                need = std::find(sel.begin(), sel.end(), i) != sel.end();
                const double top = *std::max_element(ev.g.begin(), ev.g.end());
                need = need || (top - ev.g[static_cast<size_t>(i)]) / (2 * m.global.router) < todo[t].second;
              }
              if (need) who.push_back(t);
              else c[t].experts[static_cast<size_t>(i)] = m.global.experts[static_cast<size_t>(i)];
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
      };
      // ε = 0: the exact gradient at x bounds every certifiable ε from above.
      std::vector<std::pair<int64_t, double>> zero;
      for (int64_t b = 0; b < B; ++b) zero.emplace_back(b, 0.0);
      auto at0 = local_at(zero);
      std::vector<std::string> forms;
      for (const auto& [form, r] : radii_of(evals[0], at0[0], y[0].item<int64_t>())) forms.push_back(form);
      // Bisection per form; equal probes (e.g. the paper and tight forms of a top-1
      // model coincide) are computed once. Every probe (ε, constants valid on B_p(x, ε))
      // at which any form certifies ε is a certificate of radius ε for that form, so
      // each form keeps the largest such probe. At equal constants the tight form
      // certifies whenever the paper form does, so tight >= paper holds here too.
      const std::string main_form = dual ? "thm55_tight"
                                         : (std::find(forms.begin(), forms.end(), "thm54_candidate") != forms.end()
                                                ? "thm54_candidate" : "thm54_tight");
      const auto F = static_cast<int64_t>(forms.size());
      std::vector<double> lo(static_cast<size_t>(F * B), 0.0), hi(static_cast<size_t>(F * B), 0.0);
      std::vector<Radii> best(static_cast<size_t>(B));
      std::vector<std::vector<MemberConstants>> main_consts(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) {
        const auto ub = static_cast<size_t>(b);
        auto r0 = radii_of(evals[ub], at0[ub], y[b].item<int64_t>());
        for (int64_t f = 0; f < F; ++f) {
          const auto& form = forms[static_cast<size_t>(f)];
          const auto u = static_cast<size_t>(f * B + b);
          hi[u] = finite_or(r0[form], cfg.empirical_max * 4);
          // Global constants bound the local ones: the global radius is certified locally too.
          best[ub][form] = cfg.global ? std::min(hi[u], finite_or(global_radii[ub][form], 0.0)) : 0.0;
          lo[u] = best[ub][form];
        }
      }
      for (int it = 0; it < cfg.bisect_steps; ++it) {
        std::vector<std::pair<int64_t, double>> req;
        std::vector<size_t> req_u;
        for (int64_t f = 0; f < F; ++f)
          for (int64_t b = 0; b < B; ++b) {
            const auto u = static_cast<size_t>(f * B + b);
            if (hi[u] > lo[u]) req.emplace_back(b, 0.5 * (lo[u] + hi[u])), req_u.push_back(u);
          }
        if (req.empty()) break;
        auto consts = local_at(req);
        for (size_t r = 0; r < req.size(); ++r) {
          const auto u = req_u[r];
          const auto [b, mid] = req[r];
          const auto ub = static_cast<size_t>(b);
          const auto& form = forms[u / static_cast<size_t>(B)];
          auto rad = radii_of(evals[ub], consts[r], y[b].item<int64_t>());
          for (const auto& g : forms) {
            if (!(rad[g] >= mid) || mid < best[ub][g]) continue;
            best[ub][g] = mid;
            if (g == main_form) main_consts[ub] = consts[r];
          }
          (rad[form] >= mid ? lo[u] : hi[u]) = mid;
        }
      }
      std::vector<double> main_eps(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) main_eps[static_cast<size_t>(b)] = best[static_cast<size_t>(b)][main_form];
      // The constants behind the main local certificate, at its radius.
      std::vector<std::pair<int64_t, double>> main_req;
      for (int64_t b = 0; b < B; ++b)
        if (main_consts[static_cast<size_t>(b)].empty()) main_req.emplace_back(b, main_eps[static_cast<size_t>(b)]);
      auto missing = local_at(main_req);
      for (size_t r = 0; r < main_req.size(); ++r) main_consts[static_cast<size_t>(main_req[r].first)] = missing[r];
      for (int64_t b = 0; b < B; ++b) {
        const auto ub = static_cast<size_t>(b);
        for (const auto& f : forms) out[ub]["radii"][f + "_local"] = best[ub][f];
        const auto& mc = main_consts[ub];
        nlohmann::json c = dual ? nlohmann::json{{"standard", constants_json(mc[0])}, {"robust", constants_json(mc[1])}}
                                : constants_json(mc[0]);
        out[ub]["constants_local"] = {{"eps", main_eps[ub]}, {"form", main_form}, {"constants", c}};
      }
    }
    certify_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - tb).count();

    // The empirical radius: PGD bisection on the whole (float64) model.
    if (cfg.empirical) {
      const auto te = std::chrono::steady_clock::now();
      auto subject = loaded.subject();
      auto yd = y.to(device);
      std::vector<double> lo(n, 0.0), hi(n, kInf);
      std::vector<int64_t> active;
      for (int64_t b = 0; b < B; ++b) {
        if (preds[static_cast<size_t>(b)] != y[b].item<int64_t>()) hi[static_cast<size_t>(b)] = 0.0;
        else active.push_back(b);
      }
      auto probe = [&](const std::vector<int64_t>& who, const std::vector<double>& radius) {
        auto sel = torch::tensor(who, torch::kLong).to(device);
        auto xs = x.index_select(0, sel), ys = yd.index_select(0, sel);
        FrozenParameters frozen(module);
        auto fs = subject.target(AttackTarget::whole, xs);
        std::vector<uint64_t> seeds;
        for (auto b : who) seeds.push_back(cfg.seed * 1000003ULL + static_cast<uint64_t>(indices[start + static_cast<size_t>(b)]));
        auto xa = attack_pgd_each(fs, xs, ys, torch::tensor(radius, torch::kFloat64), cfg.attack, seeds);
        torch::NoGradGuard ng;
        auto wrong = fs(xa).argmax(1).ne(ys).cpu();
        auto d = (xa - xs).flatten(1);
        auto dist = (p == Norm::linf ? d.abs().amax(1) : d.norm(2, 1)).cpu();
        std::vector<std::pair<bool, double>> res;
        for (size_t i = 0; i < who.size(); ++i)
          res.emplace_back(wrong[static_cast<int64_t>(i)].item<bool>(), dist[static_cast<int64_t>(i)].item<double>());
        return res;
      };
      if (!active.empty()) {
        auto first = probe(active, std::vector<double>(active.size(), cfg.empirical_max));
        std::vector<int64_t> found;
        for (size_t i = 0; i < active.size(); ++i)
          if (first[i].first) hi[static_cast<size_t>(active[i])] = first[i].second, found.push_back(active[i]);
        while (true) {
          std::vector<int64_t> who;
          std::vector<double> mids;
          for (auto b : found) {
            const auto ub = static_cast<size_t>(b);
            if (hi[ub] - lo[ub] > cfg.empirical_tol) who.push_back(b), mids.push_back(0.5 * (lo[ub] + hi[ub]));
          }
          if (who.empty()) break;
          auto res = probe(who, mids);
          for (size_t i = 0; i < who.size(); ++i) {
            const auto ub = static_cast<size_t>(who[i]);
            if (res[i].first) hi[ub] = std::min(hi[ub], std::max(res[i].second, lo[ub]));
            else lo[ub] = mids[i];
          }
        }
      }
      for (size_t b = 0; b < n; ++b) out[b]["empirical_radius"] = num(hi[b]);
      empirical_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - te).count();
    }
    for (auto& r : out) rows.push_back(std::move(r));
    meter.advance(static_cast<int64_t>(n));
  }

  nlohmann::json constants;
  if (cfg.global) {
    if (dual) constants = {{"standard", constants_json(members[0].global)}, {"robust", constants_json(members[1].global)}};
    else constants = constants_json(members[0].global);
  }
  // Lower bounds (gradients actually attained) at a few samples: with the global
  // constants they bracket each component's true constant in the report.
  // The first 8 images of the data set, whatever this run's samples (shards agree).
  nlohmann::json lower;
  if (data.size() > 0) {
    const int64_t m = std::min<int64_t>(8, data.size());
    auto xl = data.batch_images(torch::arange(m)).to(torch::kFloat64).to(device);
    const double radius = *std::max_element(cfg.eps_grid.begin(), cfg.eps_grid.end());
    auto member_lower = [&](const MemberGraphs& mg) {
      nlohmann::json j = {{"experts", nlohmann::json::array()}};
      if (!mg.router.empty()) j["router"] = lipschitz_lower(mg.router, p, xl, 2, radius);
      for (const auto& e : mg.experts) j["experts"].push_back(lipschitz_lower(e, p, xl, 2, radius));
      return j;
    };
    lower = dual ? nlohmann::json{{"standard", member_lower(members[0])}, {"robust", member_lower(members[1])}}
                 : member_lower(members[0]);
  }
  nlohmann::json results = {
      {"schema", "moecert.certify/1"},
      {"moecert_version", MOECERT_VERSION},
      {"checkpoint", loaded.dir},
      {"fingerprint",
       {{"weights_sha256", loaded.manifest.value("weights_sha256", "")},
        {"architecture", loaded.manifest.value("architecture", nlohmann::json())},
        {"training", loaded.manifest.value("training", nlohmann::json())}}},
      {"model", loaded.describe()},
      {"kind", dual ? "dual" : "moe"},
      {"norm", norm_name(p)},
      {"dataset", {{"name", data.name}, {"split", "test"}, {"size", data.size()}}},
      {"config",
       {{"estimators", cfg.global && cfg.local ? nlohmann::json{"global", "local"}
                                               : nlohmann::json{cfg.global ? "global" : "local"}},
        {"eps_grid", cfg.eps_grid},
        {"bisect_steps", cfg.bisect_steps},
        {"empirical", cfg.empirical},
        {"attack", {{"steps", cfg.attack.steps}, {"restarts", cfg.attack.restarts},
                    {"loss", cfg.attack.loss == AttackLoss::ce ? "ce" : "margin"},
                    {"step_rule", "2.5*eps/steps"}}},
        {"empirical_max", cfg.empirical_max},
        {"empirical_tol", cfg.empirical_tol},
        {"margin_allowance", defaults::margin_allowance},
        {"constant_inflation", defaults::constant_inflation},
        {"samples", indices.size()},
        {"shard", cfg.shard.empty() ? nlohmann::json() : nlohmann::json(cfg.shard)}}},
      {"alpha", dual ? nlohmann::json(alpha) : nlohmann::json()},
      {"constants_global", constants},
      {"constants_lower", lower},
      {"rows", rows},
      {"timing",
       {{"global_constants_seconds", global_seconds},
        {"certify_seconds", certify_seconds},
        {"empirical_seconds", empirical_seconds},
        {"certify_samples_per_s",
         certify_seconds > 0 ? static_cast<double>(indices.size()) / certify_seconds : 0.0}}}};
  certify_aggregate(results);
  return results;
}

void certify_aggregate(nlohmann::json& results) {
  const auto& rows = results.at("rows");
  const auto grid = results.at("config").at("eps_grid").get<std::vector<double>>();
  std::map<std::string, std::vector<double>> radii;  // form -> per-sample radius
  std::vector<double> empirical, tightness;
  nlohmann::json violations = nlohmann::json::array();
  int64_t correct = 0;
  for (const auto& row : rows) {
    const bool ok = row.at("correct").get<bool>();
    correct += ok;
    const auto& emp = row.value("empirical_radius", nlohmann::json());
    const double e = emp.is_null() ? kInf : emp.get<double>();
    if (row.contains("empirical_radius")) empirical.push_back(ok ? e : 0.0);
    double best = 0;
    bool best_local = false;
    for (const auto& [form, v] : row.at("radii").items()) {
      const double r = v.is_null() ? kInf : v.get<double>();
      radii[form].push_back(ok ? r : 0.0);
      const bool local = form.size() > 6 && form.compare(form.size() - 6, 6, "_local") == 0;
      if (local && !best_local) best = 0, best_local = true;
      if (local == best_local) best = std::max(best, r);
      if (row.contains("empirical_radius") && ok && e < r)
        violations.push_back({{"index", row.at("index")}, {"form", form}, {"certified", v}, {"empirical", emp}});
    }
    if (ok && best > 0 && std::isfinite(e) && e > 0) tightness.push_back(best / e);
  }
  const double N = std::max<double>(1.0, static_cast<double>(rows.size()));
  nlohmann::json agg;
  agg["samples"] = rows.size();
  agg["clean_accuracy"] = correct / N;
  nlohmann::json cert = nlohmann::json::object(), med = nlohmann::json::object();
  for (const auto& [form, v] : radii) {
    nlohmann::json per = nlohmann::json::object();
    for (double eps : grid)
      per[eps_key(eps)] = std::count_if(v.begin(), v.end(), [&](double r) { return r >= eps && r > 0; }) / N;
    cert[form] = per;
    med[form] = num(median(v));
  }
  agg["certified_accuracy"] = cert;
  agg["median_radius"] = med;
  if (!empirical.empty()) {
    nlohmann::json emp = nlohmann::json::object();
    for (double eps : grid)
      emp[eps_key(eps)] = std::count_if(empirical.begin(), empirical.end(), [&](double r) { return r > eps; }) / N;
    agg["empirical_accuracy"] = emp;
    agg["median_empirical_radius"] = num(median(empirical));
  }
  agg["median_tightness"] = num(median(tightness));
  agg["tightness_samples"] = tightness.size();
  agg["violations"] = violations;
  agg["violation_count"] = violations.size();
  results["aggregates"] = agg;
}

}  // namespace moecert
