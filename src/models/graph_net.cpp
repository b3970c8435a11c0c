// Components given as operator graphs (expert / router kind "graph"): the models
// `moecert import` writes from ONNX files and from other codes' state dicts. The
// structure (operators, inputs, geometry, tensor shapes) is JSON in the model's
// architecture; the values are float32 parameters "n<k>_<tensor>" in weights.pt. The
// float32 forward evaluates the graph's own operators (the rules' forward), so the
// model that is certified is exactly the one that runs.
#include <array>
#include <functional>

#include "backbone-impl.h"
#include "moecert/compiled_graph.h"
#include "moecert/limits.h"

namespace moecert {
namespace {

using Kind = Layer::Kind;

/// Every kind a graph component may hold (gate exists only inside Jacobian graphs).
constexpr std::array<Kind, 16> kStructureKinds{
    Kind::channel_affine, Kind::conv,           Kind::linear,       Kind::relu,
    Kind::flatten,        Kind::global_avgpool, Kind::residual,     Kind::maxpool,
    Kind::concat,         Kind::tokens,         Kind::token_select, Kind::layernorm,
    Kind::gelu,           Kind::softmax,        Kind::attn_scores,  Kind::attn_mix};

/// A tensor a layer may hold, by name.
struct TensorSlot {
  const char* name;
  torch::Tensor Layer::*member;
};
constexpr std::array<TensorSlot, 3> kSlots{TensorSlot{"weight", &Layer::weight},
                                           TensorSlot{"bias", &Layer::bias},
                                           TensorSlot{"shift_terms", &Layer::shift_terms}};

/// Which slots a kind must / may hold, as ranks (0: absent, -r: optional of rank r).
std::array<int, 3> slot_ranks(Kind k) {
  switch (k) {
    case Kind::channel_affine:
      return {1, 1, -1};
    case Kind::conv:
      return {4, -1, 0};
    case Kind::linear:
      return {2, -1, 0};
    case Kind::layernorm:
      return {1, 1, 0};
    case Kind::tokens:
      return {2, 1, 0};
    default:
      return {0, 0, 0};
  }
}

const char* kind_name(Kind k) { return rule_for(Layer::simple(k)).name(); }

[[noreturn]] void bad(const std::string& where, const std::string& why) {
  throw ConfigError(where + ": " + why);
}

int64_t int_field(const nlohmann::json& j, const char* name, const std::string& where) {
  if (!j.contains(name)) return 0;
  const auto& v = j.at(name);
  if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > (int64_t{1} << 20))
    bad(where, "field '" + std::string(name) + "' must be an integer in [0, 2^20], got " +
                   v.dump().substr(0, 40));
  return v.get<int64_t>();
}

double double_field(const nlohmann::json& j, const char* name, const std::string& where,
                    double dflt) {
  if (!j.contains(name)) return dflt;
  const auto& v = j.at(name);
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    bad(where,
        "field '" + std::string(name) + "' must be a finite number, got " + v.dump().substr(0, 40));
  return v.get<double>();
}

/// Parses a structure into layers whose tensors are `make(shape)`; checks every field,
/// the total size (before anything is allocated) and the shapes (by compiling).
using MakeTensor = std::function<torch::Tensor(size_t node, const char* slot, const Shape& shape)>;

LayerGraph parse(const nlohmann::json& s, const std::string& where, Shape& input,
                 const MakeTensor& make) {
  if (!s.is_object() || !s.contains("nodes") || !s.at("nodes").is_array() ||
      !s.contains("input_shape") || !s.at("input_shape").is_array())
    bad(where, "a graph structure is an object with \"input_shape\" and \"nodes\" arrays");
  input.clear();
  for (const auto& d : s.at("input_shape")) {
    if (!d.is_number_integer() || d.get<int64_t>() < 1 || d.get<int64_t>() > limits::max_side)
      bad(where, "input_shape holds " + d.dump().substr(0, 40) + " (dimensions in [1, 8192])");
    input.push_back(d.get<int64_t>());
  }
  const auto& nodes = s.at("nodes");
  if (nodes.empty() || nodes.size() > 100000)
    bad(where, "has " + std::to_string(nodes.size()) + " nodes (1 to 100000)");
  // Sizes first: nothing is allocated for a structure whose tensors exceed the budget.
  double values = 0;
  for (size_t k = 0; k < nodes.size(); ++k) {
    const auto& n = nodes[k];
    const std::string at = where + ": node " + std::to_string(k);
    if (!n.is_object() || !n.contains("op") || !n.at("op").is_string())
      bad(at, "needs an \"op\" string");
    if (n.contains("tensors") && !n.at("tensors").is_object())
      bad(at, "\"tensors\" must be an object of shapes");
    const auto tensors = n.value("tensors", nlohmann::json::object());
    for (const auto& [name, shape] : tensors.items()) {
      if (!shape.is_array() || shape.empty() || shape.size() > 4)
        bad(at, "tensor '" + name + "' needs a shape of rank 1 to 4");
      double numel = 1;
      for (const auto& d : shape) {
        if (!d.is_number_integer() || d.get<int64_t>() < 1 || d.get<int64_t>() > (int64_t{1} << 31))
          bad(at, "tensor '" + name + "' has dimension " + d.dump().substr(0, 40));
        numel *= d.get<double>();
      }
      values += numel;
    }
  }
  limits::check_memory("a graph component's parameters", where,
                       std::to_string(static_cast<int64_t>(values)) + " values", 16.0 * values);
  LayerGraph g;
  for (size_t k = 0; k < nodes.size(); ++k) {
    const auto& n = nodes[k];
    const std::string at = where + ": node " + std::to_string(k);
    const std::string op = n.at("op").get<std::string>();
    const Kind* kind = nullptr;
    for (const Kind& c : kStructureKinds)
      if (op == kind_name(c)) kind = &c;
    if (!kind) {
      std::string names;
      for (Kind c : kStructureKinds)
        names += (names.empty() ? "" : ", ") + std::string(kind_name(c));
      bad(at, "op '" + op.substr(0, 40) + "' is not one of " + names);
    }
    Layer l = Layer::simple(*kind, n.value("name", std::string()));
    l.stride = n.contains("stride") ? int_field(n, "stride", at) : 1;  // 0: refused by the rule
    l.padding = int_field(n, "padding", at);
    l.kernel = int_field(n, "kernel", at);
    l.heads = std::max<int64_t>(1, int_field(n, "heads", at));
    l.eps = double_field(n, "eps", at, 0);
    l.scale = double_field(n, "scale", at, 1);
    const auto ranks = slot_ranks(*kind);
    const auto tensors = n.value("tensors", nlohmann::json::object());
    for (const auto& [name, shape] : tensors.items()) {
      bool known = false;
      for (size_t t = 0; t < kSlots.size(); ++t)
        known = known || (name == kSlots[t].name && ranks[t]);
      if (!known) bad(at, "op '" + op + "' holds no tensor '" + name.substr(0, 40) + "'");
    }
    for (size_t t = 0; t < kSlots.size(); ++t) {
      const int rank = ranks[t];
      if (!rank) continue;
      if (!tensors.contains(kSlots[t].name)) {
        if (rank > 0) bad(at, "op '" + op + "' needs tensor '" + kSlots[t].name + "'");
        continue;
      }
      Shape shape = tensors.at(kSlots[t].name).get<Shape>();
      if (static_cast<int>(shape.size()) != std::abs(rank))
        bad(at, "tensor '" + std::string(kSlots[t].name) + "' has shape " + shape_str(shape) +
                    ", of rank " + std::to_string(std::abs(rank)) + " for op '" + op + "'");
      l.*kSlots[t].member = make(k, kSlots[t].name, shape);
    }
    if (!n.contains("inputs") || !n.at("inputs").is_array() || n.at("inputs").empty() ||
        n.at("inputs").size() > 2)
      bad(at, "needs \"inputs\": one or two earlier node indices (-1: the graph input)");
    std::vector<int> ins;
    for (const auto& i : n.at("inputs")) {
      if (!i.is_number_integer() || i.get<int64_t>() < -1 || i.get<int64_t>() >= int64_t(k))
        bad(at, "reads " + i.dump().substr(0, 40) + " (an earlier node, or -1)");
      ins.push_back(i.get<int>());
    }
    g.add(std::move(l), std::move(ins));
  }
  try {
    (void)CompiledGraph(g, input);
  } catch (const Error& e) {
    bad(where, e.what());
  } catch (const c10::Error& e) {
    bad(where, std::string("its shapes do not fit: ") + e.what_without_backtrace());
  }
  return g;
}

std::string param_name(size_t node, const char* slot) {
  return "n" + std::to_string(node) + "_" + slot;
}

class GraphNetImpl : public BackboneImpl {
 public:
  GraphNetImpl(const nlohmann::json& structure, const std::string& where) {
    Shape input;
    layers_ = parse(structure, where, input, [&](size_t k, const char* slot, const Shape& shape) {
      auto t = torch::zeros(shape, torch::kFloat32);
      // shift_terms only sizes the float32 allowance: a buffer, never trained.
      return std::string(slot) == "shift_terms" ? register_buffer(param_name(k, slot), t)
                                                : register_parameter(param_name(k, slot), t);
    });
  }
  torch::Tensor forward(torch::Tensor x) override { return graph_forward(layers_, x); }
  LayerGraph graph() override {
    LayerGraph g;
    for (const auto& n : layers_) {
      Layer l = n.layer;
      for (const auto& slot : kSlots) l.*slot.member = backbones::f64(n.layer.*slot.member);
      g.add(std::move(l), n.inputs);
    }
    return g;
  }
  /// Copies `values` (the same structure) into the parameters, rounded to float32.
  void fill(const LayerGraph& values) {
    torch::NoGradGuard no_grad;
    if (values.size() != layers_.size())
      throw ConfigError("graph component: " + std::to_string(values.size()) + " nodes for " +
                        std::to_string(layers_.size()));
    for (size_t k = 0; k < layers_.size(); ++k)
      for (const auto& slot : kSlots) {
        const auto& ours = layers_[k].layer.*slot.member;
        const auto& theirs = values[k].layer.*slot.member;
        if (ours.defined() != theirs.defined() ||
            (ours.defined() && ours.sizes() != theirs.sizes()))
          throw ConfigError("graph component: node " + std::to_string(k) + " tensor " + slot.name +
                            " does not match the structure");
        if (ours.defined()) ours.copy_(theirs.to(ours.device(), torch::kFloat32));
      }
  }

