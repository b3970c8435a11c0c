// MoE dispatch benchmark (issue: foundation). B = 128, E = 4 cnn-s experts,
// 28x28 inputs, all cores: forward, forward+backward and PGD-10 throughput of
// top-1 MoE, soft MoE, a dense cnn-s, and a naive per-sample-loop dispatch,
// each also as a fraction of the machine's float32 GEMM peak measured in the
// same run; one AT and one RT-ER training step (PGD-10, Adam) of the top-1 MoE;
// and, when --peer names it, the PyTorch peer (../shared/peer/peer_moe.py) run in
// the same job on the same threads, with our/peer ratios. Prints a table and
// writes JSON (--out).
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>

#include "bench_util.h"
#include "moecert/attacks.h"
#include "moecert/checkpoint.h"
#include "moecert/models.h"
#include "moecert/runtime.h"
#include "moecert/training.h"

using namespace moecert;

namespace {

using moecert_bench::gemm_peak_gflops;
using moecert_bench::time_per_call;

struct Variant {
  std::string name;
  Moe model{nullptr};
  std::function<torch::Tensor(const torch::Tensor&)> log_probs;  // [B,C,H,W] -> [B,K]
  double mflop_forward;                                          // per image, forward only
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_moe: MoE dispatch throughput"};
  std::string out = "bench_moe.json";
  int threads = 0;
  double min_seconds = 2.0;
  int64_t batch = 128;
  int rounds = 3;
  std::string peer = std::string(MOECERT_SOURCE_DIR) + "/../shared/peer/peer_moe.py";
  app.add_option("--out", out, "JSON output file")->capture_default_str();
  app.add_option("--peer", peer, "the PyTorch peer script to run in the same job (\"\" = skip)")
      ->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores")->capture_default_str();
  app.add_option("--seconds", min_seconds, "minimum timing window per line")->capture_default_str();
  app.add_option("--batch", batch)->capture_default_str();
  app.add_option("--rounds", rounds, "interleaved rounds; each line keeps its best")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  threads = runtime_threads(threads);
  torch::manual_seed(0);
  const std::string blas = runtime_blas_library();
  const double peak = gemm_peak_gflops(min_seconds);
  std::printf("threads %d, BLAS %s\nfloat32 GEMM peak (2048^2 matmul): %.1f GFLOP/s\n\n", threads,
              blas.c_str(), peak);

  ModelSpec top1;  // E = 4, cnn-s, linear router, top-1
  ModelSpec soft = top1;
  soft.routing = Routing::soft;
  ModelSpec dense = top1;
  dense.experts = 1;
  const double cnn_s = 0.91, router = 784.0 * 4 * 2 / 1e6;

  std::vector<Variant> variants;
  auto add = [&](const std::string& name, const ModelSpec& spec, double mflop, bool loop) {
    Variant v{name, Moe(spec), nullptr, mflop};
    v.model->eval();
    auto m = v.model;
    if (loop)
      v.log_probs = [m](const torch::Tensor& x) mutable {
        return torch::log(moe_reference_probs(*m, x));
      };
    else
      v.log_probs = [m](const torch::Tensor& x) mutable { return m->forward(x); };
    variants.push_back(v);
  };
  add("moe-top1", top1, cnn_s + router, false);
  add("moe-soft", soft, 4 * cnn_s + router, false);
  add("dense-cnn-s", dense, cnn_s, false);
  add("moe-top1-loop", top1, cnn_s + router, true);

  auto x = torch::rand({batch, 1, 28, 28});
  auto y = torch::randint(10, {batch}, torch::kLong);
  // As the peer does: shift the router biases so that the batch spreads over the
  // experts (a random linear router on uniform noise sends it mostly to one).
  for (auto& v : variants) {
    if (!v.model->router()) continue;
    torch::NoGradGuard g;
    auto logits = v.model->router_logits(x);
    v.model->router()->named_parameters()["fc.bias"] -= logits.mean(0) - logits.mean();
  }
  PgdConfig pgd;
  pgd.steps = 10;
  pgd.step_size = 0.025;

