// `moecert import` of graph components (docs/import.md "ONNX models" and "Assembling an
// MoE"): an ONNX classifier becomes a dense model (E = 1) whose expert is its operator
// graph; an assembly file names a router and experts, each an ONNX file or a state dict
// of a registered backbone, and the routing. Every component is stored as a graph
// component (expert / router kind "graph") and checked against its source on random
// inputs before anything is written.
#include <torch/torch.h>

#include <fstream>
#include <functional>

#include "import-impl.h"
#include "moecert/checkpoint.h"
#include "moecert/limits.h"
#include "moecert/models.h"
#include "moecert/onnx_model.h"
#include "moecert/runtime.h"

namespace moecert::import_impl {
namespace {

/// Samples of each component's check.
constexpr int64_t kCheckSamples = 64;

using Component = GraphComponent;

std::vector<int64_t> image_of(const ModelSpec& s) { return {s.in_channels, s.height, s.width}; }

/// An ONNX file as a component reading `image` ([C, H, W]; a flat ONNX input of C·H·W
/// values gets a flatten in front). `image` empty: the file's own shape sets it.
Component onnx_component(const std::string& role, const std::string& path,
                         std::vector<int64_t>& image) {
  auto m = onnx_load(path);
  std::vector<int64_t> shape = m.input_shape;
  LayerGraph g;
  if (shape.size() == 1) {  // a flat input: our images are [1, 1, n] unless set otherwise
    if (image.empty()) image = {1, 1, shape[0]};
    g.add(Layer::simple(Layer::Kind::flatten, "flatten"));
  } else if (image.empty()) {
    image = shape;
  }
  const int64_t n = image[0] * image[1] * image[2];
  if ((shape.size() == 1 && shape[0] != n) || (shape.size() == 3 && shape != image))
    throw DataError("import: " + role + " " + path + " reads inputs of shape " + shape_str(shape) +
                    ", the model's images are " + shape_str(image));
  g.append(m.graph);
  Component c{role, path, std::move(g), {}, {}};
  auto declared = m.onnx_input_shape;
  c.reference = [path, declared](const torch::Tensor& xn) {
    std::vector<int64_t> s{xn.size(0)};
    s.insert(s.end(), declared.begin(), declared.end());
    return onnx_evaluate(path, xn.reshape(s));
  };
  c.record = {{"onnx", path}, {"sha256", sha256_file(path)}};
  return c;
}

/// A state dict of a registered backbone: {"torch": FILE, "backbone": KIND,
/// "state_dict": "net", "prefix": "experts.0.net."}; `outputs` logits.
Component torch_component(const std::string& role, const nlohmann::json& j, const std::string& path,
                          const std::vector<int64_t>& image, int64_t outputs,
                          const std::string& where) {
  if (!j.contains("backbone") || !j.at("backbone").is_string())
    throw ConfigError(where + ": a \"torch\" component needs \"backbone\" (a registered kind)");
  const std::string kind = j.at("backbone").get<std::string>();
  const std::string state_dict = j.value("state_dict", std::string());
  const std::string prefix = j.value("prefix", std::string());
  // Sized before anything is allocated: the shape comes from the file.
  const auto cost = backbone_cost(kind, image[0], image[1], image[2], outputs);
  limits::check_memory(where + " (backbone " + kind + ")", "input_shape",
                       shape_str(image) + ", " + std::to_string(outputs) + " outputs",
                       16.0 * cost.parameters);
  auto net = backbone_make(kind, image[0], image[1], image[2], outputs);
  TorchFile file(path);
  Source src = source_of(file, {state_dict}, {"module."}, prefix);
  KeyMap map;
  map.name = where;
  map.rules = {{"(.*)", "$1"}};
  const int64_t filled = fill(*net, src, map);
  net->eval();
  Component c{role, path, net->graph(), {}, {}};
  c.reference = [net](const torch::Tensor& xn) { return net->forward(xn); };
  c.record = {{"torch", path},    {"sha256", sha256_file(path)},
              {"backbone", kind}, {"state_dict", state_dict},
              {"prefix", prefix}, {"tensors", filled}};
  return c;
}

/// Compares the written model's component with its source on random images; throws
/// DataError (exit 2) beyond the tolerance (relative to the outputs' scale).
void check_component(Component& c, BackboneImpl& ours, const MoeImpl& model, double tolerance) {
  if (!c.reference) return;  // checked with the whole model (--reference)
  torch::NoGradGuard no_grad;
  const auto& s = model.spec();
  auto gen = at::detail::createCPUGenerator(20261203);
  auto x = torch::rand({kCheckSamples, s.in_channels, s.height, s.width}, gen);
  auto xn = model.normalise(x);
  const auto want = c.reference(xn).to(torch::kFloat32).reshape({kCheckSamples, -1});
  const auto got = ours.forward(xn).reshape({kCheckSamples, -1});
  if (got.sizes() != want.sizes())
    throw DataError("import: " + c.role + " " + c.source + " gives outputs of shape " +
                    shape_str(want.sizes().vec()) + " where the model gives " +
                    shape_str(got.sizes().vec()));
  const double diff = (got - want).abs().max().item<double>();
  const double scale = std::max(1.0, want.abs().max().item<double>());
  c.record["check"] = {{"samples", kCheckSamples},
                       {"max_abs_diff", diff},
                       {"output_scale", scale},
                       {"tolerance", tolerance * scale}};
  if (!(diff <= tolerance * scale))
    throw DataError("import: " + c.role + " " + c.source +
                    " is not reproduced: max |Δ| = " + fmt_fixed(diff, 6) + " on " +
                    std::to_string(kCheckSamples) + " random inputs (tolerance " +
                    fmt_fixed(tolerance * scale, 6) + "); nothing was written");
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError("import: " + path + ": cannot be read");
  try {
    return nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    throw ConfigError("import: " + path + ": not JSON (" + e.what() + ")");
  }
}

std::string relative_to(const std::string& file, const std::string& path) {
  if (path.empty() || path[0] == '/') return path;
  const auto slash = file.rfind('/');
  return slash == std::string::npos ? path : file.substr(0, slash + 1) + path;
}

/// The components of an assembly file (see docs/import.md) and the spec they make.
std::vector<Component> assembly_parse(const ImportOptions& o, const nlohmann::json& j,
                                      const std::string& f, ModelSpec& spec) {
  static const std::set<std::string> known = {"experts",     "router",  "routing", "top_k",
                                              "input_shape", "classes", "mean",    "std"};
  if (!j.is_object()) throw ConfigError(f + ": must be a JSON object");
  for (const auto& [k, v] : j.items())
    if (!known.count(k)) throw ConfigError(f + ": unknown field '" + k + "'");
  if (!j.contains("experts") || !j.at("experts").is_array() || j.at("experts").empty() ||
      static_cast<int64_t>(j.at("experts").size()) > limits::max_experts)
    throw ConfigError(f + ": \"experts\" must be an array of 1 to " +
                      std::to_string(limits::max_experts) + " components");
  const auto& experts = j.at("experts");
  std::vector<int64_t> image;
  // An integer field as an integer (a float's conversion could overflow).
  auto integer = [&](const nlohmann::json& v, const std::string& field) {
    if (!v.is_number_integer())
      throw ConfigError(f + ": \"" + field + "\" must be an integer, got " +
                        v.dump().substr(0, 40));
    return v.get<int64_t>();
  };
  try {
    if (j.contains("input_shape")) {
      if (!j.at("input_shape").is_array()) throw ConfigError(f + ": \"input_shape\" is [C, H, W]");
      for (const auto& d : j.at("input_shape")) image.push_back(integer(d, "input_shape"));
    }
    spec.num_classes = j.contains("classes") ? integer(j.at("classes"), "classes") : 0;
    const std::string routing = j.value("routing", std::string("top-k"));
    if (routing != "top-k" && routing != "soft")
      throw ConfigError::invalid("routing", routing, "top-k | soft");
    spec.routing = routing == "soft" ? Routing::soft : Routing::top_k;
    spec.top_k = j.contains("top_k") ? integer(j.at("top_k"), "top_k") : 1;
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError(f + ": " + e.what());
  }
  if (!image.empty() && image.size() != 3) throw ConfigError(f + ": \"input_shape\" is [C, H, W]");
  if (!image.empty()) {
    limits::check_range("input_shape[0] (channels)", image[0], 1, limits::max_channels);
    limits::check_range("input_shape[1] (height)", image[1], 1, limits::max_side);
    limits::check_range("input_shape[2] (width)", image[2], 1, limits::max_side);
  }
  spec.experts = static_cast<int64_t>(experts.size());
  if (spec.experts > 1 && !j.contains("router"))
    throw ConfigError(f + ": several experts need a \"router\" component");
  if (spec.experts == 1 && j.contains("router"))
    throw ConfigError(f + ": one expert has no router (remove \"router\")");
  // Pass 1: ONNX components fix the image shape and the class count.
  std::vector<nlohmann::json> parts(experts.begin(), experts.end());
  if (j.contains("router")) parts.push_back(j.at("router"));
  auto role_of = [&](size_t k) {
    return k < experts.size() ? "experts[" + std::to_string(k) + "]" : std::string("router");
  };
  std::vector<Component> out(parts.size());
  for (size_t k = 0; k < parts.size(); ++k) {
    const auto& p = parts[k];
    const std::string where = f + ": " + role_of(k);
    if (!p.is_object() || p.contains("onnx") == p.contains("torch"))
      throw ConfigError(where +
                        ": a component is {\"onnx\": FILE} or {\"torch\": FILE, "
                        "\"backbone\": KIND, \"state_dict\", \"prefix\"}");
    if (p.contains("onnx")) {
      out[k] =
          onnx_component(role_of(k), relative_to(o.source, p.at("onnx").get<std::string>()), image);
      const int64_t outputs = graph_out_shape(out[k].graph, image).at(0);
      if (k < experts.size() && spec.num_classes == 0) spec.num_classes = outputs;
    }
  }
  if (image.empty())
    throw ConfigError(f + ": no ONNX component fixes the image shape: give \"input_shape\"");
  if (spec.num_classes == 0)
    throw ConfigError(f + ": no ONNX expert fixes the class count: give \"classes\"");
  limits::check_range("classes", spec.num_classes, 2, limits::max_classes);
  for (size_t k = 0; k < parts.size(); ++k)
    if (parts[k].contains("torch"))
      out[k] = torch_component(
          role_of(k), parts[k], relative_to(o.source, parts[k].at("torch").get<std::string>()),
          image, k < experts.size() ? spec.num_classes : spec.experts, f + ": " + role_of(k));
  spec.in_channels = image[0], spec.height = image[1], spec.width = image[2];
  if (spec.routing == Routing::soft) spec.top_k = spec.experts;
  if (o.mean.empty() && j.contains("mean")) spec.mean = j.at("mean").get<std::vector<double>>();
  if (o.std.empty() && j.contains("std")) spec.std = j.at("std").get<std::vector<double>>();
  return out;
}

std::vector<Component> assembly(const ImportOptions& o, ModelSpec& spec) {
  const auto j = read_json(o.source);
  const std::string f = "import: " + o.source;
  try {
    return assembly_parse(o, j, f, spec);
  } catch (const nlohmann::json::exception& e) {  // a field of the wrong type
    throw ConfigError(f + ": " + e.what());
  }
}

}  // namespace

nlohmann::json import_graph(const ImportOptions& o) {
  const bool is_onnx = has_suffix(o.source, ".onnx");
  if (!o.key_map.empty() || !o.member.empty() || (!o.preset.empty() && !graph_preset(o.preset)))
    throw ConfigError("import: --preset, --key-map and --member are for torch.save files; " +
                      o.source + " is " + (is_onnx ? "an ONNX model" : "an assembly file"));
  if (!(o.tolerance > 0))
    throw ConfigError::invalid("--tolerance", std::to_string(o.tolerance), "> 0");
  ModelSpec spec;
  spec.kind = "moe", spec.expert = "graph", spec.router = "graph";
  spec.mean.clear(), spec.std.clear();
  std::vector<Component> parts;
  if (!o.preset.empty()) {
    if (o.reference.empty() && !o.allow_unchecked)
      throw ConfigError("import: --preset " + o.preset +
                        " needs --reference REF.pt (the logits and routes of the source model, "
                        "docs/import.md); --allow-unchecked writes without that check");
    parts = paper2_graph_components(o, spec);
  } else if (is_onnx) {
    std::vector<int64_t> image;
    parts.push_back(onnx_component("model", o.source, image));
    spec.in_channels = image[0], spec.height = image[1], spec.width = image[2];
    spec.num_classes = graph_out_shape(parts[0].graph, image).at(0);
    spec.experts = 1, spec.top_k = 1;
  } else {
    parts = assembly(o, spec);
  }
  const int64_t C = spec.in_channels;
  spec.mean = per_channel(o.mean.empty() ? spec.mean : o.mean, C, "--mean", 0.0);
  spec.std = per_channel(o.std.empty() ? spec.std : o.std, C, "--std", 1.0);
  const std::vector<int64_t> image = image_of(spec);
  nlohmann::json graphs = {{"experts", nlohmann::json::array()}};
  for (size_t k = 0; k < static_cast<size_t>(spec.experts); ++k)
    graphs["experts"].push_back(graph_structure(parts[k].graph, image));
  if (spec.experts > 1) graphs["router"] = graph_structure(parts.back().graph, image);
  spec.graphs = graphs;
  spec.validate();
  Moe model(spec);
  model->eval();
  int64_t tensors = 0;
  nlohmann::json components = nlohmann::json::array();
  for (size_t k = 0; k < parts.size(); ++k) {
    BackboneImpl& net = k < static_cast<size_t>(spec.experts)
                            ? model->expert(static_cast<int64_t>(k))
                            : *model->router();
    graph_net_fill(net, parts[k].graph);
    tensors += static_cast<int64_t>(net.parameters().size());
    check_component(parts[k], net, *model, o.tolerance);
    parts[k].record["component"] = parts[k].role;
    components.push_back(parts[k].record);
  }
  nlohmann::json check = {{"kind", "components"}, {"components", components}};
  if (o.reference.empty() && !o.preset.empty())
    check = {{"kind", "none"},
             {"note", "written with --allow-unchecked: not compared with the source"},
             {"components", components}};
  if (!o.reference.empty()) {
    check["reference"] = self_check(*model, o);
    check["kind"] = "components and reference logits";
  }
  nlohmann::json record = {{"source", o.source},
                           {"source_sha256", sha256_file(o.source)},
                           {"layout", !o.preset.empty() ? o.preset
                                      : is_onnx         ? "onnx"
                                                        : "assembly"},
                           {"tensors", tensors},
                           {"check", check}};
  if (!is_onnx && o.preset.empty()) record["assembly"] = read_json(o.source);
  nlohmann::json manifest = {
      {"architecture", spec.to_json()}, {"training", {{"method", "imported"}}}, {"import", record}};
  if (!o.dataset.empty()) manifest["dataset"] = {{"name", o.dataset}};
  checkpoint_save(o.out, *model, manifest);
  return record;
}

}  // namespace moecert::import_impl
