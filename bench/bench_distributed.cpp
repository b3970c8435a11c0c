// Data-parallel gradient reduction benchmark (docs/distributed.md): two ranks on
// loopback over Gloo, forked by this program, each training step's forward and
// backward of a MoE on its half of the batch, with the gradients summed
//   plain      not at all (the compute alone: the floor),
//   after      in buckets launched after the backward pass,
//   overlap    in buckets launched from inside the pass as they fill (the default).
// Prints seconds per step and the share of the communication the overlap hides,
// (after - overlap) / (after - plain); writes JSON (--out). Variants interleave per
// round and each keeps its best round, so both ranks see the same machine load.
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bench_util.h"
#include "moecert/distributed.h"
#include "moecert/models.h"
#include "moecert/runtime.h"

using namespace moecert;

namespace {

struct Options {
  std::string out = "bench_distributed.json", expert = "resnet18";
  int experts = 2, rounds = 3, steps = 3, threads = 1, port = 29611;
  int64_t batch = 32, bucket_mib = 25;
};

/// One rank's run; rank 0 prints and writes the JSON. Returns the process's exit code.
int rank_main(int rank, const Options& o) {
  torch::set_num_threads(o.threads);
  DistributedEnv env;
  env.rank = rank, env.world_size = 2, env.local_rank = rank, env.local_world_size = 2;
  env.master_addr = "127.0.0.1", env.master_port = o.port;
  auto group = distributed_join(env, "gloo", std::chrono::seconds(120));

  ModelSpec spec;
  spec.expert = o.expert, spec.experts = o.experts, spec.in_channels = 3;
  spec.height = spec.width = 32;
  spec.mean = {0.49, 0.48, 0.45}, spec.std = {0.25, 0.24, 0.26};
  torch::manual_seed(0);
  Moe model(spec);
  model->train();
  std::vector<torch::Tensor> params;
  for (const auto& p : model->parameters()) params.push_back(p);
  torch::manual_seed(1 + rank);
  const int64_t half = o.batch / 2;
  const auto x = torch::rand({half, 3, 32, 32});
  const auto y = torch::randint(10, {half}, torch::kLong);

  GradientBuckets after, overlap;
  after.bytes = overlap.bytes = o.bucket_mib << 20;
  after.overlap = false;
  GradientReducer reduce_after(params, *group, after), reduce_overlap(params, *group, overlap);
  const char* names[3] = {"plain", "after", "overlap"};
  double best[3] = {1e30, 1e30, 1e30};
  for (int round = 0; round < o.rounds; ++round)
    for (int v = 0; v < 3; ++v) {
      auto step = [&] {
        model->zero_grad();
        auto loss = torch::nll_loss(model->forward(x), y) * 0.5;
        if (v == 0) return loss.backward();
        (v == 1 ? reduce_after : reduce_overlap).backward(loss);
      };
      step();  // warm-up
      group->barrier();
      const auto start = moecert_bench::Clock::now();
      for (int s = 0; s < o.steps; ++s) step();
      group->barrier();
      const double seconds =
          std::chrono::duration<double>(moecert_bench::Clock::now() - start).count() / o.steps;
      best[v] = std::min(best[v], seconds);
    }
  if (rank != 0) return 0;
  int64_t count = 0;
  for (const auto& p : params) count += p.numel();
  const double hidden = (best[1] - best[2]) / std::max(best[1] - best[0], 1e-9);
  std::printf("2 ranks x %d thread(s), Gloo on loopback, BLAS %s\n", o.threads,
              runtime_blas_library().c_str());
  std::printf(
      "model: %d x %s MoE, %lld parameters (%.1f MiB of gradients), batch %lld (%lld/rank)\n",
      o.experts, o.expert.c_str(), static_cast<long long>(count),
      static_cast<double>(count) * 4 / (1 << 20), static_cast<long long>(o.batch),
      static_cast<long long>(half));
  nlohmann::json j = {{"ranks", 2},
                      {"threads_per_rank", o.threads},
                      {"expert", o.expert},
                      {"experts", o.experts},
                      {"parameters", count},
                      {"batch", o.batch},
                      {"bucket_mib", o.bucket_mib},
                      {"blas", runtime_blas_library()}};
  for (int v = 0; v < 3; ++v) {
    std::printf("%-8s %8.3f s/step\n", names[v], best[v]);
    j[std::string(names[v]) + "_s_per_step"] = best[v];
  }
  std::printf("communication after the pass: %.3f s/step; overlap hides %.0f %% of it\n",
              best[1] - best[0], 100 * hidden);
  j["overlap_hidden_share"] = hidden;
  std::ofstream(o.out) << j.dump(2) << "\n";
  std::printf("wrote %s\n", o.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_distributed: overlapped gradient all-reduce, two ranks over Gloo"};
  Options o;
  app.add_option("--out", o.out, "JSON output file")->capture_default_str();
  app.add_option("--expert", o.expert, "expert backbone")->capture_default_str();
  app.add_option("--experts", o.experts)->capture_default_str();
  app.add_option("--batch", o.batch, "global batch, split over the two ranks")
      ->capture_default_str();
  app.add_option("--rounds", o.rounds, "interleaved rounds; each variant keeps its best")
      ->capture_default_str();
  app.add_option("--steps", o.steps, "timed steps per variant and round")->capture_default_str();
  app.add_option("--threads", o.threads, "threads per rank")->capture_default_str();
  app.add_option("--bucket-mib", o.bucket_mib, "bucket size")->capture_default_str();
  app.add_option("--port", o.port, "loopback port of the rendezvous")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (o.batch < 2 || o.steps < 1 || o.rounds < 1 || o.threads < 1 || o.bucket_mib < 1) {
    std::fprintf(stderr,
                 "bench_distributed: --batch >= 2 and --steps, --rounds, --threads, "
                 "--bucket-mib >= 1\n");
    return 2;
  }
  std::fflush(stdout);
  // Fork before LibTorch starts any thread; each child is one rank.
  pid_t children[2];
  for (int rank = 0; rank < 2; ++rank) {
    children[rank] = fork();
    if (children[rank] < 0) {
      std::perror("bench_distributed: fork");
      return 1;
    }
    if (children[rank] == 0) {
      int rc = 1;
      try {
        rc = rank_main(rank, o);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_distributed rank %d: %s\n", rank, e.what());
      }
      std::fflush(nullptr);
      std::_Exit(rc);
    }
  }
  int code = 0;
  for (pid_t child : children) {
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) code = 1;
  }
  return code;
}
