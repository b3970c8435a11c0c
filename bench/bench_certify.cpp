// Certification benchmark (issue: certification engine), all cores:
//  1. `local` certification of an E = 4 cnn-s MoE on Fashion-MNIST-shaped inputs:
//     samples/s of certify_run with the local and global estimators, bisection
//     included, PGD cross-check excluded (target >= 10 samples/s);
//  2. `global` constants (p = 2, 32x32 inputs) of an E = 4 ResNet-18 MoE: seconds
//     for the router and all experts (target <= 60 s);
//  3. the cost of one lipschitz_local call on a cnn-s expert (diagnostic).
// With --checkpoint the first part certifies that trained model on the real test set.
#include "bench_util.h"
#include "moecert/certify.h"
#include "moecert/checkpoint.h"
#include "moecert/runtime.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>

using namespace moecert;

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_certify: certification speed"};
  std::string out = "bench_certify.json", checkpoint;
  int threads = 0;
  int64_t samples = 200;
  bool skip_resnet = false;
  app.add_option("--out", out, "JSON output file")->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores")->capture_default_str();
  app.add_option("--samples", samples, "samples certified in part 1")->capture_default_str();
  app.add_option("--checkpoint", checkpoint, "a trained E = 4 cnn-s MoE (default: random weights)");
  app.add_flag("--skip-resnet", skip_resnet, "skip part 2");
  CLI11_PARSE(app, argc, argv);
  threads = runtime_threads(threads);
  torch::manual_seed(0);
  nlohmann::json j = {{"benchmark", "bench_certify"}, {"threads", threads}};

  // 1. local certification of an E = 4 cnn-s MoE
  LoadedModel loaded;
  Dataset data;
  if (!checkpoint.empty()) {
    loaded = model_load(checkpoint, torch::kCPU);
    DataSpec d;
    d.name = loaded.manifest["dataset"].value("name", "fashion-mnist");
    d.train = false;
    data = data_load(d);
  } else {
    ModelSpec spec;
    loaded.model = Moe(spec);
    loaded.manifest = {{"architecture", spec.to_json()}};
    DataSpec d;
    d.name = "synthetic";
    d.samples = samples;
    d.train = false;
    data = data_load(d);
  }
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < std::min(samples, data.size()); ++i) idx.push_back(i);
  CertifyConfig cfg;
  cfg.empirical = false;
  cfg.estimators = {Estimator::global, Estimator::local};
  auto t0 = std::chrono::steady_clock::now();
  auto res = certify_run(loaded, data, idx, cfg, torch::kCPU, false);
  const double wall = seconds_since(t0);
  const double rate = res["timing"]["certify_samples_per_s"].get<double>();
  std::printf("local+global certification, E=4 cnn-s MoE (%s): %zu samples in %.1f s = %.1f samples/s "
              "(target >= 10)\n", checkpoint.empty() ? "random weights" : checkpoint.c_str(), idx.size(),
              wall, rate);
  j["local_certify"] = {{"samples", idx.size()}, {"seconds", wall}, {"samples_per_s", rate},
                        {"checkpoint", checkpoint}, {"aggregates", res["aggregates"]}};

  // 3. one lipschitz_local call
  {
    auto& m = *loaded.model;
    m.to(torch::kFloat64);
    auto g = m.component_graph(0);
    auto x = data.batch_images(torch::arange(std::min<int64_t>(100, data.size()))).to(torch::kFloat64);
    auto eps = torch::full({x.size(0)}, 0.005, torch::kFloat64);
    const double s = moecert_bench::time_per_call([&] { lipschitz_local(g, Norm::linf, x, eps); }, 1.0);
    std::printf("lipschitz_local, one cnn-s expert, %lld samples: %.3f s (%.0f samples/s)\n",
                static_cast<long long>(x.size(0)), s, x.size(0) / s);
    j["local_call"] = {{"samples", x.size(0)}, {"seconds", s}};
  }

  // 2. global constants of an E = 4 ResNet-18 MoE, p = 2, 32x32
  if (!skip_resnet) {
    ModelSpec spec;
    spec.expert = "resnet18", spec.in_channels = 3, spec.height = 32, spec.width = 32;
    spec.mean = {0.5, 0.5, 0.5}, spec.std = {0.25, 0.25, 0.25};
    Moe moe(spec);
    moe->eval();
    auto t1 = std::chrono::steady_clock::now();
    std::vector<double> consts;
    consts.push_back(lipschitz_global(moe->component_graph(-1), Norm::l2, {3, 32, 32}).value);
    for (int64_t i = 0; i < 4; ++i)
      consts.push_back(lipschitz_global(moe->component_graph(i), Norm::l2, {3, 32, 32}).value);
    const double s = seconds_since(t1);
    std::printf("global constants (p=2) of an E=4 ResNet-18 MoE + router: %.1f s (target <= 60)\n", s);
    j["resnet18_global_p2"] = {{"seconds", s}, {"constants", consts}};
  }
  write_file_atomic(out, j.dump(2) + "\n");
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
