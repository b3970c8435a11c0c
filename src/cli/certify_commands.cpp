// `moecert lipschitz`, `moecert certify` and `moecert verify`.
#include <sys/stat.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "moecert/certify.h"
#include "moecert/checkpoint.h"
#include "moecert/defaults.h"
#include "moecert/error.h"
#include "moecert/limits.h"
#include "moecert/model_io.h"
#include "moecert/report.h"
#include "moecert/runtime.h"
#include "moecert/verify.h"

namespace moecert {
namespace {

/// The test split of the checkpoint's data set (first `samples` images, 0 = all).
Dataset test_data(const CommonOptions& common, const LoadedModel& loaded) {
  const auto name =
      loaded.manifest.value("dataset", nlohmann::json::object()).value("name", "fashion-mnist");
  return data_load(data_spec(common, name, /*train=*/false));
}

struct Component {
  std::string name;
  LayerGraph graph;
};

std::vector<Component> components(LoadedModel& loaded) {
  std::vector<Component> out;
  auto add = [&](MoeImpl& m, const std::string& prefix) {
    if (m.num_experts() > 1) out.push_back({prefix + "router", m.component_graph(-1)});
    for (int64_t i = 0; i < m.num_experts(); ++i)
      out.push_back({prefix + (m.num_experts() > 1 ? "expert " + std::to_string(i) : "dense"),
                     m.component_graph(i)});
  };
  if (loaded.is_dual()) {
    add(loaded.dual->standard(), "standard ");
    add(loaded.dual->robust(), "robust ");
  } else {
    add(*loaded.model, "");
  }
  return out;
}

/// The console summary: accuracy per ε of the grid (headers and values from the same
/// grid), the median radius, the cross-check and the expert usage.
void print_summary(const Results& r, const std::string& path) {
  const auto& a = r.aggregates;
  const auto& grid = r.config.grid;
  std::cout << "clean accuracy " << fmt_fixed(a.clean_accuracy, 4) << " on " << a.samples
            << " samples\n";
  std::vector<int> width;
  for (double e : grid.values())
    width.push_back(std::max<int>(8, static_cast<int>(eps_key(e).size())));
  std::printf("%-28s", "certified accuracy at eps");
  for (size_t i = 0; i < grid.size(); ++i) std::printf(" %*s", width[i], eps_key(grid[i]).c_str());
  std::printf(" %12s\n", "median r");
  auto line = [&](const std::string& name, const std::vector<double>& per_eps, double median) {
    std::printf("%-28s", name.c_str());
    for (size_t i = 0; i < grid.size(); ++i) std::printf(" %*.4f", width[i], per_eps[i]);
    std::printf(" %12s\n", std::isnan(median)      ? "-"
                           : std::isfinite(median) ? fmt_fixed(median, 5).c_str()
                                                   : "inf");
  };
  line("headline (best per sample)", a.headline_certified, a.headline_median);
  for (const auto& key : r.keys()) line(key.text(), a.certified.at(key), a.median_radius.at(key));
  if (a.empirical) {
    line("empirical (FMN, APGD)", *a.empirical, a.median_empirical);
    line("unknown (neither)", *a.unknown, NAN);
    line("falsified (attack)", *a.falsified, NAN);
    std::cout << "median tightness (certified / empirical) "
              << (std::isnan(a.median_tightness) ? std::string("n/a")
                                                 : fmt_fixed(a.median_tightness, 4))
              << " over " << a.tightness_samples << " samples\n";
  }
  if (!a.expert_usage.empty())
    std::cout << "expert usage (clean) " << ExpertUsage::text(ExpertUsage::shares(a.expert_usage))
              << "\n";
  std::cout << "certify " << fmt_fixed(r.timing.value("certify_samples_per_s", 0.0), 1)
            << " samples/s; results " << path << "\n";
  std::cout << "soundness violations: " << a.violations.size() << "\n";
}

}  // namespace

void cli_register_verify(CLI::App& app, const CommonOptions& common) {
  struct Options {
    std::string model, property, results;
    VerifyOptions v;
  };
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand(
      "verify",
      "check a VNN-COMP property (VNNLIB) on an ONNX model: unsat (holds) / sat with a "
      "counterexample / unknown / timeout, in the competition's results format");
  cmd->add_option("model", o->model, "ONNX model (.onnx)")->required();
  cmd->add_option("property", o->property, "property (.vnnlib)")->required();
  cmd->add_option("--timeout", o->v.timeout, "seconds for the property")->capture_default_str();
  cmd->add_option("--results", o->results, "write the results file here too (atomically)");
  cmd->add_option("--attack-steps", o->v.attack_steps, "PGD steps per attack round")
      ->capture_default_str();
  cmd->add_option("--restarts", o->v.restarts, "random starts per attack round")
      ->capture_default_str();
  cmd->add_option("--split-max-inputs", o->v.split_max_inputs,
                  "bisect the boxes of cases the bounds leave open when they have at most this "
                  "many free inputs (0: no input splitting)")
      ->capture_default_str();
  cmd->callback([o, &common] {
    if (!(o->v.timeout > 0))
      throw ConfigError::invalid("--timeout", std::to_string(o->v.timeout), "> 0");
    limits::check_range("--attack-steps", o->v.attack_steps, 1, limits::max_steps);
    limits::check_range("--restarts", o->v.restarts, 1, limits::max_restarts);
    limits::check_range("--split-max-inputs", o->v.split_max_inputs, 0, 64);
    o->v.seed = common.seed;
    o->v.progress = !common.quiet;
    const auto model = onnx_load(o->model);
    const auto property = vnnlib_parse(o->property);
    const auto out = verify_property(model, property, o->v);
    const auto text = vnnlib_result_text(out.result, out.x, out.y);
    if (!o->results.empty()) write_file_atomic(o->results, text);
    std::cout << text;
    std::cerr << "verify: " << out.detail << " (" << out.refuted << " of " << out.cases
              << " case(s) refuted by bounds";
    if (out.boxes)
      std::cerr << "; input splitting bounded " << out.boxes << " boxes, refuted "
                << fmt_fixed(out.refuted_fraction, 4) << " of "
                << fmt_fixed(out.refuted_fraction + out.open_fraction, 0)
                << " split case(s) by volume";
    std::cerr << ", " << fmt_fixed(out.seconds, 2) << " s)\n";
  });
}

void cli_register_lipschitz(CLI::App& app, const CommonOptions& common) {
  struct Options {
    std::string checkpoint, norm = "inf", json;
    double eps = 0, radius = 0.1;
    int64_t points = 100;
    int lower_steps = 10, clever_batches = 50, clever_per_batch = 64;
  };
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand(
      "lipschitz",
      "Lipschitz constants of every router and expert: lower bound, CLEVER estimate, "
      "global bound, and (with --eps) the mean local bound");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint directory (single or dual-model)")
      ->required();
  cmd->add_option("--norm", o->norm, "input norm p: inf | 2")->capture_default_str();
  cmd->add_option("--eps", o->eps, "also the mean local bound over B_p(x, eps) of the test points");
  cmd->add_option("--points", o->points, "test images used by lower, clever and local")
      ->capture_default_str();
  cmd->add_option("--radius", o->radius, "lower/clever sampling radius")->capture_default_str();
  cmd->add_option("--json", o->json, "also write the table as JSON");
  cmd->callback([&common, o] {
    runtime_threads(common.threads);
    runtime_seed(common.seed);
    const auto device = runtime_device(common.device);
    const Norm p = norm_parse(o->norm);
    limits::check_range("--points", o->points, 1, limits::max_samples);
    if (!(o->eps >= 0)) throw ConfigError::invalid("--eps", std::to_string(o->eps), ">= 0");
    auto loaded = model_load(o->checkpoint, device);
    (loaded.is_dual() ? static_cast<torch::nn::Module&>(*loaded.dual)
                      : static_cast<torch::nn::Module&>(*loaded.model))
        .eval();
    auto data = test_data(common, loaded);
    const int64_t n = std::min(o->points, data.size());
    auto x = data.batch_images(torch::arange(n)).to(torch::kFloat64).to(device);
    const auto& spec = loaded.is_dual() ? loaded.dual->robust().spec() : loaded.model->spec();
    const std::vector<int64_t> shape{spec.in_channels, spec.height, spec.width};
    std::cerr << "lipschitz " << o->checkpoint << " (" << loaded.describe() << "), p = " << o->norm
              << ", " << n << " test points" << std::endl;
    std::printf("%-20s %12s %12s %12s", "component", "lower", "clever*", "global");
    if (o->eps > 0) std::printf(" %14s", ("local@" + fmt_fixed(o->eps, 3)).c_str());
    std::printf("\n");
    nlohmann::json rows = nlohmann::json::array();
    for (auto& c : components(loaded)) {
      const double global = lipschitz_global(c.graph, p, shape).value;
      const double lower = lipschitz_lower(c.graph, p, x, o->lower_steps, o->radius);
      const double clever = lipschitz_clever(c.graph, p, x, o->radius, o->clever_batches,
                                             o->clever_per_batch, common.seed);
      nlohmann::json row = {
          {"component", c.name}, {"lower", lower}, {"clever", clever}, {"global", global}};
      std::printf("%-20s %12.4g %12.4g %12.4g", c.name.c_str(), lower, clever, global);
      if (o->eps > 0) {
        const double local =
            lipschitz_local(c.graph, p, x, torch::full({n}, o->eps, torch::kFloat64))
                .mean()
                .item<double>();
        row["local_mean"] = std::min(local, global);
        std::printf(" %14.4g", std::min(local, global));
      }
      std::printf("\n");
      rows.push_back(row);
    }
    std::printf(
        "(* clever is a sampling estimate, not a bound; the true constant lies in [lower, "
        "global])\n");
    if (!o->json.empty())
      write_file_atomic(o->json, nlohmann::json({{"checkpoint", o->checkpoint},
                                                 {"norm", o->norm},
                                                 {"eps", o->eps},
                                                 {"components", rows}})
                                         .dump(2) +
                                     "\n");
  });
}

void cli_register_certify(CLI::App& app, const CommonOptions& common, int argc, char** argv) {
  struct Options {
    std::string checkpoint, out, norm = "inf", estimator = "all", eps_grid = "0.01,0.02,0.05,0.1";
    std::string shard;
    int steps = 50, restarts = 1, bisect_steps = 10;
    std::string jacobian = "crown";
    int search_rounds = defaults::search_rounds, alpha_rounds = defaults::alpha_rounds;
    int alpha_steps = defaults::alpha_steps;
    double empirical_max = 0.5, tolerance = 1e-3, search_tol = defaults::search_tol;
    int64_t batch_size = 100;
    bool no_empirical = false, no_box = false, exact_arithmetic = false, no_input_planes = false;
    bool bab = false;
    double bab_timeout = 60;
    int64_t bab_batch = 64, bab_input_max_free = 16;
    int bab_intermediate_steps = CertifyConfig{}.bab_intermediate_steps;
    int bab_steps = CertifyConfig{}.bab_steps;
    bool bab_cold_start = false;
    bool bab_one_tree = false;
    double bab_row_carry = CertifyConfig{}.bab_row_carry;
    int64_t bab_fsb = CertifyConfig{}.bab_fsb;
    int bab_bisect = CertifyConfig{}.bab_bisect;
    std::string bab_split = "auto";
  };
  auto o = std::make_shared<Options>();
  auto report = std::make_shared<ReportOptions>();
  std::string invocation;
  for (int i = 0; i < argc; ++i) invocation += (i ? " " : "") + std::string(argv[i]);
  auto* cmd = app.add_subcommand(
      "certify",
      "per-sample certified radii (Theorem 5.4 / 5.5) cross-checked against attacks (FMN, APGD); "
      "writes DIR/results.json; exit 3 on a soundness violation");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint directory (single or dual-model)")
      ->required();
  cmd->add_option("--out", o->out, "output directory (results.json)")->required();
  cmd->add_option("--norm", o->norm, "perturbation norm p: inf | 2")->capture_default_str();
  cmd->add_option(
         "--estimator", o->estimator,
         "comma-separated: global, local, ibp, crown-ibp, crown, alpha-crown, lipschitz (= "
         "global,local), bp (= ibp,crown-ibp,crown,alpha-crown), all; crown-ibp scales to "
         "ResNet-sized models where crown does not")
      ->capture_default_str();
  cmd->add_flag("--no-box", o->no_box,
                "certify the whole ball, not its intersection with the pixel box [0,1]^d");
  cmd->add_flag("--exact-arithmetic", o->exact_arithmetic,
                "no float32 allowance: the radii then hold for the real-valued network, not the "
                "float32 model");
  cmd->add_flag("--no-input-planes", o->no_input_planes,
                "L-inf: bound every ReLU by its chord, also where it reads an affine layer of the "
                "input and a face of the hull over the input box bounds tighter (faster, looser)");
  cmd->add_option("--search-rounds", o->search_rounds,
                  "IBP/CROWN radius search: full bound passes per sample")
      ->capture_default_str();
  cmd->add_option("--search-tol", o->search_tol,
                  "radius search: relative bracket width at which to stop")
      ->capture_default_str();
  cmd->add_option("--alpha-rounds", o->alpha_rounds,
                  "alpha-CROWN radius search: full bound passes per sample")
      ->capture_default_str();
  cmd->add_option("--alpha-steps", o->alpha_steps, "alpha-CROWN: optimisation steps per bound")
      ->capture_default_str();
  cmd->add_option("--eps-grid", o->eps_grid, "radii for certified / empirical accuracy")
      ->capture_default_str();
  cmd->add_option("--steps", o->steps, "APGD steps of the empirical radius bisection")
      ->capture_default_str();
  cmd->add_option("--restarts", o->restarts, "APGD random starts")->capture_default_str();
  cmd->add_option("--bisect-steps", o->bisect_steps, "local radius bisection steps")
      ->capture_default_str();
  cmd->add_option(
         "--jacobian", o->jacobian,
         "local constants: crown (CROWN through the Jacobian's graph, and the interval Jacobian) | "
         "interval (the interval Jacobian alone: faster, looser)")
      ->capture_default_str();
  cmd->add_option("--empirical-max", o->empirical_max, "upper end of the empirical bisection")
      ->capture_default_str();
  cmd->add_option("--tolerance", o->tolerance, "empirical bisection tolerance")
      ->capture_default_str();
  cmd->add_option("--batch-size", o->batch_size)->capture_default_str();
  cmd->add_option(
      "--shard", o->shard,
      "i/n (0-based): certify only the blocks of --batch-size samples whose number mod n is i");
  cmd->add_flag("--no-empirical", o->no_empirical, "skip the attacks' cross-check");
  cmd->add_flag("--bab", o->bab,
                "complete verification by branch and bound (estimator bab): verified / falsified "
                "/ unknown per sample and eps");
  cmd->add_option("--timeout-per-sample", o->bab_timeout,
                  "branch and bound: seconds per sample for the whole eps grid")
      ->capture_default_str();
  cmd->add_option("--bab-batch", o->bab_batch, "branch and bound: subproblems per bound pass")
      ->capture_default_str();
  cmd->add_option("--bab-intermediate-steps", o->bab_intermediate_steps,
                  "branch and bound: alpha-CROWN steps on the root's intermediate bounds (0: "
                  "CROWN's)")
      ->capture_default_str();
  cmd->add_option("--bab-steps", o->bab_steps,
                  "branch and bound: alpha-beta optimisation steps of each subproblem after the "
                  "root (the root takes --alpha-steps)")
      ->capture_default_str();
  cmd->add_flag("--bab-cold-start", o->bab_cold_start,
                "branch and bound: start every subproblem's alpha-beta optimisation from CROWN's "
                "slopes, not from its parent's tuned ones");
  cmd->add_flag("--bab-one-tree", o->bab_one_tree,
                "branch and bound of a mixture: one tree over every expert's ReLU splits, not "
                "one tree per expert");
  cmd->add_option("--bab-row-carry", o->bab_row_carry,
                  "branch and bound of a mixture: a margin row proven above this many logits "
                  "carries to the children unbounded (lower: faster, looser)")
      ->capture_default_str();
  cmd->add_option("--bab-fsb", o->bab_fsb,
                  "branch and bound: candidate units whose children are bounded before each "
                  "ReLU split is chosen (0 or 1: the first-order score alone)")
      ->capture_default_str();
  cmd->add_option("--bab-bisect", o->bab_bisect,
                  "branch and bound: bisection steps of each sample's verified radius between "
                  "the grid's points, in the budget the grid leaves (0: the largest verified "
                  "grid eps)")
      ->capture_default_str();
  cmd->add_option("--bab-split", o->bab_split,
                  "branch and bound: relu | input | auto (input splits for L-inf regions with at "
                  "most --bab-input-max-free free inputs)")
      ->capture_default_str();
  cmd->add_option("--bab-input-max-free", o->bab_input_max_free,
                  "branch and bound: free inputs up to which auto splits the input")
      ->capture_default_str();
  add_report_options(cmd, *report, /*for_certify=*/true);
  cmd->callback([&common, o, report, invocation] {
    // Bad gates, attack files and baselines are usage errors before any work.
    const EpsGrid grid = EpsGrid::parse(o->eps_grid);
    for (const auto& text : report->gates)
      if (const auto g = gate_parse(text); g.eps && !grid.find(*g.eps))
        throw ConfigError("--gate '" + text + "': ε " + eps_key(*g.eps) +
                          " is not in --eps-grid (" + grid.text() + ")");
    for (const auto& a : report->attacks) attack_read(a);
    if (!report->baseline.empty()) Results::read(report->baseline);
    runtime_threads(common.threads);
    runtime_seed(common.seed);
    const auto device = runtime_device(common.device);
    CertifyConfig cfg;
    cfg.norm = norm_parse(o->norm);
    cfg.estimators = estimators_parse(o->estimator);
    if (o->bab && std::find(cfg.estimators.begin(), cfg.estimators.end(), Estimator::bab) ==
                      cfg.estimators.end())
      cfg.estimators.push_back(Estimator::bab);
    cfg.bab_timeout = o->bab_timeout;
    cfg.bab_batch = o->bab_batch, cfg.bab_intermediate_steps = o->bab_intermediate_steps;
    cfg.bab_bisect = o->bab_bisect, cfg.bab_warm_start = !o->bab_cold_start;
    cfg.bab_expertwise = !o->bab_one_tree, cfg.bab_row_carry = o->bab_row_carry;
    cfg.bab_fsb = o->bab_fsb, cfg.bab_steps = o->bab_steps;
    cfg.bab_input_max_free = o->bab_input_max_free;
    if (o->bab_split == "auto")
      cfg.bab_split = BabSplit::automatic;
    else if (o->bab_split == "relu")
      cfg.bab_split = BabSplit::relu;
    else if (o->bab_split == "input")
      cfg.bab_split = BabSplit::input;
    else
      throw ConfigError::invalid("--bab-split", o->bab_split, "relu, input or auto");
    cfg.box = !o->no_box;
    cfg.exact_arithmetic = o->exact_arithmetic;
    cfg.input_planes = !o->no_input_planes;
    cfg.search_rounds = o->search_rounds;
    cfg.search_tol = o->search_tol;
    cfg.alpha_rounds = o->alpha_rounds;
    cfg.alpha_steps = o->alpha_steps;
    cfg.eps_grid = grid;
    limits::check_range("--steps", o->steps, 1, limits::max_steps);
    limits::check_range("--restarts", o->restarts, 1, limits::max_restarts);
    limits::check_range("--search-rounds", o->search_rounds, 1, limits::max_steps);
    limits::check_range("--alpha-rounds", o->alpha_rounds, 1, limits::max_steps);
    limits::check_range("--alpha-steps", o->alpha_steps, 0, limits::max_steps);
    limits::check_range("--bisect-steps", o->bisect_steps, 1, limits::max_steps);
    if (!(o->empirical_max > 0))
      throw ConfigError::invalid("--empirical-max", std::to_string(o->empirical_max), "> 0");
    if (!(o->tolerance > 0))
      throw ConfigError::invalid("--tolerance", std::to_string(o->tolerance), "> 0");
    limits::check_range("--batch-size", o->batch_size, 1, limits::max_batch);
    cfg.attack.norm = cfg.norm;
    cfg.attack.box = cfg.box;
    cfg.attack.steps = o->steps;
    cfg.attack.restarts = o->restarts;
    cfg.bisect_steps = o->bisect_steps;
    if (o->jacobian != "crown" && o->jacobian != "interval")
      throw ConfigError::invalid("--jacobian", o->jacobian, "crown or interval");
    cfg.jacobian_crown = o->jacobian == "crown";
    cfg.empirical = !o->no_empirical;
    cfg.empirical_max = o->empirical_max;
    cfg.empirical_tol = o->tolerance;
    cfg.batch_size = o->batch_size;
    cfg.shard = o->shard;
    cfg.seed = common.seed;

    auto loaded = model_load(o->checkpoint, device);
    loaded.check_batch(o->batch_size, "--batch-size");
    auto data = test_data(common, loaded);
    const int64_t total = common.samples > 0 ? std::min(common.samples, data.size()) : data.size();
    const auto indices = shard_rows(o->shard, total, o->batch_size);
    std::cerr << "certify " << o->checkpoint << " (" << loaded.describe() << "), p = " << o->norm
              << (cfg.box ? " (ball ∩ [0,1]^d)" : " (whole ball)") << ", estimators "
              << o->estimator << ", " << indices.size() << " " << data.name << " test images"
              << (o->shard.empty() ? "" : " (shard " + o->shard + ")")
              << (cfg.empirical ? ", FMN + APGD-" + std::to_string(cfg.attack.steps) +
                                      " bisection cross-check"
                                : "")
              << std::endl;
    auto results = certify_run(loaded, data, indices, cfg, device, !common.quiet);
    results.command = invocation;
    results.config.raw["selection"] = selection_json(common, total);
    ::mkdir(o->out.c_str(), 0755);
    const std::string path = o->out + "/results.json";
    results.write(path);
    print_summary(results, path);
    const auto violations = static_cast<int64_t>(results.aggregates.violations.size());
    int failed_gates = 0;
    if (!report->out.empty() || !report->gates.empty() || !report->junit.empty() ||
        !report->baseline.empty())
      failed_gates = report_and_gate({results}, {o->checkpoint}, *report, invocation);
    if (violations > 0) {
      for (const auto& v : results.aggregates.violations)
        std::cerr << "VIOLATION sample " << v.index << " radius " << v.key.text() << ": certified "
                  << v.certified << " > empirical " << v.empirical << "\n";
      throw Error(ExitCode::soundness, "certify: " + std::to_string(violations) +
                                           " soundness violation(s): an attack succeeded inside a "
                                           "certified radius (listed above and in " +
                                           path + ")");
    }
    if (failed_gates > 0)
      throw Error(ExitCode::gate_failed, std::to_string(failed_gates) + " gate(s) failed");
  });
}

}  // namespace moecert
