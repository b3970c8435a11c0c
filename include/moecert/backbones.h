// The backbone registry (SPEC §1): every expert and router backbone by name, with
// its one-line help, the roles it serves (expert, router, MoE-CNN body), its
// validation against the input size, its factory and its cost. ModelSpec::validate,
// the model factory and the CLI help read this one table. Adding a backbone: its
// own file in src/models/ defining `BackboneEntry <name>_backbone()`, and one
// X(<name>) line in src/models/registry.cpp.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moecert/models.h"

namespace moecert {

/// What a backbone is built for. `outputs` = 0 asks for the trunk: the pooled
/// features (a MoE-CNN channel group, whose head is shared); `width` scales every
/// hidden layer's channels (round(width·C), at least 1).
struct BackboneArgs {
  std::string kind;  ///< the name as written ("wrn-16-4": a family with its parameters)
  int64_t in_channels = 1, height = 28, width_px = 28, outputs = 10;
  double width = 1.0;
};

struct BackboneEntry {
  const char* name;     ///< as in --expert / --router; a family: "wrn-<depth>-<k>"
  const char* help;     ///< one line for --help and docs
  bool expert = true;   ///< may be an expert of `moe`
  bool router = false;  ///< may be a router
  /// A small concrete member of a family ("wrn-10-1"), built by the registry-wide
  /// tests (forward ≡ graph, MoE-CNN dispatch); null: `name` itself.
  const char* example = nullptr;
  /// Whether `kind` names this entry (a family parses its parameters).
  bool (*matches)(const std::string& kind) = nullptr;
  /// Throws ConfigError naming the field when the parameters or input size do not fit.
  void (*validate)(const BackboneArgs& a) = nullptr;
  std::shared_ptr<BackboneImpl> (*make)(const BackboneArgs& a) = nullptr;
  BackboneCost (*cost)(const BackboneArgs& a) = nullptr;
  /// MoE-CNN: the number of features of the trunk (outputs = 0) at a.width; null
  /// when the backbone has no trunk form (see make_groups).
  int64_t (*trunk_features)(const BackboneArgs& a) = nullptr;
  /// MoE-CNN body of its own layout (cnn-s shares its first dense layer); null:
  /// N trunks of width `scale` and a shared linear head, when trunk_features is set.
  std::shared_ptr<ChannelGroupNetImpl> (*make_groups)(const BackboneArgs& a, int64_t groups,
                                                      double scale) = nullptr;
  BackboneCost (*group_cost)(const BackboneArgs& a, int64_t groups, double scale) = nullptr;
};

enum class BackboneRole { expert, router, channel_groups };

/// Every registered backbone, in help order.
const std::vector<BackboneEntry>& backbone_registry();
/// The entry naming `kind` in `role`; ConfigError naming `option` and the
/// registered names otherwise. Runs the entry's validation on `a`.
const BackboneEntry& backbone_find(const BackboneArgs& a, BackboneRole role, const char* option);
/// "name | name | ..." of the backbones serving `role` (CLI help, error messages).
std::string backbone_names(BackboneRole role);
/// Multi-line help: "  name  help" per backbone serving `role`.
std::string backbone_help(BackboneRole role);

}  // namespace moecert
