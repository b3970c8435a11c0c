// MoE-CNN benchmark (issue: robust training). The realised speed of top-1
// channel-group computation (AdvMoE's MoE-CNN, N groups of width r·C_out) against
// the dense backbone of the same total width, forward at B = 128, all cores; also
// forward+backward. cnn-s on 28x28 (Fashion-MNIST) and ResNet-18 on 32x32 (CIFAR).
// Prints a table and writes JSON (--out).
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "bench_util.h"
#include "moecert/checkpoint.h"
#include "moecert/models.h"
#include "moecert/runtime.h"

using namespace moecert;
using moecert_bench::time_per_call;

namespace {

struct Pair {
  std::string backbone;
  ModelSpec moe_cnn, dense;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_moe_cnn: MoE-CNN channel-group speed vs the dense backbone"};
  std::string out = "bench_moe_cnn.json";
  int threads = 0, rounds = 3;
  double min_seconds = 2.0, scale = 0.5;
  int64_t batch = 128, groups = 2;
  bool skip_resnet = false;
  app.add_option("--out", out, "JSON output file")->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores")->capture_default_str();
  app.add_option("--seconds", min_seconds, "minimum timing window per line")->capture_default_str();
  app.add_option("--batch", batch)->capture_default_str();
  app.add_option("--groups", groups, "N channel groups")->capture_default_str();
  app.add_option("--scale", scale, "group width r")->capture_default_str();
  app.add_option("--rounds", rounds, "interleaved rounds; each line keeps its best")
      ->capture_default_str();
  app.add_flag("--skip-resnet", skip_resnet, "cnn-s only");
  CLI11_PARSE(app, argc, argv);
  threads = runtime_threads(threads);
  torch::manual_seed(0);
  std::printf("threads %d, BLAS %s, B = %lld, N = %lld, r = %.2f\n\n", threads,
              runtime_blas_library().c_str(), static_cast<long long>(batch),
              static_cast<long long>(groups), scale);

  std::vector<Pair> pairs;
  for (const std::string backbone : {"cnn-s", "resnet18"}) {
    if (backbone == "resnet18" && skip_resnet) continue;
    Pair p{backbone, {}, {}};
    p.moe_cnn.kind = "moe-cnn", p.moe_cnn.expert = backbone, p.moe_cnn.experts = groups;
    p.moe_cnn.scale = scale, p.moe_cnn.routing = Routing::top_k, p.moe_cnn.top_k = 1;
    if (backbone == "resnet18") {
      p.moe_cnn.in_channels = 3, p.moe_cnn.height = 32, p.moe_cnn.width = 32;
      p.moe_cnn.mean = {0.5, 0.5, 0.5}, p.moe_cnn.std = {0.25, 0.25, 0.25};
    }
    p.dense = p.moe_cnn;
    p.dense.kind = "moe", p.dense.experts = 1;  // the dense backbone, full width
    pairs.push_back(p);
  }

  nlohmann::json rows = nlohmann::json::array();
  std::printf("%-10s %-8s %12s %12s %12s\n", "backbone", "model", "params", "fwd img/s", "fwd+bwd");
  for (auto& p : pairs) {
    Moe moe(p.moe_cnn), dense(p.dense);
    moe->eval(), dense->eval();
    const auto& s = p.dense;
    auto x = torch::rand({batch, s.in_channels, s.height, s.width});
    auto y = torch::randint(s.num_classes, {batch}, torch::kLong);
    double best[2][2] = {{0, 0}, {0, 0}};
    Moe models[2] = {moe, dense};
    for (int round = 0; round < rounds; ++round)
      for (int m = 0; m < 2; ++m) {
        auto& model = models[m];
        const double b = static_cast<double>(batch);
        best[m][0] = std::max(best[m][0], b / time_per_call(
                                                  [&] {
                                                    torch::NoGradGuard g;
                                                    model->forward(x);
                                                  },
                                                  min_seconds));
        best[m][1] =
            std::max(best[m][1], b / time_per_call(
                                         [&] {
                                           model->zero_grad(true);
                                           torch::nll_loss(model->forward(x), y).backward();
                                         },
                                         min_seconds));
      }
    const char* names[2] = {"moe-cnn", "dense"};
    for (int m = 0; m < 2; ++m)
      std::printf("%-10s %-8s %12lld %12.0f %12.0f\n", p.backbone.c_str(), names[m],
                  static_cast<long long>(module_parameter_count(*models[m])), best[m][0],
                  best[m][1]);
    const double fwd = best[0][0] / best[1][0], fb = best[0][1] / best[1][1];
    std::printf("%-10s MoE-CNN / dense: forward %.2fx (target >= 1.5), fwd+bwd %.2fx\n\n",
                p.backbone.c_str(), fwd, fb);
    rows.push_back({{"backbone", p.backbone},
                    {"moe_cnn_forward_img_s", best[0][0]},
                    {"dense_forward_img_s", best[1][0]},
                    {"moe_cnn_forward_backward_img_s", best[0][1]},
                    {"dense_forward_backward_img_s", best[1][1]},
                    {"forward_speedup", fwd},
                    {"forward_backward_speedup", fb},
                    {"moe_cnn_parameters", module_parameter_count(*models[0])},
                    {"dense_parameters", module_parameter_count(*models[1])}});
  }
  nlohmann::json j = {{"benchmark", "bench_moe_cnn"},
                      {"threads", threads},
                      {"batch", batch},
                      {"groups", groups},
                      {"scale", scale},
                      {"rounds", rounds},
                      {"rows", rows}};
  write_file_atomic(out, j.dump(2) + "\n");
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
