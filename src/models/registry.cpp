// The backbone registry: one X(...) line per backbone file. The model factory,
// ModelSpec::validate and the CLI help read it.
#include <sstream>

#include "backbone-impl.h"

#define MOECERT_BACKBONES(X) \
  X(cnn_s)                   \
  X(resnet18)                \
  X(wrn)                     \
  X(vgg)                     \
  X(densenet)                \
  X(vit)                     \
  X(mlp)                     \
  X(linear_router)           \
  X(cnn_router)              \
  X(resnet20)

namespace moecert {
namespace backbones {
#define MOECERT_DECLARE(name) BackboneEntry name##_backbone();
MOECERT_BACKBONES(MOECERT_DECLARE)
#undef MOECERT_DECLARE
}  // namespace backbones

namespace {

bool serves(const BackboneEntry& e, BackboneRole role) {
  switch (role) {
    case BackboneRole::expert:
      return e.expert;
    case BackboneRole::router:
      return e.router;
    case BackboneRole::channel_groups:
      return e.make_groups || e.trunk_features;
  }
  return false;
}

const char* role_name(BackboneRole role) {
  switch (role) {
    case BackboneRole::expert:
      return "expert backbones";
    case BackboneRole::router:
      return "routers";
    case BackboneRole::channel_groups:
      return "MoE-CNN backbones (--arch moe-cnn)";
  }
  return "";
}

BackboneArgs args_of(const std::string& kind, int64_t c, int64_t h, int64_t w, int64_t outputs) {
  BackboneArgs a;
  a.kind = kind, a.in_channels = c, a.height = h, a.width_px = w, a.outputs = outputs;
  return a;
}

}  // namespace

const std::vector<BackboneEntry>& backbone_registry() {
#define MOECERT_ENTRY(name) backbones::name##_backbone(),
  static const std::vector<BackboneEntry> table{MOECERT_BACKBONES(MOECERT_ENTRY)};
#undef MOECERT_ENTRY
  return table;
}

const BackboneEntry& backbone_find(const BackboneArgs& a, BackboneRole role, const char* option) {
  for (const auto& e : backbone_registry())
    if (serves(e, role) && e.matches(a.kind)) {
      if (e.validate) e.validate(a);
      return e;
    }
  throw ConfigError::invalid(option, a.kind, backbone_names(role) + " (" + role_name(role) + ")");
}

std::string backbone_names(BackboneRole role) {
  std::string out;
  for (const auto& e : backbone_registry())
    if (serves(e, role)) out += (out.empty() ? "" : " | ") + std::string(e.name);
  return out;
}

std::string backbone_help(BackboneRole role) {
  std::ostringstream out;
  for (const auto& e : backbone_registry())
    if (serves(e, role)) out << "\n  " << e.name << ": " << e.help;
  return out.str();
}

std::shared_ptr<BackboneImpl> backbone_make(const std::string& kind, int64_t in_channels,
                                            int64_t height, int64_t width, int64_t outputs) {
  const auto a = args_of(kind, in_channels, height, width, outputs);
  const auto& e = backbone_registry();
  for (const auto& entry : e)
    if (entry.matches(kind)) {
      if (entry.validate) entry.validate(a);
      return entry.make(a);
    }
  throw ConfigError::invalid(
      "backbone", kind,
      backbone_names(BackboneRole::expert) + " | " + backbone_names(BackboneRole::router));
}

std::shared_ptr<ChannelGroupNetImpl> channel_group_make(const std::string& kind,
                                                        int64_t in_channels, int64_t height,
                                                        int64_t width, int64_t outputs,
                                                        int64_t groups, double scale,
                                                        bool shared_batch_norm) {
  const auto a = args_of(kind, in_channels, height, width, outputs);
  const auto& e = backbone_find(a, BackboneRole::channel_groups, "--expert");
  if (e.make_groups) return e.make_groups(a, groups, scale);  // cnn-s: no BatchNorm
  return backbones::trunk_groups_make(e, a, groups, scale, shared_batch_norm);
}

BackboneCost backbone_cost(const std::string& kind, int64_t c, int64_t h, int64_t w,
                           int64_t outputs) {
  const auto a = args_of(kind, c, h, w, outputs);
  for (const auto& entry : backbone_registry())
    if (entry.matches(kind)) {
      if (entry.validate) entry.validate(a);
      return entry.cost(a);
    }
  throw ConfigError::invalid(
      "backbone", kind,
      backbone_names(BackboneRole::expert) + " | " + backbone_names(BackboneRole::router));
}

BackboneCost channel_group_cost(const std::string& kind, int64_t c, int64_t h, int64_t w,
                                int64_t outputs, int64_t groups, double scale) {
  const auto a = args_of(kind, c, h, w, outputs);
  const auto& e = backbone_find(a, BackboneRole::channel_groups, "--expert");
  if (e.group_cost) return e.group_cost(a, groups, scale);
  return backbones::trunk_groups_cost(e, a, groups, scale);
}

}  // namespace moecert
