// Building models from checkpoints: manifest -> ModelSpec(s) -> module -> weights.
// A checkpoint holds a single MoE (or dense model) or, with "kind": "dual", a
// dual-model of two MoEs.
#pragma once

#include <torch/types.h>

#include <nlohmann/json.hpp>
#include <string>

#include "moecert/attacks.h"
#include "moecert/dual.h"
#include "moecert/models.h"

namespace moecert {

/// A model together with the manifest it was loaded from.
struct LoadedModel {
  Moe model{nullptr};  ///< set for a single MoE / dense checkpoint
  Dual dual{nullptr};  ///< set for a dual-model checkpoint
  nlohmann::json manifest;
  std::string dir;

  bool is_dual() const { return !dual.is_empty(); }
  /// What attacks act on, whichever kind this is.
  AttackSubject subject();
  /// One line: "MoE E=4 cnn-s experts, ..." or "dual-model alpha=0.8 of ...".
  std::string describe() const;
  /// Refuses (ConfigError, exit 2) batches of `batch` samples through every member
  /// that would not fit the memory budget (ModelSpec::check_memory); `option` names
  /// the option that set the batch size.
  void check_batch(int64_t batch, const std::string& option) const;
};

/// "MoE E=4 cnn-s experts, linear router, top-1 routing" or "dense cnn-s".
std::string model_describe(const ModelSpec& spec);

/// Loads a checkpoint directory onto `device`, verifying hash, manifest and
/// parameter shapes. Throws CheckpointError (exit 2) naming what is wrong.
LoadedModel model_load(const std::string& dir, torch::Device device);

/// Combines two loaded single-MoE checkpoints into a dual-model checkpoint in
/// `out_dir` (atomic); the manifest records α and both members' provenance.
void dual_save(const std::string& out_dir, LoadedModel& standard, LoadedModel& robust,
               double alpha);

}  // namespace moecert
