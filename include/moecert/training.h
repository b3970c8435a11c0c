// Training methods (SPEC §2) and the epoch loop with progress, per-epoch
// evaluation, atomic checkpoints and exact resume.
#pragma once

#include "moecert/attacks.h"
#include "moecert/data.h"
#include "moecert/models.h"

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

namespace moecert {

struct TrainConfig {
  std::string method = "at";        ///< st | at
  int epochs = 10;
  int64_t batch_size = 128;
  std::string optimizer = "adam";   ///< adam | sgd
  double lr = 1e-3;
  double momentum = 0.9;            ///< SGD only
  double weight_decay = 0.0;
  std::string schedule = "cosine";  ///< cosine (per step) | step (per epoch) | constant
  std::vector<int> milestones;      ///< epochs at which `step` multiplies lr by gamma
  double gamma = 0.1;
  uint64_t seed = 0;
  PgdConfig attack;                 ///< the training attack (at)
  PgdConfig eval_attack;            ///< the per-epoch held-out attack
  int log_every = 50;               ///< progress line every N steps (0 = never)
  std::string out_dir;              ///< checkpoint directory (empty = none)
  bool resume = false;              ///< continue from out_dir's train_state.pt

  nlohmann::json to_json() const;
  void validate() const;  ///< throws ConfigError naming the option
};

/// Statistics of one training step.
struct StepStats {
  torch::Tensor loss;            ///< scalar, differentiable
  int64_t clean_correct = 0;     ///< -1 if not measured
  int64_t adv_correct = -1;      ///< -1 if the method has no adversarial pass
};

/// One training objective; `step` computes the loss of one batch.
class TrainMethod {
 public:
  virtual ~TrainMethod() = default;
  virtual std::string name() const = 0;
  /// x: [B, C, H, W] in [0, 1], y: [B] -> loss and counts. Leaves `model` in train mode.
  virtual StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                         const TrainConfig& cfg) = 0;
};

/// "st" | "at" -> method; throws ConfigError naming the known methods.
std::unique_ptr<TrainMethod> train_method_make(const std::string& name);

/// What a finished (or resumed-and-finished) run reports.
struct TrainSummary {
  int start_epoch = 0;           ///< 0, or the epoch a resume continued from
  int epochs_done = 0;
  nlohmann::json history;        ///< one object per epoch (loss, train/held-out SA and RA, ...)
  double images_per_s = 0;       ///< training throughput of this process
};

/// Trains `model` on `train`, evaluates on `held_out` after every epoch, and (if
/// cfg.out_dir is set) saves an atomic checkpoint after every epoch whose manifest
/// is `manifest_base` plus architecture, training config and metrics.
TrainSummary train_run(MoeImpl& model, const Dataset& train, const Dataset& held_out,
                       const TrainConfig& cfg, const nlohmann::json& manifest_base,
                       torch::Device device);

}  // namespace moecert
