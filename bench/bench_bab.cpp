// Branch-and-bound benchmark (docs/certification.md §22): certify_run with α-CROWN and
// branch and bound on a checkpoint (default: an E = 4 cnn-s MoE with random weights on
// synthetic Fashion-MNIST-shaped images), no attacks' cross-check beyond what branch and
// bound runs itself. Prints and writes (JSON) the subproblems bounded per second (over
// the samples that branch and bound searched), the median seconds of the searches (one
// sample, one ε) that ended verified, what the searches' roots cost (the seconds before
// their first round of splits: in all, their median and their share of the searches'
// seconds), and the verdict shares per ε.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "moecert/certify.h"
#include "moecert/checkpoint.h"
#include "moecert/runtime.h"

using namespace moecert;

int main(int argc, char** argv) {
  CLI::App app{"bench_bab: branch-and-bound speed"};
  std::string out = "bench_bab.json", checkpoint, grid = "0.05,0.1";
  int threads = 0, intermediate_steps = CertifyConfig{}.bab_intermediate_steps;
  int64_t samples = 20, batch = 64;
  double timeout = 20;
  app.add_option("--out", out, "JSON output file")->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores")->capture_default_str();
  app.add_option("--samples", samples, "first N test images")->capture_default_str();
  app.add_option("--checkpoint", checkpoint, "a trained checkpoint (default: random weights)");
  app.add_option("--eps-grid", grid, "radii")->capture_default_str();
  app.add_option("--timeout-per-sample", timeout, "seconds per sample")->capture_default_str();
  app.add_option("--bab-batch", batch, "subproblems per bound pass")->capture_default_str();
  app.add_option("--bab-intermediate-steps", intermediate_steps,
                 "alpha-CROWN steps on the root's intermediate bounds (0: CROWN's)")
      ->capture_default_str();
  int steps = CertifyConfig{}.bab_steps;
  app.add_option("--bab-steps", steps, "alpha-beta steps of each subproblem after the root")
      ->capture_default_str();
  bool cold = false;
  int64_t fsb = CertifyConfig{}.bab_fsb;
  app.add_option("--bab-fsb", fsb, "candidate units bounded before each ReLU split (0: off)")
      ->capture_default_str();
  app.add_flag("--bab-cold-start", cold,
               "start every subproblem from CROWN's slopes, not its parent's tuned ones");
  bool one_tree = false;
  app.add_flag("--bab-one-tree", one_tree,
               "a mixture: one tree over every expert's splits, not one per expert");
  double row_carry = CertifyConfig{}.bab_row_carry;
  app.add_option("--bab-row-carry", row_carry,
                 "a mixture: margin rows carry to the children only above this many logits")
      ->capture_default_str();
  bool no_planes = false;
  app.add_flag("--no-input-planes", no_planes, "chords for every ReLU (no hull planes)");
  CLI11_PARSE(app, argc, argv);
  threads = runtime_threads(threads);
  torch::manual_seed(0);
  LoadedModel loaded;
  Dataset data;
  DataSpec d;
  d.train = false;
  if (!checkpoint.empty()) {
    loaded = model_load(checkpoint, torch::kCPU);
    d.name = loaded.manifest["dataset"].value("name", "fashion-mnist");
  } else {
    ModelSpec spec;
    loaded.model = Moe(spec);
    loaded.manifest = {{"architecture", spec.to_json()}};
    d.name = "synthetic", d.samples = samples;
  }
  data = data_load(d);
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < std::min(samples, data.size()); ++i) idx.push_back(i);
  CertifyConfig cfg;
  cfg.estimators = {Estimator::alpha_crown, Estimator::bab};
  cfg.eps_grid = EpsGrid::parse(grid);
  cfg.bab_timeout = timeout, cfg.bab_batch = batch;
  cfg.bab_intermediate_steps = intermediate_steps, cfg.bab_warm_start = !cold;
  cfg.bab_fsb = fsb, cfg.input_planes = !no_planes, cfg.bab_expertwise = !one_tree;
  cfg.bab_row_carry = row_carry, cfg.bab_steps = steps;
  cfg.attack.steps = 20;
  auto res = certify_run(loaded, data, idx, cfg, torch::kCPU, false);
  int64_t subproblems = 0;
  double seconds = 0;
  std::vector<double> verified_s, root_s;  // per search
  double unknown_share = 0;                // the verified shares of the searches that ended unknown
  int64_t unknown_n = 0, route_splits = 0, carried = 0;
  for (const auto& row : res.rows) {
    if (!row.extra.contains("bab")) continue;
    const auto& b = row.extra["bab"];
    const int64_t n = b["subproblems"].get<int64_t>();
    if (n == 0) continue;  // decided without a search
    subproblems += n, seconds += b["seconds"].get<double>();
    for (const auto& s : b["searches"]) {
      route_splits += s["route_splits"].get<int64_t>();
      carried += s.value("carried", int64_t{0});
      root_s.push_back(s["root_seconds"].get<double>());
      if (s["verdict"] == "verified") verified_s.push_back(s["seconds"].get<double>());
      if (s["verdict"] == "unknown")
        unknown_share += s["verified_share"].get<double>(), ++unknown_n;
    }
  }
  auto upper_median = [](std::vector<double> v) {  // 0 when empty
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  const double rate = seconds > 0 ? static_cast<double>(subproblems) / seconds : 0.0;
  const double median = upper_median(verified_s);
  const double root = std::accumulate(root_s.begin(), root_s.end(), 0.0);
  const double root_median = upper_median(root_s);
  const double root_share = seconds > 0 ? root / seconds : 0.0;
  const double mean_unknown_share =
      unknown_n ? unknown_share / static_cast<double>(unknown_n) : 0.0;
  std::printf(
      "branch and bound, %s, %zu samples, timeout %.0f s, batch %lld: %lld subproblems in "
      "%.1f s = %.1f subproblems/s (%lld split by route, %lld experts carried); %zu "
      "searches (sample, eps) ended "
      "verified, median %.2f s; "
      "%lld ended unknown, verified share %.4f on average; roots %.1f s in all (median %.2f "
      "s, %.1f %% of the searches' time)\n",
      checkpoint.empty() ? "E=4 cnn-s MoE, random weights" : checkpoint.c_str(), idx.size(),
      timeout, static_cast<long long>(batch), static_cast<long long>(subproblems), seconds, rate,
      static_cast<long long>(route_splits), static_cast<long long>(carried), verified_s.size(),
      median, static_cast<long long>(unknown_n), mean_unknown_share, root, root_median,
      100 * root_share);
  nlohmann::json j = {{"benchmark", "bench_bab"},
                      {"threads", threads},
                      {"checkpoint", checkpoint},
                      {"samples", idx.size()},
                      {"timeout_per_sample", timeout},
                      {"batch", batch},
                      {"intermediate_steps", intermediate_steps},
                      {"warm_start", !cold},
                      {"fsb", fsb},
                      {"expertwise", !one_tree},
                      {"row_carry", row_carry},
                      {"steps", steps},
                      {"subproblems", subproblems},
                      {"route_splits", route_splits},
                      {"carried", carried},
                      {"search_seconds", seconds},
                      {"subproblems_per_s", rate},
                      {"verified_by_search", verified_s.size()},
                      {"median_verified_seconds", median},
                      {"unknown_searches", unknown_n},
                      {"unknown_verified_share", mean_unknown_share},
                      {"root_seconds", root},
                      {"median_root_seconds", root_median},
                      {"root_share", root_share}};
  for (double eps : cfg.eps_grid.values()) {
    const double v = res.certified_at(eps).value_or(0), f = res.falsified_at(eps).value_or(0),
                 u = res.unknown_at(eps).value_or(0);
    std::printf("eps %s: verified %.3f, falsified %.3f, unknown %.3f, misclassified %.3f\n",
                eps_key(eps).c_str(), v, f, u, 1 - res.aggregates.clean_accuracy);
    j["verdicts"][eps_key(eps)] = {{"verified", v}, {"falsified", f}, {"unknown", u}};
  }
  std::ofstream(out) << j.dump(2) << "\n";
  return 0;
}
