// Private pieces of `moecert import` shared by its two files: import.cpp (torch.save
// files mapped by a layout) and import_graph.cpp (ONNX files and MoEs assembled from
// components).
#pragma once

#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "moecert/error.h"
#include "moecert/graph.h"
#include "moecert/import.h"
#include "moecert/models.h"
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
  /// Source tensors read more than once (a grouped convolution by each of its N groups,
  /// the router its copies are compared with) stay here until fill() ends.
  std::map<std::string, torch::Tensor> kept;

  torch::Tensor load(const std::string& k) { return file.load(refs.at(k)); }
  /// load(), keeping the tensor for the next read of the same key.
  torch::Tensor load_kept(const std::string& k) {
    auto it = kept.find(k);
    if (it == kept.end()) it = kept.emplace(k, load(k)).first;
    return it->second;
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw DataError("import of " + file.path() + ": " + why);
  }
};

/// The tensors under the first of `candidates` (dotted paths; "" = root) that holds any;
/// `strip` prefixes removed; `member` ("Smoe.") narrows to one sub-model.
Source source_of(TorchFile& file, const std::vector<std::string>& candidates,
                 const std::vector<std::string>& strip, const std::string& member);

/// A per-channel normalisation from the values given: none -> `dflt` everywhere, one ->
/// broadcast, else exactly `channels` values (ConfigError naming `option` otherwise).
std::vector<double> per_channel(const std::vector<double>& v, int64_t channels, const char* option,
                                double dflt);

/// Every source tensor whose key matches a pattern (a regex) must equal the tensor its
/// target (a format of the match: "router.$1") names, exactly; they are marked used.
void check_copies(Source& s, const std::vector<std::pair<std::string, std::string>>& must_equal);

/// Fails (DataError) naming the source tensors neither used nor matching an `ignore`
/// regex: `what` ("layout 'x'", "preset y") does not describe the file.
void check_all_used(const Source& s, const std::vector<std::string>& ignore,
                    const std::string& what);

/// Fills every parameter and buffer of `model` (but "mean" / "std") from the source by
/// the map's rules; every source tensor must be used, ignored or a checked copy.
/// Returns the number of tensors filled.
int64_t fill(torch::nn::Module& model, Source& s, const KeyMap& map);

/// Compares `model` with the reference file o.reference ({"inputs", "logits"[,
/// "routes"]}); throws DataError (exit 2) on a mismatch; returns the check's record.
nlohmann::json self_check(MoeImpl& model, const ImportOptions& o);

/// One router or expert of a graph-component model: its graph in float64 and how its
/// source evaluates normalised images [B, C, H, W] (the reference of its check; empty:
/// only the whole model's --reference checks it).
struct GraphComponent {
  std::string role;  ///< "router", "experts[2]"
  std::string source;
  LayerGraph graph;
  std::function<torch::Tensor(const torch::Tensor&)> reference;
  nlohmann::json record;
};

/// Whether a source path ends in `ext` (".onnx", ".json") and has a name before it.
inline bool has_suffix(const std::string& path, const std::string& ext) {
  return path.size() > ext.size() && path.compare(path.size() - ext.size(), ext.size(), ext) == 0;
}

/// Whether `preset` is one import_graph builds (paper 2's WRN and VGG MoE-CNNs).
bool graph_preset(const std::string& preset);

/// Paper 2's WRN / VGG MoE-CNN as graph components: expert e is the path through
/// channel group e of every MoE convolution (docs/import.md); the router a resnet20.
/// Sets the spec's shape, classes, experts and normalisation.
std::vector<GraphComponent> paper2_graph_components(const ImportOptions& o, ModelSpec& spec);

/// `moecert import` of an ONNX file (SOURCE ending in .onnx) or an assembly file
/// (.json): the model's components become graph components, each checked against its
/// source on random inputs (and the whole model against o.reference when given).
nlohmann::json import_graph(const ImportOptions& o);

}  // namespace moecert::import_impl