  // Rounds interleave the variants so that a burst of load on this shared machine
  // hits all of them alike; each line keeps its best round.
  const size_t nv = variants.size();
  std::vector<std::array<double, 3>> best(nv, {0, 0, 0});
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < nv; ++i) {
      auto& v = variants[i];
      auto fwd = [&] {
        torch::NoGradGuard g;
        v.log_probs(x);
      };
      auto fwd_bwd = [&] {
        v.model->zero_grad(/*set_to_none=*/true);
        torch::nll_loss(v.log_probs(x), y).backward();
      };
      auto pgd10 = [&] {
        FrozenParameters frozen(*v.model);
        attack_pgd(v.log_probs, x, y, pgd);
      };
      const double b = static_cast<double>(batch);
      best[i][0] = std::max(best[i][0], b / time_per_call(fwd, min_seconds));
      best[i][1] = std::max(best[i][1], b / time_per_call(fwd_bwd, min_seconds));
      best[i][2] = std::max(best[i][2], b / time_per_call(pgd10, min_seconds));
    }
  }
  nlohmann::json rows = nlohmann::json::array();
  std::printf("%-15s %12s %12s %12s   %8s %8s %8s\n", "variant", "fwd img/s", "fwd+bwd", "PGD-10",
              "fwd %pk", "f+b %pk", "pgd %pk");
  for (size_t i = 0; i < nv; ++i) {
    const auto& v = variants[i];
    const double r_fwd = best[i][0], r_fb = best[i][1], r_pgd = best[i][2];
    // FLOP model: backward (weights + input) ~ 2x forward; an input-only
    // backward ~ 1x forward; PGD-k = k x (forward + input backward).
    auto pct = [&](double rate, double mult) {
      return 100.0 * rate * v.mflop_forward * mult / 1e3 / peak;
    };
    std::printf("%-15s %12.0f %12.0f %12.0f   %7.1f%% %7.1f%% %7.1f%%\n", v.name.c_str(), r_fwd,
                r_fb, r_pgd, pct(r_fwd, 1), pct(r_fb, 3), pct(r_pgd, 20));
    rows.push_back({{"variant", v.name},
                    {"forward_img_s", r_fwd},
                    {"forward_backward_img_s", r_fb},
                    {"pgd10_img_s", r_pgd},
                    {"mflop_forward_per_image", v.mflop_forward},
                    {"forward_peak_fraction", pct(r_fwd, 1) / 100},
                    {"forward_backward_peak_fraction", pct(r_fb, 3) / 100},
                    {"pgd10_peak_fraction", pct(r_pgd, 20) / 100}});
  }
  // One AT and one RT-ER training step of the top-1 MoE: PGD-10 (eps 8/255, step
  // 2/255, as the peer), loss, backward, Adam; the default router gradient (top2).
  double at_rate = 0, rter_rate = 0;
  {
    TrainConfig tc;
    tc.attack.eps = 8.0 / 255, tc.attack.step_size = 2.0 / 255, tc.attack.steps = 10;
    for (int round = 0; round < rounds; ++round)
      for (const char* method : {"at", "rt-er"}) {
        Moe m(top1);
        {
          torch::NoGradGuard g;
          auto src = variants[0].model->named_parameters();
          for (auto& kv : m->named_parameters()) kv.value().copy_(src[kv.key()]);
        }
        auto opt = torch::optim::Adam(m->parameters(), torch::optim::AdamOptions(1e-4));
        auto step = train_method_make(method);
        auto fn = [&] {
          auto s = step->step(*m, x, y, tc);
          opt.zero_grad();
          s.loss.backward();
          opt.step();
        };
        double& r = std::string(method) == "at" ? at_rate : rter_rate;
        r = std::max(r, static_cast<double>(batch) / time_per_call(fn, min_seconds));
      }
  }
  std::printf("%-15s %12.0f img/s\n%-15s %12.0f img/s  (%.2fx AT; target >= 0.5)\n", "at-step",
              at_rate, "rt-er-step", rter_rate, rter_rate / at_rate);
  auto rate = [&](int i, const char* key) {
    return rows[static_cast<size_t>(i)][key].get<double>();
  };
  const double vs_dense = rate(0, "forward_backward_img_s") / rate(2, "forward_backward_img_s");
  const double vs_loop = rate(0, "forward_backward_img_s") / rate(3, "forward_backward_img_s");
  std::printf(
      "\ntop-1 MoE fwd+bwd: %.2fx the dense expert (target >= 0.6), %.1fx the per-sample loop "
      "(target >= 3)\n",
      vs_dense, vs_loop);
  nlohmann::json j = {{"benchmark", "bench_moe"},
                      {"threads", threads},
                      {"blas", blas},
                      {"batch", batch},
                      {"rounds", rounds},
                      {"experts", 4},
                      {"gemm_peak_gflops", peak},
                      {"rows", rows},
                      {"top1_vs_dense_fwd_bwd", vs_dense},
                      {"top1_vs_loop_fwd_bwd", vs_loop},
                      {"at_step_img_s", at_rate},
                      {"rter_step_img_s", rter_rate},
                      {"rter_vs_at", rter_rate / at_rate}};
  // The peer, in the same job, on the same number of threads.
  if (!peer.empty() && std::filesystem::exists(peer)) {
    const std::string peer_json = out + ".peer.json";
    const std::string cmd = "python3 '" + peer + "' --quick --no-gemm --threads " +
                            std::to_string(threads) + " --out '" + peer_json + "' > '" + out +
                            ".peer.log' 2>&1";
    std::printf("\nrunning the peer: %s\n", cmd.c_str());
    std::fflush(stdout);
    if (std::system(cmd.c_str()) == 0) {
      std::ifstream in(peer_json);
      auto pj = nlohmann::json::parse(in);
      const auto& ps = pj["summary_images_per_s"]["batched|threads=" + std::to_string(threads)];
      const double p_fwd = ps["forward"], p_fb = ps["forward_backward"], p_pgd = ps["pgd10"],
                   p_rter = ps["rter_step"];
      const double r_fwd = rate(0, "forward_img_s") / p_fwd,
                   r_fb = rate(0, "forward_backward_img_s") / p_fb,
                   r_pgd = rate(0, "pgd10_img_s") / p_pgd, r_rter = rter_rate / p_rter;
      std::printf(
          "peer (batched PyTorch, %d threads): fwd %.0f, fwd+bwd %.0f, PGD-10 %.0f, RT-ER step "
          "%.0f img/s\n"
          "ours / peer: fwd %.2fx, fwd+bwd %.2fx, PGD-10 %.2fx (targets >= 1.2), RT-ER step "
          "%.2fx\n",
          threads, p_fwd, p_fb, p_pgd, p_rter, r_fwd, r_fb, r_pgd, r_rter);
      j["peer"] = {{"script", peer},
                   {"forward_img_s", p_fwd},
                   {"forward_backward_img_s", p_fb},
                   {"pgd10_img_s", p_pgd},
                   {"rter_step_img_s", p_rter}};
      j["vs_peer"] = {
          {"forward", r_fwd}, {"forward_backward", r_fb}, {"pgd10", r_pgd}, {"rter_step", r_rter}};
    } else {
      std::printf("the peer failed (see %s.peer.log); no ratios\n", out.c_str());
    }
  } else {
    std::printf("\nno peer script at '%s' (--peer): no ratios\n", peer.c_str());
  }
  write_file_atomic(out, j.dump(2) + "\n");
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
