// `moecert import`: checkpoints written elsewhere -> a moecert checkpoint directory
// (SPEC §8; docs/import.md). A torch.save file is read by the restricted reader
// (torch_file.h); its state dict is mapped onto a moecert model by a layout preset of
// one of the papers' codes or by a JSON key map; the model then checks itself against
// reference logits recorded with the source before the checkpoint is written.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moecert/models.h"

namespace moecert {

/// How one of our tensors is made from a source tensor.
enum class KeyOp {
  copy,          ///< the source tensor as it is
  group_rows,    ///< rows [g·W, (g+1)·W) of the source (W = our rows; g from the key)
  tile_columns,  ///< N copies of the source side by side along dimension 1
};

/// One rule of a key map: our parameter or buffer names matching `to` (a regular
/// expression, whole name) come from the source key `from` (its $1, $2... are `to`'s
/// groups) by `op`; for group_rows, `group` is the number of the capture holding g.
struct KeyRule {
  std::string to, from;
  KeyOp op = KeyOp::copy;
  int group = 0;
};

/// A layout: the architecture it builds and how its tensors come from a state dict.
struct KeyMap {
  std::string name;        ///< preset name or the key map file
  ModelSpec architecture;  ///< mean/std come from the import options
  /// Where the state dict lies in the file (dotted path; "" = the root), and which
  /// prefixes its keys may carry (DataParallel's "module." by default).
  std::string state_dict;
  std::vector<std::string> strip_prefixes{"module."};
  std::vector<KeyRule> rules;
  /// Source keys that may stay unused (regular expressions, whole key). Any other unused
  /// source key is an error: it means the layout does not describe the file.
  std::vector<std::string> ignore;
  /// Groups of source keys that must hold equal tensors (a router saved twice):
  /// every key matching ignore_if_equal[i].first equals the key its regex replaces to.
  std::vector<std::pair<std::string, std::string>> must_equal;
  /// Where the normalisation comes from when the source holds it (keys of mean / std).
  std::string mean_key, std_key;
};

/// What `moecert import` was asked.
struct ImportOptions {
  std::string source;   ///< torch.save file
  std::string preset;   ///< paper1-moe-resnet18 | paper1-dual | paper2-moe-cnn-resnet18
  std::string key_map;  ///< JSON key map file (instead of a preset)
  std::string member;   ///< paper1-dual: import member "Smoe" or "Rmoe" as one MoE
  std::string out;      ///< checkpoint directory to write
  std::string dataset;  ///< data set the model was trained on (recorded for certify/attack)
  std::vector<double> mean, std;                ///< input normalisation (else the preset's rule)
  std::vector<int64_t> input_shape{3, 32, 32};  ///< C, H, W of the images
  int64_t classes = 0;                          ///< 0: from the state dict
  int64_t experts = 0;                          ///< 0: from the state dict
  double scale = 0;                             ///< moe-cnn group width r (0: from the state dict)
  std::string reference;    ///< torch.save file {"inputs", "logits"[, "routes"]} (the self-check)
  double tolerance = 1e-4;  ///< max |Δ logit| the self-check accepts
  bool allow_unchecked = false;  ///< write without a reference (recorded as such)
};

/// The names of the layout presets, with one line of help each.
std::vector<std::pair<std::string, std::string>> import_presets();

/// Runs an import: reads, maps, checks, writes `opts.out` atomically. Throws DataError /
/// ConfigError (exit 2) naming the file, key, shape or value; nothing is written unless
/// every step passed. Returns the manifest's "import" record (what was checked).
nlohmann::json import_checkpoint(const ImportOptions& opts);

}  // namespace moecert
