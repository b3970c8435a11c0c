// Data-parallel training (docs/distributed.md): two ranks on loopback over Gloo,
// started by the test itself, against one process with the same global batch.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <map>

#include "checkpoint_compare.h"
#include "moecert/distributed.h"
#include "moecert/error.h"
#include "moecert/model_io.h"
#include "test_util.h"

using namespace moecert;
using namespace moecert_test;

namespace {

struct RankRuns {
  std::vector<int> codes;
  std::string output;
};

/// Runs `args` as `world` ranks at once; waits for all. Logs and exit codes per rank.
RankRuns run_ranks(const std::string& args, int world, const TempDir& dir) {
  const int port = free_port();
  std::string cmd;
  for (int r = 0; r < world; ++r) {
    const std::string log = dir / ("rank" + std::to_string(r) + ".log");
    const std::string rc = dir / ("rank" + std::to_string(r) + ".rc");
    cmd += "(" + rank_env(r, world, port) + moecert_cmd(args) + " > " + log + " 2>&1; echo $? > " +
           rc + ") & ";
  }
  run_shell(cmd + "wait");
  RankRuns out;
  for (int r = 0; r < world; ++r) {
    out.codes.push_back(std::stoi(read_text(dir / ("rank" + std::to_string(r) + ".rc"))));
    out.output += "--- rank " + std::to_string(r) + "\n" +
                  read_text(dir / ("rank" + std::to_string(r) + ".log"));
  }
  return out;
}

const char* kData = "--dataset synthetic --samples 256 --quiet ";

/// Trains in one process; requires success.
void train_one(const std::string& args) {
  auto r = run_shell(moecert_cmd(args));
  INFO(r.output);
  REQUIRE(r.code == 0);
}

/// Trains as two ranks; requires both to succeed.
void train_two(const std::string& args, const TempDir& dir) {
  auto r = run_ranks(args, 2, dir);
  INFO(r.output);
  REQUIRE(r.codes == std::vector<int>{0, 0});
}

}  // namespace

