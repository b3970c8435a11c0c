// The papers' backbones (issue: the papers' scale), all cores, CIFAR-shaped inputs:
//  1. training cost: images/s of forward+backward (CE) and of one PGD-10 attack
//     (10 input-gradient steps) for each backbone as the dense network, as a MoE of
//     4 top-1 experts, and as a MoE-CNN of N = 2 groups at r = 0.5 (AdvMoE), measured
//     in the same run with interleaved rounds (each line keeps its best); paper 2's
//     claim is that a MoE-CNN at r = 0.5 costs about half the dense network's FLOPs,
//     so the ratio MoE-CNN / dense of achieved img/s is the number to read (backbones
//     without a MoE-CNN body, the ViT, have the first two lines only);
//  2. certification cost: bounds (--cert-methods) of one MoE-CNN path (r =
//     --cert-scale; the dense backbone when it has no MoE-CNN body) at ε = 1/255 (L∞,
//     box), seconds per sample and the peak resident memory after each (the
//     process's maximum so far, so read the increase).
// Prints a table and writes JSON (--out).
#include <sys/resource.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bench_util.h"
#include "moecert/attacks.h"
#include "moecert/backbones.h"
#include "moecert/bounds.h"
#include "moecert/checkpoint.h"
#include "moecert/models.h"
#include "moecert/runtime.h"

using namespace moecert;
using moecert_bench::time_per_call;

