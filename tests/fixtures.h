// Small trained models shared by several tests (trained once per process).
#pragma once

#include <torch/torch.h>

#include "moecert/data.h"
#include "moecert/training.h"

namespace moecert_test {

inline moecert::Dataset synthetic(int64_t n, uint64_t seed, bool train = true) {
  moecert::DataSpec d;
  d.name = "synthetic";
  d.samples = n;
  d.seed = seed;
  d.train = train;
  return moecert::data_load(d);
}

/// Trains a small model with `method` on the synthetic set (no checkpoint).
inline moecert::Moe train_small(int64_t experts, const std::string& method, int epochs,
                                uint64_t seed = 0, const std::string& router_train = "top2") {
  torch::manual_seed(seed);
  // One distribution (data seed 0) for every test: the seed varies the init only.
  auto train = synthetic(1500, 0);
  auto val = synthetic(200, 0, /*train=*/false);
  moecert::ModelSpec spec;
  spec.experts = experts;
  spec.mean = train.mean, spec.std = train.std;
  moecert::Moe model(spec);
  moecert::TrainConfig cfg;
  cfg.method = method;
  cfg.epochs = epochs;
  cfg.batch_size = 64;
  cfg.seed = seed;
  cfg.router_train = router_train;
  cfg.log_every = 0;
  cfg.attack.eps = 0.1, cfg.attack.steps = 3, cfg.attack.step_size = 0.05;
  cfg.eval_attack = cfg.attack;
  moecert::train_run(*model, train, val, cfg, nlohmann::json::object(), torch::kCPU);
  model->eval();
  return model;
}

/// A dense and a 4-expert model trained by `st` on the synthetic set, cached.
inline moecert::Moe& trained_dense() {
  static moecert::Moe m = train_small(1, "st", 3);
  return m;
}
inline moecert::Moe& trained_moe() {
  static moecert::Moe m = train_small(4, "st", 3);
  return m;
}

}  // namespace moecert_test
