// Checkpoint directories: model.json (manifest) + weights.pt (+ train_state.pt).
// Writes are atomic: the new directory is built beside the old one, every file is
// fsync'ed, then the two directories are exchanged with one rename; a process
// killed at any moment leaves the previous checkpoint loadable.
#pragma once

#include <torch/nn/module.h>
#include <torch/serialize/archive.h>

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace moecert {

/// Version of the model.json layout; bumped on incompatible changes.
inline constexpr int checkpoint_format_version = 1;

inline constexpr const char* checkpoint_manifest_file = "model.json";
inline constexpr const char* checkpoint_weights_file = "weights.pt";
inline constexpr const char* checkpoint_state_file = "train_state.pt";

/// Writes a training-state archive (optimizer, epoch, RNG) into `archive`.
using TrainStateWriter = std::function<void(torch::serialize::OutputArchive& archive)>;

/// Saves `module`'s parameters and buffers (torch::save format, loadable by
/// PyTorch's torch.jit.load) and `manifest` into `dir`, atomically. The manifest
/// gains "format_version", "moecert_version" and "weights_sha256".
void checkpoint_save(const std::string& dir, const torch::nn::Module& module,
                     nlohmann::json manifest, const TrainStateWriter& train_state = nullptr);

/// Reads and validates `dir/model.json` (format version, required fields), and
/// checks the SHA-256 of weights.pt against it. Throws CheckpointError.
nlohmann::json checkpoint_read_manifest(const std::string& dir);

/// Checks a per-epoch training history, as model.json's metrics.history and
/// train_state.pt's history hold one: an array of objects whose values are numbers,
/// arrays of numbers or null. Throws CheckpointError::bad_manifest naming `path` and the
/// first bad place (`field`[i].key).
void checkpoint_check_history(const std::string& path, const std::string& field,
                              const nlohmann::json& history);

/// Loads weights.pt of a checkpoint into `module` (which must have been built from
/// the manifest). Verifies the hash first; a missing or extra key, or a shape that
/// differs, is a CheckpointError naming the parameter.
void checkpoint_load_weights(const std::string& dir, torch::nn::Module& module);

/// Opens train_state.pt if present (for --resume); null when there is none. (A pointer,
/// not std::optional: InputArchive's copy constructor takes a non-const reference,
/// which clang's std::optional refuses.)
std::unique_ptr<torch::serialize::InputArchive> checkpoint_load_state(const std::string& dir);

/// SHA-256 of a file as 64 lowercase hex digits. Throws CheckpointError if unreadable.
std::string sha256_file(const std::string& path);
/// SHA-256 of a byte string as 64 lowercase hex digits.
std::string sha256_hex(const std::string& bytes);

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync,
/// rename, fsync of the directory).
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace moecert