namespace {

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

ModelSpec cifar_spec(const std::string& expert) {
  ModelSpec s;
  s.expert = expert, s.in_channels = 3, s.height = 32, s.width = 32;
  s.mean = {0.49, 0.48, 0.45}, s.std = {0.25, 0.24, 0.26};
  return s;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_backbones: training and certification cost of the papers' backbones"};
  std::string out = "bench_backbones.json",
              list = "resnet18,wrn-16-4,vgg16-bn,densenet-bc-40-12,vit-small";
  int threads = 0, rounds = 2;
  double min_seconds = 1.0, cert_scale = 0.25;
  int64_t batch = 64, cert_samples = 2;
  std::string cert_methods = "ibp,crown";
  app.add_option("--out", out, "JSON output file")->capture_default_str();
  app.add_option("--backbones", list, "comma-separated backbone names")->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores")->capture_default_str();
  app.add_option("--seconds", min_seconds, "minimum timing window per line")->capture_default_str();
  app.add_option("--batch", batch)->capture_default_str();
  app.add_option("--rounds", rounds, "interleaved rounds; each line keeps its best")
      ->capture_default_str();
  app.add_option("--cert-scale", cert_scale, "group width r of the certified MoE-CNN path")
      ->capture_default_str();
  app.add_option("--cert-samples", cert_samples, "samples per certification timing")
      ->capture_default_str();
  app.add_option("--cert-methods", cert_methods,
                 "comma-separated: ibp, crown-ibp, crown (empty: none)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  threads = runtime_threads(threads);
  torch::manual_seed(0);
  std::printf("threads %d, BLAS %s, B = %lld, 3x32x32\n\n", threads, runtime_blas_library().c_str(),
              static_cast<long long>(batch));

  nlohmann::json rows = nlohmann::json::array();
  std::printf("%-18s %-8s %12s %12s %12s\n", "backbone", "model", "params", "fwd+bwd/s",
              "PGD-10 img/s");
  for (const auto& name : split(list)) {
    ModelSpec dense = cifar_spec(name), moe = dense, cnn = dense;
    dense.experts = 1;
    moe.experts = 4;
    cnn.kind = "moe-cnn", cnn.experts = 2, cnn.scale = 0.5;
    bool groups = false;  // whether the backbone has a MoE-CNN body
    for (const auto& e : backbone_registry())
      if (e.matches(name)) groups = e.make_groups || e.trunk_features;
    std::vector<Moe> models{Moe(dense), Moe(moe)};
    if (groups) models.push_back(Moe(cnn));
    const int count = static_cast<int>(models.size());
    const char* kinds[3] = {"dense", "moe-4", "moe-cnn"};
    auto x = torch::rand({batch, 3, 32, 32});
    auto y = torch::randint(10, {batch}, torch::kLong);
    PgdConfig pgd;
    pgd.eps = 8.0 / 255, pgd.steps = 10, pgd.step_size = 2.0 / 255;
    double best[3][2] = {};
    for (int round = 0; round < rounds; ++round)
      for (int m = 0; m < count; ++m) {
        auto& model = models[m];
        model->train();
        const double b = static_cast<double>(batch);
        best[m][0] =
            std::max(best[m][0], b / time_per_call(
                                         [&] {
                                           model->zero_grad(true);
                                           torch::nll_loss(model->forward(x), y).backward();
                                         },
                                         min_seconds));
        model->eval();
        auto f = [&](const torch::Tensor& v) { return model->forward(v); };
        best[m][1] =
            std::max(best[m][1], b / time_per_call([&] { attack_pgd(f, x, y, pgd); }, min_seconds));
      }
    nlohmann::json row = {{"backbone", name}};
    for (int m = 0; m < count; ++m) {
      const auto params = module_parameter_count(*models[m]);
      std::printf("%-18s %-8s %12lld %12.1f %12.1f\n", name.c_str(), kinds[m],
                  static_cast<long long>(params), best[m][0], best[m][1]);
      row[kinds[m]] = {{"parameters", params},
                       {"forward_backward_img_s", best[m][0]},
                       {"pgd10_img_s", best[m][1]}};
    }
    if (groups) {
      const double ratio = best[2][0] / best[0][0], pgd_ratio = best[2][1] / best[0][1];
      std::printf("%-18s MoE-CNN / dense img/s: fwd+bwd %.2fx, PGD-10 %.2fx (FLOP ratio ~2x)\n",
                  name.c_str(), ratio, pgd_ratio);
      row["moe_cnn_over_dense_forward_backward"] = ratio;
      row["moe_cnn_over_dense_pgd10"] = pgd_ratio;
    }

    // 2. certification of one MoE-CNN path (or of the dense backbone)
    ModelSpec narrow = groups ? cnn : dense;
    narrow.scale = cert_scale;
    Moe path_model(narrow);
    path_model->eval();
    const BoundGraph g(path_model->component_graph(0), {3, 32, 32});
    const double scale = groups ? cert_scale : 1.0;
    auto xs = torch::rand({cert_samples, 3, 32, 32}, torch::kFloat64);
    const InputDomain d{xs, torch::full({cert_samples}, 1.0 / 255, torch::kFloat64), Norm::linf,
                        true};
    auto C = torch::randn({cert_samples, 9, 10}, torch::kFloat64);
    for (auto method : {BoundMethod::ibp, BoundMethod::crown_ibp, BoundMethod::crown}) {
      const char* mname = method == BoundMethod::ibp         ? "ibp"
                          : method == BoundMethod::crown_ibp ? "crown-ibp"
                                                             : "crown";
      const auto wanted = split(cert_methods);
      if (std::find(wanted.begin(), wanted.end(), mname) == wanted.end()) continue;
      BoundOptions opt;
      opt.method = method;
      opt.fp32 = Float32Errors::automatic;  // as certify runs it
      const auto t0 = std::chrono::steady_clock::now();
      auto pass = bound_forward(g, d, opt);
      auto sb = bound_specs(pass, C);
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
          static_cast<double>(cert_samples);
      std::printf("%-18s certify %-9s r=%.2f: %.3f s/sample, peak RSS %.0f MB\n", name.c_str(),
                  mname, scale, s, peak_rss_mb());
      row["certify"][mname] = {
          {"seconds_per_sample", s}, {"peak_rss_mb", peak_rss_mb()}, {"scale", scale}};
    }
    std::printf("\n");
    rows.push_back(row);
  }
  nlohmann::json j = {
      {"benchmark", "bench_backbones"}, {"threads", threads}, {"batch", batch}, {"rounds", rounds},
      {"blas", runtime_blas_library()}, {"rows", rows}};
  write_file_atomic(out, j.dump(2) + "\n");
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
