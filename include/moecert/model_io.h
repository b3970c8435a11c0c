// Building models from checkpoints: manifest -> ModelSpec -> MoeImpl -> weights.
#pragma once

#include "moecert/models.h"

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include <string>

namespace moecert {

/// A model together with the manifest it was loaded from.
struct LoadedModel {
  Moe model{nullptr};
  nlohmann::json manifest;
  std::string dir;
};

/// Loads a checkpoint directory onto `device`, verifying hash, manifest and
/// parameter shapes. Throws CheckpointError (exit 2) naming what is wrong.
LoadedModel model_load(const std::string& dir, torch::Device device);

}  // namespace moecert
