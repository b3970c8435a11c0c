// Checkpoints: the manifest reader (model.json: format, hash, architecture, dual-model
// members) and the weights archive loader (weights.pt), each on a small real checkpoint
// whose other file stays valid.
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "fuzz.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/model_io.h"

namespace {

/// A checkpoint of a tiny MoE, written once: its directory.
const std::string& base_checkpoint() {
  static const std::string dir = [] {
    moecert::ModelSpec spec;
    spec.in_channels = 1, spec.height = 4, spec.width = 4, spec.num_classes = 3;
    spec.experts = 2, spec.expert = "mlp", spec.router = "linear";
    spec.mean = {0.5}, spec.std = {0.5};
    moecert::Moe model(spec);
    const std::string d = moecert_fuzz::scratch_dir() + "/base";
    moecert::checkpoint_save(
        d, *model, {{"architecture", spec.to_json()}, {"dataset", {{"name", "synthetic"}}}});
    return d;
  }();
  return dir;
}

/// A checkpoint directory holding `manifest` and the weights file `weights`.
std::string write_checkpoint(const std::string& name, const nlohmann::json& manifest,
                             const std::string& weights) {
  const std::string dir = moecert_fuzz::scratch_dir() + "/" + name;
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(weights, dir + "/" + moecert::checkpoint_weights_file,
                             std::filesystem::copy_options::overwrite_existing);
  auto m = manifest;
  m["weights_sha256"] = moecert::sha256_file(dir + "/" + moecert::checkpoint_weights_file);
  const std::string text = m.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  moecert_fuzz::write_bytes(dir + "/" + moecert::checkpoint_manifest_file,
                            reinterpret_cast<const uint8_t*>(text.data()), text.size());
  return dir;
}

}  // namespace

#ifndef MOECERT_LIBFUZZER
static const bool seeds =
    moecert_fuzz::register_seeder("manifest",
                                  [](const std::string& dir) {
                                    std::filesystem::copy_file(
                                        base_checkpoint() + "/" + moecert::checkpoint_manifest_file,
                                        dir + "/tiny-moe.json",
                                        std::filesystem::copy_options::overwrite_existing);
                                  }) &&
    moecert_fuzz::register_seeder("weights", [](const std::string& dir) {
      std::filesystem::copy_file(base_checkpoint() + "/" + moecert::checkpoint_weights_file,
                                 dir + "/tiny-moe.pt",
                                 std::filesystem::copy_options::overwrite_existing);
    });
#endif

#if defined(MOECERT_FUZZ_MANIFEST) || !defined(MOECERT_LIBFUZZER)
MOECERT_FUZZ_TARGET(manifest) {
  const std::string base = base_checkpoint();
  const std::string weights = base + "/" + moecert::checkpoint_weights_file;
  // The input as it is: the reader's JSON, format and hash checks.
  const std::string raw = moecert_fuzz::scratch_dir() + "/raw";
  std::filesystem::create_directories(raw);
  std::filesystem::copy_file(weights, raw + "/" + moecert::checkpoint_weights_file,
                             std::filesystem::copy_options::overwrite_existing);
  moecert_fuzz::write_bytes(raw + "/" + moecert::checkpoint_manifest_file, data, size);
  try {
    moecert::model_load(raw, torch::kCPU);
  } catch (const moecert::Error&) {
  }
  // With the weights' true hash, when it is a JSON object: the architecture and the model.
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
  if (!m.is_object()) return 0;
  try {
    moecert::model_load(write_checkpoint("m", m, weights), torch::kCPU);
  } catch (const moecert::Error&) {
  }
  return 0;
}
#endif

#if defined(MOECERT_FUZZ_WEIGHTS) || !defined(MOECERT_LIBFUZZER)
MOECERT_FUZZ_TARGET(weights) {
  const std::string base = base_checkpoint();
  static const nlohmann::json manifest = moecert::checkpoint_read_manifest(base);
  const std::string file = moecert_fuzz::scratch_dir() + "/input.pt";
  moecert_fuzz::write_bytes(file, data, size);
  try {
    moecert::model_load(write_checkpoint("w", manifest, file), torch::kCPU);
  } catch (const moecert::Error&) {
  }
  return 0;
}
#endif
