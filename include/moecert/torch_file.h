// Files written by PyTorch's `torch.save`, read without Python and without running them
// (SPEC §8; docs/import.md "The reader"). A torch.save file is a zip holding a pickle —
// a program for Python's stack machine — and one record per tensor storage. This reader
// interprets only the opcodes a tensor dictionary needs and accepts only the globals such
// a dictionary names (collections.OrderedDict, torch._utils._rebuild_tensor_v2 and
// _rebuild_parameter, the storage types, torch.Size); any other global is refused by name
// before a single tensor is built. Every tensor's extent is checked against its storage
// record, and every record against the file, before anything is allocated.
#pragma once

#include <torch/types.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace moecert {

/// Where a tensor's values lie: a storage record of the file and a strided view into it.
struct TorchTensorRef {
  std::string storage;  ///< the storage's key (record "<archive>/data/<key>")
  torch::ScalarType dtype = torch::kFloat;
  int64_t offset = 0;  ///< in elements of the storage
  std::vector<int64_t> sizes, strides;
};

/// A torch.save file, interpreted. Tensors are loaded one at a time on request, so a file
/// whose optimizer state doubles its size costs only the tensors an import uses.
class TorchFile {
 public:
  /// Reads the zip directory and interprets data.pkl; throws DataError (exit 2) naming
  /// the file and what is wrong: a refused global, an unknown opcode, a tensor larger than
  /// its storage, a storage record shorter than its header says, a truncated file, a
  /// legacy (pre-1.6) file.
  explicit TorchFile(const std::string& path);
  ~TorchFile();
  TorchFile(const TorchFile&) = delete;
  TorchFile& operator=(const TorchFile&) = delete;

  const std::string& path() const { return path_; }
  /// Every tensor of the file, keyed by its dotted path from the pickled object
  /// ("net.experts.0.net.conv1.weight"; dict keys, list and tuple indices), in file order.
  const std::vector<std::pair<std::string, TorchTensorRef>>& tensors() const { return tensors_; }
  /// The root dictionary's numbers, strings, booleans and nulls (e.g. {"acc": 94.1,
  /// "epoch": 199, "arch": "resnet18"}): provenance for the import's manifest.
  const nlohmann::json& scalars() const { return scalars_; }
  /// A copy of tensor `ref`'s values (dtype as stored, contiguous, CPU).
  torch::Tensor load(const TorchTensorRef& ref);

 private:
  struct Zip;
  std::string path_;
  std::unique_ptr<Zip> zip_;
  std::string prefix_;  ///< the archive's top folder, e.g. "archive"
  std::vector<std::pair<std::string, TorchTensorRef>> tensors_;
  nlohmann::json scalars_ = nlohmann::json::object();
};

}  // namespace moecert