TEST_CASE("distributed_env reads torchrun's variables and names the one missing", "[unit]") {
  std::map<std::string, std::string> vars;
  auto get = [&vars](const char* n) -> const char* {
    auto it = vars.find(n);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
  CHECK_FALSE(distributed_env(get).distributed());  // no WORLD_SIZE: one process
  vars = {{"WORLD_SIZE", "1"}};
  CHECK_FALSE(distributed_env(get).distributed());
  // torchrun --nproc_per_node=1 gives a store: a group of one.
  vars = {
      {"WORLD_SIZE", "1"}, {"RANK", "0"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29400"}};
  CHECK(distributed_env(get).distributed());
  vars.erase("RANK");
  CHECK_THROWS_AS(distributed_env(get), ConfigError);
  vars = {{"WORLD_SIZE", "4"},      {"RANK", "3"},
          {"LOCAL_RANK", "1"},      {"LOCAL_WORLD_SIZE", "2"},
          {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29500"}};
  auto env = distributed_env(get);
  CHECK(env.distributed());
  CHECK(env.rank == 3);
  CHECK(env.world_size == 4);
  CHECK(env.local_rank == 1);
  CHECK(env.local_world_size == 2);
  CHECK(env.master_addr == "node0");
  CHECK(env.master_port == 29500);
  CHECK_FALSE(env.agent_store);
  vars["TORCHELASTIC_USE_AGENT_STORE"] = "True";
  vars["TORCHELASTIC_RESTART_COUNT"] = "2";
  env = distributed_env(get);
  CHECK(env.agent_store);
  CHECK(env.restart_count == "2");

  auto fails_naming = [&](const std::string& var) {
    try {
      distributed_env(get);
    } catch (const ConfigError& e) {
      INFO(e.what());
      CHECK(e.exit_code() == 2);
      return std::string(e.what()).find(var) != std::string::npos;
    }
    return false;
  };
  for (const char* v : {"RANK", "MASTER_ADDR", "MASTER_PORT"}) {
    auto saved = vars;
    vars.erase(v);
    CHECK(fails_naming(v));
    vars = saved;
  }
  vars["RANK"] = "4";  // not below WORLD_SIZE
  CHECK(fails_naming("RANK=4"));
  vars["RANK"] = "0";
  vars["MASTER_PORT"] = "http";
  CHECK(fails_naming("MASTER_PORT=http"));
  vars["MASTER_PORT"] = "29500";
  vars["WORLD_SIZE"] = "-2";
  CHECK(fails_naming("WORLD_SIZE=-2"));

  CHECK(distributed_backend("auto", torch::kCPU) == "gloo");
  CHECK_THROWS_AS(distributed_backend("nccl", torch::kCPU), ConfigError);
  CHECK_THROWS_AS(distributed_backend("mpi", torch::kCPU), ConfigError);
}

/// Rank 0 of two whose partner's gradients equal its own, so an all-reduce doubles.
/// Records what each launch sends and, through `on_launch`, when it was launched.
class MirrorGroup : public Collective {
 public:
  std::function<void()> on_launch;
  std::vector<int64_t> sent;  // numel of each tensor, in launch order
  int rank() const override { return 0; }
  int size() const override { return 2; }
  std::string backend() const override { return "mirror"; }
  std::function<void()> all_reduce_sum_start(std::vector<torch::Tensor> tensors) override {
    if (on_launch) on_launch();
    for (const auto& t : tensors) sent.push_back(t.numel());
    return [tensors]() mutable {
      for (auto& t : tensors) t.mul_(2);
    };
  }
  void broadcast(std::vector<torch::Tensor>&, int) override {}
  void barrier() override {}
};

TEST_CASE("GradientReducer reduces during the pass, in one order, and sums every gradient",
          "[unit]") {
  torch::manual_seed(3);
  torch::nn::Sequential net(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 16),
                            torch::nn::ReLU(), torch::nn::Linear(16, 4));
  const auto layers = net->parameters();  // w1 b1 w2 b2 w3 b3
  // Parameters the pass does not reach: one never trained (no gradient on any rank),
  // one with a zeroed gradient from an earlier step (summed: zeros stay defined).
  auto untouched = torch::zeros({3}, torch::requires_grad());
  auto zeroed = torch::zeros({5}, torch::requires_grad());
  zeroed.mutable_grad() = torch::zeros({5});
  std::vector<torch::Tensor> params{layers[0], untouched, layers[1], layers[2],
                                    zeroed,    layers[3], layers[4], layers[5]};
  const auto x = torch::randn({6, 8});
  auto loss = [&] { return net->forward(x).pow(2).sum(); };
  loss().backward();
  std::vector<torch::Tensor> one;  // one process's gradients
  for (auto& p : layers) one.push_back(p.grad().clone()), p.mutable_grad() = torch::Tensor();

  for (const bool overlap : {true, false}) {
    SECTION(overlap ? "overlapped" : "after the pass") {
      MirrorGroup group;
      std::vector<bool> first_layer_done;  // at each launch: w1's gradient exists
      group.on_launch = [&] { first_layer_done.push_back(layers[0].grad().defined()); };
      GradientBuckets buckets;
      buckets.bytes = 1;  // one parameter per bucket
      buckets.overlap = overlap;
      GradientReducer reducer(params, group, buckets);
      reducer.backward(loss());

      // One bucket per parameter, launched in reverse registration order: the same
      // order on every rank, whatever order its pass produced them in.
      std::vector<int64_t> expected_sent;
      for (auto it = params.rbegin(); it != params.rend(); ++it)
        expected_sent.push_back(it->numel() + 1);  // the gradient and its flag
      CHECK(group.sent == expected_sent);
      REQUIRE(first_layer_done.size() == params.size());
      // Overlapped: the last layer's buckets left while the pass was still running
      // (the first layer's gradient did not exist yet), unreached ones did not block.
      CHECK(first_layer_done.front() == !overlap);
      if (!overlap)
        CHECK(std::count(first_layer_done.begin(), first_layer_done.end(), true) ==
              static_cast<long>(params.size()));
      for (size_t i = 0; i < layers.size(); ++i) {
        INFO("parameter " << i);
        CHECK(torch::equal(layers[i].grad(), 2 * one[i]));
      }
      CHECK_FALSE(untouched.grad().defined());
      REQUIRE(zeroed.grad().defined());
      CHECK(zeroed.grad().abs().max().item<float>() == 0.f);

      // Outside backward() its hooks stay idle: a plain pass (an attack's) neither
      // launches nor disturbs the next step, whose buffers start from zero again.
      group.sent.clear();
      for (auto& p : layers) p.mutable_grad().zero_();
      loss().backward();
      CHECK(group.sent.empty());
      for (auto& p : layers) p.mutable_grad().zero_();
      reducer.backward(loss());
      CHECK(group.sent == expected_sent);
      for (size_t i = 0; i < layers.size(); ++i) CHECK(torch::equal(layers[i].grad(), 2 * one[i]));
    }
  }
}

TEST_CASE("two ranks over Gloo train the parameters one process trains", "[e2e][training]") {
  TempDir dir;
  // at: PGD inside each step, the load-balancing term over the global batch; ibp:
  // certified training's bounds and schedule. Batches of 40 over 256 samples: the
  // last batch (16) splits 8 + 8; 40 splits 20 + 20. SGD, whose step is linear in
  // the gradient: Adam divides each gradient by its own magnitude, so rounding in
  // components near zero (summed in another order over two ranks) is magnified
  // there, in one process's reruns with other thread counts as much (docs/distributed.md).
  const std::string common =
      "train --experts 2 --epochs 1 --val-samples 64 --batch-size 40 "
      "--steps 2 --eval-steps 1 --eps 0.1 --optimizer sgd ";
  for (const std::string method :
       {"at", "ibp", "trades", "rt-er", "advmoe", "crown-ibp", "jtdmoe"}) {
    SECTION(method) {
      const std::string args = kData + common + "--lr 0.05 --method " + method + " --out ";
      train_one(args + (dir / "one"));
      train_two(args + (dir / "two"), dir);
      const double diff = max_relative_difference(dir / "one", dir / "two");
      INFO("largest relative parameter difference " << diff);
      CHECK(diff <= 1e-5);
      // The ranks did train: the run differs from its initialisation.
      train_one(std::string(kData) + common + "--method " + method + " --lr 1e-12 --out " +
                (dir / "init"));
      CHECK(max_relative_difference(dir / "one", dir / "init") > 1e-3);
      auto manifest = model_load(dir / "two", torch::kCPU).manifest;
      CHECK(manifest.at("world_size") == 2);
      const auto& last = manifest.at("metrics").at("history").back();
      CHECK(last.at("heldout_samples") == 64);  // the shards add up to the held-out set
    }
  }
}

TEST_CASE("two ranks over Gloo train with Adam the parameters one process trains",
          "[e2e][training]") {
  TempDir dir;
  // Adam divides each gradient component by its own running magnitude: a component
  // that is a near-cancelling sum carries the rounding of the ranks' other summation
  // order at full size into its step, so single entries differ by more than under SGD
  // (docs/distributed.md); each tensor as a whole stays within 1e-5 of its norm.
  const std::string common =
      "train --experts 2 --epochs 1 --val-samples 64 --batch-size 40 "
      "--steps 2 --eval-steps 1 --eps 0.1 --optimizer adam --lr 1e-3 ";
  for (const std::string method : {"at", "ibp"}) {
    SECTION(method) {
      const std::string args = kData + common + "--method " + method + " --out ";
      train_one(args + (dir / "one"));
      train_two(args + (dir / "two"), dir);
      const double diff = max_relative_difference(dir / "one", dir / "two", /*by_norm=*/true);
      INFO("largest parameter difference relative to its tensor's norm " << diff);
      CHECK(diff <= 1e-5);
      CHECK(max_relative_difference(dir / "one", dir / "two") <= 1e-3);
    }
  }
}

TEST_CASE(
    "a group of one rank (torchrun with one process per node) trains as one "
    "process",
    "[e2e][training]") {
  TempDir dir;
  // Every collective runs (the gradient buckets, the statistics, the load-balancing
  // counts) over one Gloo rank: the overhead a single-GPU NCCL run measures.
  const std::string args = std::string(kData) +
                           "train --experts 2 --epochs 1 --val-samples 64 --batch-size 40 "
                           "--steps 2 --eval-steps 1 --eps 0.1 --method at --out ";
  train_one(args + (dir / "plain"));
  auto r = run_shell(rank_env(0, 1, free_port()) + moecert_cmd(args + (dir / "group")));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(model_load(dir / "group", torch::kCPU).manifest.at("world_size") == 1);
  const double diff = max_relative_difference(dir / "plain", dir / "group");
  INFO("largest relative parameter difference " << diff);
  CHECK(diff <= 1e-6);
}

TEST_CASE(
    "train --sync-bn: two ranks train a BatchNorm MoE as one process does and per-rank BN does not",
    "[e2e][training]") {
  TempDir dir;
  // VGG-11-BN channel groups (BatchNorm inside an nn::Sequential) behind a top-1
  // router: every BatchNorm of every routed expert is a collective.
  const std::string args =
      "--dataset synthetic-cifar --samples 96 --quiet train --arch moe-cnn --expert vgg11-bn "
      "--experts 2 --scale 0.0625 --router linear --epochs 1 --batch-size 32 --method at "
      "--steps 1 --val-samples 16 --eval-steps 1 --optimizer sgd --lr 0.05 ";
  train_one(args + "--out " + (dir / "one"));
  train_two(args + "--sync-bn --out " + (dir / "sync"), dir);
  train_two(args + "--out " + (dir / "own"), dir);
  const double sync_diff = max_relative_difference(dir / "one", dir / "sync");
  const double own_diff = max_relative_difference(dir / "one", dir / "own");
  INFO("sync-bn " << sync_diff << ", per-rank BatchNorm " << own_diff);
  CHECK(sync_diff <= 1e-4);
  CHECK(own_diff > 1e-2);  // each rank's half-batch statistics train another model
  CHECK(model_load(dir / "sync", torch::kCPU).manifest.at("training").at("sync_bn") == true);
}

TEST_CASE("a world-size-1 checkpoint resumes under two ranks as one process continues",
          "[e2e][training]") {
  TempDir dir;
  // A constant learning rate: the cosine schedule's length is --epochs, which the
  // resume raises.
  const std::string common = std::string(kData) +
                             "train --experts 2 --val-samples 64 --batch-size 32 --steps 1 "
                             "--eval-steps 1 --method at --optimizer sgd --lr 0.05 "
                             "--schedule constant ";
  train_one(common + "--epochs 1 --out " + (dir / "two"));
  train_two(common + "--epochs 2 --resume --out " + (dir / "two"), dir);
  train_one(common + "--epochs 2 --out " + (dir / "one"));
  CHECK(max_relative_difference(dir / "one", dir / "two") <= 1e-5);
}

TEST_CASE("a distributed run without its variables or its store exits 2 in time",
          "[e2e][training]") {
  TempDir dir;
  const std::string args = std::string(kData) +
                           "train --experts 2 --epochs 1 --val-samples 64 --steps 1 "
                           "--dist-timeout 3 --out " +
                           (dir / "ckpt");
  auto missing = run_shell("WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=1 " + moecert_cmd(args));
  CHECK(missing.code == 2);
  CHECK(missing.output.find("RANK") != std::string::npos);
  // Rank 1 of 2, and nobody hosts the store: it gives up after --dist-timeout.
  const auto t0 = std::chrono::steady_clock::now();
  auto unreachable = run_shell(rank_env(1, 2, free_port()) + moecert_cmd(args));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(unreachable.output);
  CHECK(unreachable.code == 2);
  CHECK(unreachable.output.find("MASTER_ADDR") != std::string::npos);
  CHECK(seconds < 30);
  auto bad_timeout =
      run_shell(moecert_cmd(std::string(kData) + "train --dist-timeout 0 --out " + (dir / "x")));
  CHECK(bad_timeout.code == 2);
  CHECK(bad_timeout.output.find("--dist-timeout") != std::string::npos);
}

TEST_CASE("when one rank dies the others exit with a message and do not hang", "[e2e][training]") {
  TempDir dir;
  const int port = free_port();
  // A long run; rank 1 is killed once both ranks have trained an epoch.
  const std::string args = std::string(kData) +
                           "train --experts 2 --epochs 1000 --val-samples 64 --steps 2 "
                           "--batch-size 16 --dist-timeout 60 --out " +
                           (dir / "ckpt");
  const std::string log0 = dir / "rank0.log";
  const auto t0 = std::chrono::steady_clock::now();
  auto r = run_shell("(" + rank_env(0, 2, port) + moecert_cmd(args) + " > " + log0 +
                     " 2>&1; echo $? > " + (dir / "rc0") + ") & " + rank_env(1, 2, port) +
                     moecert_cmd(args) + " > /dev/null 2>&1 & pid=$!; " +
                     // Once the group trains (the first checkpoint is written), rank 1 dies.
                     "for i in $(seq 600); do [ -f " + (dir / "ckpt/model.json") +
                     " ] && break; sleep 0.1; done; kill -9 $pid; wait");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string out = read_text(log0);
  INFO(out);
  CHECK(std::stoi(read_text(dir / "rc0")) == 6);
  CHECK(out.find("rank 0 of 2") != std::string::npos);
  CHECK(seconds < 60);  // long before 1000 epochs, and within the timeout
}