 private:
  LayerGraph layers_;  // holds the registered tensors themselves (module moves keep the handles)
};

}  // namespace

nlohmann::json graph_structure(const LayerGraph& g, const Shape& input_shape) {
  nlohmann::json nodes = nlohmann::json::array();
  for (const auto& n : g) {
    const Kind k = n.layer.kind;
    bool allowed = false;
    for (Kind c : kStructureKinds) allowed = allowed || c == k;
    if (!allowed)
      throw UnsupportedLayerError("graph component: layer '" + n.layer.name + "' (" + kind_name(k) +
                                  ") cannot be stored");
    nlohmann::json j = {{"op", kind_name(k)}, {"name", n.layer.name}, {"inputs", n.inputs}};
    if (k == Kind::conv || k == Kind::maxpool) j["stride"] = n.layer.stride;
    if (k == Kind::conv || k == Kind::maxpool) j["padding"] = n.layer.padding;
    if (k == Kind::maxpool || k == Kind::token_select) j["kernel"] = n.layer.kernel;
    if (k == Kind::attn_scores || k == Kind::attn_mix) j["heads"] = n.layer.heads;
    if (k == Kind::layernorm) j["eps"] = n.layer.eps;
    if (k == Kind::attn_scores) j["scale"] = n.layer.scale;
    nlohmann::json tensors = nlohmann::json::object();
    for (const auto& slot : kSlots)
      if ((n.layer.*slot.member).defined())
        tensors[slot.name] = (n.layer.*slot.member).sizes().vec();
    if (!tensors.empty()) j["tensors"] = tensors;
    nodes.push_back(j);
  }
  return {{"input_shape", input_shape}, {"nodes", nodes}};
}

