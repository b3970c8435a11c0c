// Private pieces of `moecert import` shared by its two files: import.cpp (torch.save
// files mapped by a layout) and import_graph.cpp (ONNX files and MoEs assembled from
// components).
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "moecert/error.h"
#include "moecert/import.h"
#include "moecert/torch_file.h"

namespace moecert::import_impl {

/// The state dict of a file: source key (prefix and "module." removed) -> tensor ref.
struct Source {
  TorchFile& file;
  std::string where;  ///< the dotted path the state dict came from ("" = root)
  std::map<std::string, TorchTensorRef> refs;
  std::vector<std::string> order;  ///< keys in file order
  std::set<std::string> used;

  bool has(const std::string& k) const { return refs.count(k) > 0; }
  const TorchTensorRef& ref(const std::string& k) const { return refs.at(k); }
  torch::Tensor load(const std::string& k) { return file.load(refs.at(k)); }
  [[noreturn]] void fail(const std::string& why) const {
    throw DataError("import of " + file.path() + ": " + why);
  }
};

/// The tensors under the first of `candidates` (dotted paths; "" = root) that holds any;
/// `strip` prefixes removed; `member` ("Smoe.") narrows to one sub-model.
Source source_of(TorchFile& file, const std::vector<std::string>& candidates,
                 const std::vector<std::string>& strip, const std::string& member);

/// Fills every parameter and buffer of `model` (but "mean" / "std") from the source by
/// the map's rules; every source tensor must be used, ignored or a checked copy.
/// Returns the number of tensors filled.
int64_t fill(torch::nn::Module& model, Source& s, const KeyMap& map);

/// Compares `model` with the reference file o.reference ({"inputs", "logits"[,
/// "routes"]}); throws DataError (exit 2) on a mismatch; returns the check's record.
nlohmann::json self_check(MoeImpl& model, const ImportOptions& o);

/// `moecert import` of an ONNX file (SOURCE ending in .onnx) or an assembly file
/// (.json): the model's components become graph components, each checked against its
/// source on random inputs (and the whole model against o.reference when given).
nlohmann::json import_graph(const ImportOptions& o);

}  // namespace moecert::import_impl
