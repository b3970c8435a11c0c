// What the epoch loop trains: one MoE under one method, or a dual-model under
// JTDMoE's alternating scheme. Private to training/.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "moecert/dual.h"
#include "moecert/training.h"

namespace moecert {

class Learner {
 public:
  virtual ~Learner() = default;
  virtual torch::nn::Module& module() = 0;
  virtual std::vector<torch::optim::Optimizer*> optimizers() = 0;
  /// One batch: computes the loss(es), checks them (`check` throws on NaN/Inf)
  /// and updates the parameters. x: [B, C, H, W], y: [B]
  virtual StepStats update(const torch::Tensor& x, const torch::Tensor& y, const TrainConfig& cfg,
                           const std::function<void(const StepStats&)>& check) = 0;
  /// The run's global step (0-based) and total steps, before each update.
  virtual void at_step(int64_t step, int64_t total) {}
  virtual AttackSubject subject() = 0;
  /// Manifest fields that describe the model ("architecture", and for a dual-model
  /// "kind" and "alpha").
  virtual nlohmann::json manifest_fields() = 0;
  /// Experts whose usage is reported (the robust member's for a dual-model).
  virtual int64_t num_experts() = 0;
};

/// Ends a method's step on the output `out` (the "clean" or "adversarial" pass): adds
/// the load-balancing term (when `balance` and cfg.balance > 0) and the tensors to
/// check for NaN/Inf (log F, the router's logits).
void finish_step(StepStats& s, const MoeOutput& out, const TrainConfig& cfg,
                 const std::string& what, bool balance = true);

/// `ibp` (crown = false) and `crown-ibp`: training/certified.cpp.
std::unique_ptr<TrainMethod> certified_method_make(bool crown);

/// Builds Adam or SGD over `params` from the config.
std::unique_ptr<torch::optim::Optimizer> optimizer_make(std::vector<torch::Tensor> params,
                                                        const TrainConfig& cfg);

std::unique_ptr<Learner> learner_single(MoeImpl& model, const TrainConfig& cfg);
std::unique_ptr<Learner> learner_jtdmoe(DualImpl& dual, const TrainConfig& cfg);

/// The epoch loop shared by train_run and train_dual_run.
TrainSummary train_loop(Learner& learner, const Dataset& train, const Dataset& held_out,
                        const TrainConfig& cfg, const nlohmann::json& manifest_base,
                        torch::Device device);

}  // namespace moecert