GraphInfo graph_structure_check(const nlohmann::json& structure, const std::string& where) {
  GraphInfo info;
  Shape input;
  // Shape-only tensors: nothing is allocated.
  auto g = parse(structure, where, input, [&](size_t, const char*, const Shape& shape) {
    double n = 1;
    for (int64_t d : shape) n *= static_cast<double>(d);
    info.cost.parameters += n;
    return torch::empty(shape, torch::TensorOptions().dtype(torch::kFloat32).device(torch::kMeta));
  });
  const CompiledGraph c(std::move(g), input);
  info.input_shape = input;
  info.output_shape = c.output_shape();
  for (const auto& n : c.nodes()) {
    double v = 1;
    for (int64_t d : n.out_shape) v *= static_cast<double>(d);
    info.cost.activations += v;
  }
  return info;
}

std::shared_ptr<BackboneImpl> graph_net_make(const nlohmann::json& structure,
                                             const std::string& where) {
  return std::make_shared<GraphNetImpl>(structure, where);
}

void graph_net_fill(BackboneImpl& net, const LayerGraph& values) {
  auto* g = dynamic_cast<GraphNetImpl*>(&net);
  if (!g) throw ConfigError("graph_net_fill: not a graph component");
  g->fill(values);
}

}  // namespace moecert
