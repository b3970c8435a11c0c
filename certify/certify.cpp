// The certification run (SPEC §4): per batch, the float32 model's predictions and
// the float64 evaluations of every router and expert, then the stages — Lipschitz
// forms (run_lipschitz.cpp), bound-propagation forms (run_bounds.cpp), the empirical
// cross-check and branch and bound (run_search.cpp) — and results.json with every
// form's radius and the headline per sample.
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <iostream>
#include <limits>
#include <sstream>
#include <thread>

#include "moecert/attack_suite.h"
#include "moecert/checkpoint.h"
#include "moecert/defaults.h"
#include "moecert/error.h"
#include "moecert/rules.h"
#include "moecert/runtime.h"
#include "run-impl.h"

namespace moecert {

namespace run {

bool Context::uses(Estimator e) const {
  return std::find(cfg.estimators.begin(), cfg.estimators.end(), e) != cfg.estimators.end();
}

namespace {

nlohmann::json member_constants_json(const MemberConstants& c) {
  nlohmann::json j = {{"experts", c.experts}};
  if (c.router > 0 || !c.experts.empty()) j["router"] = c.router;
  return j;
}

}  // namespace

nlohmann::json constants_json(bool dual, const std::vector<MemberConstants>& c) {
  if (dual)
    return {{"standard", member_constants_json(c.at(0))},
            {"robust", member_constants_json(c.at(1))}};
  return member_constants_json(c.at(0));
}

Fp32Errors member_fp32_errors(const Member& m, const torch::Tensor& x, const torch::Tensor& eps,
                              const CertifyConfig& cfg) {
  BoundOptions opt;
  opt.method = BoundMethod::ibp;
  const InputDomain d{x, eps, cfg.norm, cfg.box};
  const auto zero = torch::zeros({x.size(0)}, x.options());
  Fp32Errors e{zero, zero, zero};
  auto output_of = [&](const BoundGraph& g) { return bound_forward(g, d, opt).nodes.back(); };
  for (const auto& net : m.bp.nets) {
    const auto out = output_of(net);
    e.logit = torch::max(e.logit, out.err32.amax(1));
    e.hmax = torch::max(e.hmax, (torch::max(out.lo.abs(), out.hi.abs()) + out.err32).amax(1));
  }
  if (m.bp.router) e.router = output_of(*m.bp.router).err32.amax(1);
  return e;
}

}  // namespace run

namespace {

using run::Batch;
using run::Context;
using run::Member;
constexpr double kInf = std::numeric_limits<double>::infinity();

std::vector<double> row_of(const torch::Tensor& t, int64_t b) {
  auto r = t[b].contiguous();
  return std::vector<double>(r.data_ptr<double>(), r.data_ptr<double>() + r.numel());
}

Member member_setup(MoeImpl& m, Norm p, bool global) {
  Member g;
  g.model = &m;
  const auto& s = m.spec();
  const Shape input{s.in_channels, s.height, s.width};
  if (s.experts > 1) g.router = m.component_graph(-1);
  for (int64_t i = 0; i < s.experts; ++i) g.experts.push_back(m.component_graph(i));
  if (global) {
    if (!g.router.empty()) g.global.router = lipschitz_global(g.router, p, input).value;
    for (const auto& e : g.experts) g.global.experts.push_back(lipschitz_global(e, p, input).value);
  }
  g.bp = forms::member_graphs(s, g.router, g.experts);
  return g;
}

/// Float64 evaluations of every member at x, and the float32 model's predictions.
void batch_evaluate(const Context& ctx, LoadedModel& loaded, Batch& batch) {
  torch::NoGradGuard no_grad;
  const int64_t B = batch.size();
  batch.evals.assign(static_cast<size_t>(B), {});
  for (const auto& m : ctx.members) {
    torch::Tensor g;
    if (!m.router.empty()) g = graph_forward(m.router, batch.x).cpu();
    std::vector<torch::Tensor> h;
    for (const auto& e : m.experts) h.push_back(graph_forward(e, batch.x).cpu());
    for (int64_t b = 0; b < B; ++b) {
      MemberEval ev;
      if (g.defined()) ev.g = row_of(g, b);
      for (const auto& t : h) ev.h.push_back(row_of(t, b));
      ev.routing = m.model->spec().routing;
      ev.top_k = m.model->spec().top_k;
      batch.evals[static_cast<size_t>(b)].push_back(std::move(ev));
    }
  }
  auto x32 = batch.x.to(torch::kFloat32);
  auto lp = loaded.is_dual() ? loaded.dual->forward(x32) : loaded.model->forward(x32);
  const auto pred = lp.argmax(1).cpu();
  batch.correct = pred.eq(batch.labels);
  batch.radii.assign(static_cast<size_t>(B), {});
  batch.extra.assign(static_cast<size_t>(B), nlohmann::json::object());
  for (int64_t b = 0; b < B; ++b)
    batch.extra[static_cast<size_t>(b)]["pred"] = pred[b].item<int64_t>();
}

/// Runs the sample-wise stages on `batch` in `parts` contiguous parts at once, each
/// on a thread of its own with one intra-op thread, and gathers the parts' radii and
/// row fields. Every stage's result for a sample depends on that sample alone, so the
/// split changes no radius (tested). Why: bound propagation is mostly small operators
/// and a per-sample search, which intra-op threads barely speed up (demo MoE, CROWN,
/// 200 images on 2 cores: 14.0 samples/s on one thread, 16.2 on two), while parts run
/// side by side. Parts are cut so that each holds about as many correctly classified
/// samples (the only ones the stages work on).
void run_stages_split(const run::Context& ctx, run::Batch& batch, int parts) {
  auto stages = [&ctx](run::Batch& b) {
    run::lipschitz_stage(ctx, b);
    run::bound_stage(ctx, b);
  };
  const int64_t B = batch.size();
  const auto correct = batch.correct.to(torch::kLong);
  const int64_t work = correct.sum().item<int64_t>();
  parts = static_cast<int>(std::min<int64_t>(parts, work / 4));
  if (parts <= 1) return stages(batch);
  // Cut after the sample that completes each part's share of correct samples.
  const auto cum = correct.cumsum(0);
  std::vector<int64_t> cut{0};
  for (int i = 1; i < parts; ++i) {
    const int64_t share = work * i / parts;
    cut.push_back(torch::searchsorted(cum, torch::tensor({share}, torch::kLong)).item<int64_t>() +
                  1);
  }
  cut.push_back(B);
  std::vector<run::Batch> sub(static_cast<size_t>(parts));
  for (size_t i = 0; i < sub.size(); ++i) {
    const int64_t from = cut[i], n = cut[i + 1] - from;
    auto& s = sub[i];
    s.x = batch.x.narrow(0, from, n), s.labels = batch.labels.narrow(0, from, n);
    s.correct = batch.correct.narrow(0, from, n);
    s.evals.assign(batch.evals.begin() + from, batch.evals.begin() + from + n);
    s.radii.assign(batch.radii.begin() + from, batch.radii.begin() + from + n);
    s.extra.assign(batch.extra.begin() + from, batch.extra.begin() + from + n);
  }
  const int threads = at::get_num_threads();
  std::vector<std::exception_ptr> errors(sub.size());
  std::vector<std::thread> pool;
  for (size_t i = 0; i < sub.size(); ++i) {
    pool.emplace_back([&, i] {
      try {
        at::set_num_threads(1);
        stages(sub[i]);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  for (auto& t : pool) t.join();
  at::set_num_threads(threads);
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (size_t i = 0; i < sub.size(); ++i) {
    std::move(sub[i].radii.begin(), sub[i].radii.end(), batch.radii.begin() + cut[i]);
    std::move(sub[i].extra.begin(), sub[i].extra.end(), batch.extra.begin() + cut[i]);
  }
}

/// The row of one sample: label, the float32 prediction, F's margin at x (float64),
/// the router weights of each member, every radius and the headline.
ResultRow row_of(const Context& ctx, const Batch& batch, int64_t b, int64_t index) {
  const auto ub = static_cast<size_t>(b);
  ResultRow row;
  std::vector<double> probs;
  for (size_t k = 0; k < ctx.members.size(); ++k) {
    const auto& ev = batch.evals[ub][k];
    MemberConstants unit;
    unit.experts.assign(ev.h.size(), 1.0);
    const auto v = member_view(ev, unit);
    const double w = ctx.dual ? (k == 0 ? 1 - ctx.alpha : ctx.alpha) : 1.0;
    if (probs.empty()) probs.assign(v.probs.size(), 0.0);
    for (size_t c = 0; c < v.probs.size(); ++c) probs[c] += w * v.probs[c];
    if (ev.g.empty()) continue;
    std::vector<double> a(ev.h.size(), 0.0);
    for (size_t j = 0; j < v.selected.size(); ++j)
      a[static_cast<size_t>(v.selected[j])] = v.weights[j];
    row.router_weights.push_back(a);
  }
  row.dual_weights = ctx.dual;
  row.index = index;
  row.label = batch.labels[b].item<int64_t>();
  row.correct = batch.correct[b].item<bool>();
  double other = -kInf;
  for (size_t c = 0; c < probs.size(); ++c)
    if (static_cast<int64_t>(c) != row.label) other = std::max(other, probs[c]);
  row.extra = batch.extra[ub];
  row.pred = row.extra.at("pred").get<int64_t>();
  row.extra.erase("pred");
  row.extra["margin"] = probs[static_cast<size_t>(row.label)] - other;
  row.radii = batch.radii[ub];
  for (const auto& [key, r] : row.radii)
    if (!row.headline_key || r > row.headline) row.headline = r, row.headline_key = key;
  return row;
}

void check_config(const CertifyConfig& cfg, const Dataset& data,
                  const std::vector<int64_t>& indices) {
  if (cfg.estimators.empty()) throw ConfigError("certify: choose at least one estimator");
  if (cfg.bisect_steps < 1)
    throw ConfigError::invalid("--bisect-steps", std::to_string(cfg.bisect_steps), ">= 1");
  if (cfg.search_rounds < 1)
    throw ConfigError::invalid("--search-rounds", std::to_string(cfg.search_rounds), ">= 1");
  if (cfg.alpha_rounds < 1)
    throw ConfigError::invalid("--alpha-rounds", std::to_string(cfg.alpha_rounds), ">= 1");
  if (cfg.alpha_steps < 0)
    throw ConfigError::invalid("--alpha-steps", std::to_string(cfg.alpha_steps), ">= 0");
  if (!(cfg.bab_timeout > 0 && cfg.bab_timeout <= 1e6))
    throw ConfigError::invalid("--timeout-per-sample", std::to_string(cfg.bab_timeout),
                               "in (0, 1e6] seconds");
  if (cfg.bab_batch < 2 || cfg.bab_batch > 4096)
    throw ConfigError::invalid("--bab-batch", std::to_string(cfg.bab_batch), "in [2, 4096]");
  if (cfg.bab_bisect < 0 || cfg.bab_bisect > 60)
    throw ConfigError::invalid("--bab-bisect", std::to_string(cfg.bab_bisect), "in [0, 60]");
  if (cfg.bab_intermediate_steps < 0 || cfg.bab_intermediate_steps > 1000)
    throw ConfigError::invalid("--bab-intermediate-steps",
                               std::to_string(cfg.bab_intermediate_steps), "in [0, 1000]");
  if (cfg.bab_steps < 0 || cfg.bab_steps > 1000)
    throw ConfigError::invalid("--bab-steps", std::to_string(cfg.bab_steps), "in [0, 1000]");
  if (!(cfg.bab_row_carry >= 0 && cfg.bab_row_carry <= 100))
    throw ConfigError::invalid("--bab-row-carry", std::to_string(cfg.bab_row_carry),
                               "in [0, 100] logits");
  if (cfg.bab_fsb < 0 || cfg.bab_fsb > 64)
    throw ConfigError::invalid("--bab-fsb", std::to_string(cfg.bab_fsb), "in [0, 64]");
  if (cfg.bab_input_max_free < 0)
    throw ConfigError::invalid("--bab-input-max-free", std::to_string(cfg.bab_input_max_free),
                               ">= 0");
  if (cfg.sample_parts < 0)
    throw ConfigError::invalid("sample_parts", std::to_string(cfg.sample_parts), ">= 0");
  if (!(cfg.search_tol > 0 && cfg.search_tol < 1))
    throw ConfigError::invalid("--search-tol", std::to_string(cfg.search_tol), "in (0, 1)");
  for (auto i : indices)
    if (i < 0 || i >= data.size())
      throw ConfigError("certify: sample index " + std::to_string(i) +
                        " is outside the data set (" + std::to_string(data.size()) + " images)");
}

ResultsConfig config_of(const CertifyConfig& cfg) {
  ResultsConfig c;
  c.grid = cfg.eps_grid;
  c.estimators = cfg.estimators;
  c.norm = norm_name(cfg.norm);
  c.box = cfg.box;
  c.empirical = cfg.empirical;
  c.shard = cfg.shard;
  c.raw = {{"float32", !cfg.exact_arithmetic},
           {"input_planes", cfg.input_planes},
           {"bisect_steps", cfg.bisect_steps},
           {"jacobian", cfg.jacobian_crown ? "crown" : "interval"},
           {"search",
            {{"rounds", cfg.search_rounds},
             {"tol", cfg.search_tol},
             {"alpha_rounds", cfg.alpha_rounds},
             {"alpha_steps", cfg.alpha_steps}}},
           {"attack",
            {{"attack", "fmn + apgd bisection"},
             {"steps", cfg.attack.steps},
             {"restarts", cfg.attack.restarts},
             {"min_norm_steps", cfg.min_norm_steps},
             {"loss", cfg.attack.loss == AttackLoss::ce ? "ce" : "dlr"}}},
           {"empirical_max", cfg.empirical_max},
           {"empirical_tol", cfg.empirical_tol},
           {"bab",
            {{"timeout_per_sample", cfg.bab_timeout},
             {"batch", cfg.bab_batch},
             {"split", cfg.bab_split == BabSplit::relu    ? "relu"
                       : cfg.bab_split == BabSplit::input ? "input"
                                                          : "auto"},
             {"input_max_free", cfg.bab_input_max_free},
             {"intermediate_steps", cfg.bab_intermediate_steps},
             {"steps", cfg.bab_steps},
             {"warm_start", cfg.bab_warm_start},
             {"expertwise", cfg.bab_expertwise},
             {"row_carry", cfg.bab_row_carry},
             {"fsb", cfg.bab_fsb},
             {"bisect", cfg.bab_bisect}}},
           {"margin_allowance", defaults::margin_allowance},
           {"constant_inflation", defaults::constant_inflation},
           {"seed", cfg.seed}};
  return c;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

/// Models with operators without a Jacobian step (LayerNorm, softmax, attention): the
/// local estimator, which needs Jacobian bounds, is dropped with a notice (an error
/// when it was the only one asked for).
void no_jacobian_notice(const Context& ctx, CertifyConfig& cfg) {
  std::vector<std::string> no_jacobian;
  for (const auto& m : ctx.members)
    for (size_t e = 0; e <= m.experts.size(); ++e) {
      const auto& g = e == 0 ? m.router : m.experts[e - 1];
      auto j = no_jacobian_nodes(g);
      no_jacobian.insert(no_jacobian.end(), j.begin(), j.end());
    }
  if (!no_jacobian.empty() && ctx.uses(Estimator::local)) {
    auto& e = cfg.estimators;
    e.erase(std::remove(e.begin(), e.end(), Estimator::local), e.end());
    if (e.empty())
      throw UnsupportedLayerError("certify: " + no_jacobian.front() +
                                  " has no Jacobian bound step, which the local Lipschitz "
                                  "estimator needs: use --estimator ibp, crown or alpha-crown");
    std::cerr << "certify: the local estimator needs Jacobian bounds, which " << no_jacobian.front()
              << " has not: skipped\n";
  }
}

}  // namespace

Results certify_run(LoadedModel& loaded, const Dataset& data, const std::vector<int64_t>& indices,
                    const CertifyConfig& requested, torch::Device device, bool progress) {
  check_config(requested, data, indices);
  CertifyConfig cfg = requested;  // less the estimators the model's operators do not support
  torch::nn::Module& module = loaded.is_dual() ? static_cast<torch::nn::Module&>(*loaded.dual)
                                               : static_cast<torch::nn::Module&>(*loaded.model);
  module.eval();
  module.to(torch::kFloat32);  // the model as users run it
  const auto t0 = std::chrono::steady_clock::now();
  Context ctx{cfg, {}, loaded.is_dual(), loaded.is_dual() ? loaded.dual->alpha() : 1.0, device};
  const bool global = ctx.uses(Estimator::global);
  if (ctx.dual) {
    ctx.members.push_back(member_setup(loaded.dual->standard(), cfg.norm, global));
    ctx.members.push_back(member_setup(loaded.dual->robust(), cfg.norm, global));
  } else {
    ctx.members.push_back(member_setup(*loaded.model, cfg.norm, global));
  }
  const double global_seconds = seconds_since(t0);
  no_jacobian_notice(ctx, cfg);
  Results results;
  Progress meter("certify", static_cast<int64_t>(indices.size()), progress);
  double certify_seconds = 0, empirical_seconds = 0, bab_seconds = 0;
  for (size_t start = 0; start < indices.size(); start += static_cast<size_t>(cfg.batch_size)) {
    const auto tb = std::chrono::steady_clock::now();
    const size_t n = std::min(static_cast<size_t>(cfg.batch_size), indices.size() - start);
    const std::vector<int64_t> index(indices.begin() + static_cast<long>(start),
                                     indices.begin() + static_cast<long>(start + n));
    auto idx = torch::tensor(index, torch::kLong);
    std::vector<int64_t> ids;  // the images' split indices: rows and attack seeds use them
    for (auto i : index) ids.push_back(data.source_index(i));
    Batch batch;
    batch.x = data.batch_images(idx).to(torch::kFloat64).to(device);
    batch.labels = data.batch_labels(idx);
    batch_evaluate(ctx, loaded, batch);
    run_stages_split(ctx, batch,
                     !device.is_cpu()       ? 1
                     : cfg.sample_parts > 0 ? cfg.sample_parts
                                            : at::get_num_threads());
    certify_seconds += seconds_since(tb);
    std::vector<double> empirical;
    if (cfg.empirical) {
      const auto te = std::chrono::steady_clock::now();
      empirical = run::empirical_radii(ctx, loaded, batch, ids);
      empirical_seconds += seconds_since(te);
    }
    if (ctx.uses(Estimator::bab)) {
      const auto tb2 = std::chrono::steady_clock::now();
      run::bab_stage(ctx, loaded, batch, ids, empirical, progress);
      bab_seconds += seconds_since(tb2);
    }
    for (int64_t b = 0; b < batch.size(); ++b) {
      auto row = row_of(ctx, batch, b, ids[static_cast<size_t>(b)]);
      if (cfg.empirical) row.empirical = empirical[static_cast<size_t>(b)];
      results.rows.push_back(std::move(row));
    }
    meter.advance(static_cast<int64_t>(n));
  }

  nlohmann::json constants;
  if (global) {
    std::vector<MemberConstants> gc;
    for (const auto& m : ctx.members) gc.push_back(m.global);
    constants = run::constants_json(ctx.dual, gc);
  }
  // Lower bounds (gradients actually attained) at a few samples: with the global
  // constants they bracket each component's true constant in the report, so only runs
  // with the global constants pay for them (on full-width ResNet-18 experts, about a
  // minute). The first 8 images of the data set, whatever this run's samples (shards agree).
  nlohmann::json lower;
  const auto tl = std::chrono::steady_clock::now();
  if (global && data.size() > 0) {
    const int64_t m = std::min<int64_t>(8, data.size());
    auto xl = data.batch_images(torch::arange(m)).to(torch::kFloat64).to(device);
    const double radius = cfg.eps_grid.values().back();
    auto member_lower = [&](const Member& mg) {
      nlohmann::json j = {{"experts", nlohmann::json::array()}};
      if (!mg.router.empty()) j["router"] = lipschitz_lower(mg.router, cfg.norm, xl, 2, radius);
      for (const auto& e : mg.experts)
        j["experts"].push_back(lipschitz_lower(e, cfg.norm, xl, 2, radius));
      return j;
    };
    lower = ctx.dual ? nlohmann::json{{"standard", member_lower(ctx.members[0])},
                                      {"robust", member_lower(ctx.members[1])}}
                     : member_lower(ctx.members[0]);
  }
  results.moecert_version = MOECERT_VERSION;
  results.checkpoint = loaded.dir;
  results.fingerprint = {{"weights_sha256", loaded.manifest.value("weights_sha256", "")},
                         {"architecture", loaded.manifest.value("architecture", nlohmann::json())},
                         {"training", loaded.manifest.value("training", nlohmann::json())}};
  results.model = loaded.describe();
  results.kind = ctx.dual ? "dual" : "moe";
  if (ctx.dual) results.alpha = ctx.alpha;
  results.data = {data.name, "test", data.size()};
  results.config = config_of(cfg);
  results.constants_global = constants;
  results.constants_lower = lower;
  results.timing = {
      {"global_constants_seconds", global_seconds + seconds_since(tl)},
      {"certify_seconds", certify_seconds},
      {"empirical_seconds", empirical_seconds},
      {"bab_seconds", bab_seconds},
      {"certify_samples_per_s",
       certify_seconds > 0 ? static_cast<double>(indices.size()) / certify_seconds : 0.0}};
  results.aggregate();
  return results;
}

}  // namespace moecert
