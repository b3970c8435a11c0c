// Paper 2's Wide ResNet and VGG-16 MoE-CNNs (OPTML-Group/Robust-MoE-CNN,
// models/wrn_cifar_moe.py and models/vgg_moe.py) as graph components. Each MoE
// convolution holds N channel groups in one weight [N·W, in, k, k] and outputs only the
// selected group's W channels; the BatchNorms after them have W channels shared by the
// groups; one ResNet-20 router's top-1 choice selects the group of every layer. So the
// model is an MoE of N experts, expert e being the dense network through group e of
// every MoE convolution (and everything shared), routed top-1 by the router — the graph
// of each path is built here from the state dict, following the code's forward.
#include <torch/torch.h>

#include <array>
#include <regex>

#include "import-impl.h"
#include "moecert/checkpoint.h"

namespace moecert::import_impl {
namespace {

constexpr const char* kWrn = "paper2-moe-cnn-wrn";
constexpr const char* kVgg = "paper2-moe-cnn-vgg16";

/// The state dict with every tensor it hands out marked used.
class Reader {
 public:
  Reader(Source& s, int64_t groups) : s_(s), groups_(groups) {}
  bool has(const std::string& k) const { return s_.has(k); }
  torch::Tensor get(const std::string& k) {
    take(k);
    return s_.load(k).to(torch::kFloat64);
  }
  /// Rows [eW, (e+1)W) of an MoE weight [N·W, ...].
  torch::Tensor group(const std::string& k, int64_t e) {
    take(k);
    auto w = s_.load_kept(k);
    if (w.dim() < 1 || w.size(0) % groups_ != 0)
      s_.fail("'" + k + "' has shape " + shape_str(w.sizes().vec()) +
              ": its rows are not N = " + std::to_string(groups_) + " channel groups");
    const int64_t W = w.size(0) / groups_;
    return w.narrow(0, e * W, W).to(torch::kFloat64).contiguous();
  }
  Layer conv(const std::string& name, torch::Tensor w, int64_t stride, int64_t pad) {
    const std::string bias = name + ".bias";
    return Layer::conv2d(name, std::move(w), has(bias) ? get(bias) : torch::Tensor(), stride, pad);
  }
  Layer batch_norm(const std::string& p) {
    if (has(p + ".num_batches_tracked")) s_.used.insert(p + ".num_batches_tracked");
    return Layer::batch_norm(p, get(p + ".weight"), get(p + ".bias"), get(p + ".running_mean"),
                             get(p + ".running_var"), 1e-5);
  }
  [[noreturn]] void fail(const std::string& why) const { s_.fail(why); }
  /// Marks a module the forward never reads (its keys exist all the same).
  void unused(const std::string& p) {
    for (const char* t :
         {".weight", ".bias", ".running_mean", ".running_var", ".num_batches_tracked"})
      if (has(p + t)) s_.used.insert(p + t);
  }

 private:
  void take(const std::string& k) {
    if (!s_.has(k)) s_.fail("preset needs key '" + k + "', which the state dict does not hold");
    s_.used.insert(k);
  }

  Source& s_;
  int64_t groups_;
};

/// The number of blocks of each of the WRN's three groups (block<G>.layer.<i>.*).
std::array<int64_t, 3> wrn_blocks(const Source& s) {
  const std::regex re(R"(block([123])\.layer\.(\d+)\..*)");
  std::array<int64_t, 3> n{0, 0, 0};
  std::smatch m;
  for (const auto& k : s.order)
    if (std::regex_match(k, m, re)) {
      auto& c = n[static_cast<size_t>(std::stoi(m[1].str()) - 1)];
      c = std::max<int64_t>(c, std::stoll(m[2].str()) + 1);
    }
  for (int G = 1; G <= 3; ++G)
    if (n[static_cast<size_t>(G - 1)] == 0)
      s.fail("preset needs keys 'block" + std::to_string(G) + ".layer.0.*'");
  return n;
}

Layer relu() { return Layer::simple(Layer::Kind::relu); }

/// Path e of the WRN: conv1 (dense), three groups of blocks, relu(bn1), pool, fc. A
/// block whose input and output widths differ (it has convShortcut) applies conv1 and
/// convShortcut to its raw input — the code's forward never reassigns x, so that block's
/// bn1 has no effect (its keys are there); the others are pre-activation blocks.
LayerGraph wrn_path(Reader& r, int64_t e, const std::array<int64_t, 3>& blocks) {
  LayerGraph g;
  g.add(r.conv("conv1", r.get("conv1.weight"), 1, 1));
  for (int G = 1; G <= 3; ++G) {
    const std::string block = "block" + std::to_string(G) + ".layer.";
    const int64_t n = blocks[static_cast<size_t>(G - 1)];
    for (int64_t i = 0; i < n; ++i) {
      const std::string p = block + std::to_string(i) + ".";
      const int64_t stride = i == 0 && G > 1 ? 2 : 1;
      const bool shortcut = r.has(p + "convShortcut.weight");
      const int in = g.output();
      int src = in;
      if (shortcut) {
        r.unused(p + "bn1");
      } else {
        src = g.add(r.batch_norm(p + "bn1"), {in});
        src = g.add(relu(), {src});
      }
      int y = g.add(r.conv(p + "conv1", r.group(p + "conv1.weight", e), stride, 1), {src});
      y = g.add(r.batch_norm(p + "bn2"), {y});
      y = g.add(relu(), {y});
      y = g.add(r.conv(p + "conv2", r.group(p + "conv2.weight", e), 1, 1), {y});
      const int sc =
          shortcut
              ? g.add(r.conv(p + "convShortcut", r.group(p + "convShortcut.weight", e), stride, 0),
                      {in})
              : in;
      g.add(Layer::simple(Layer::Kind::residual, p + "add"), {sc, y});
    }
  }
  g.add(r.batch_norm("bn1"));
  g.add(relu());
  g.add(Layer::simple(Layer::Kind::global_avgpool));
  g.add(Layer::dense("fc", r.get("fc.weight"), r.get("fc.bias")));
  return g;
}

/// Path e of VGG-16-BN: features.<i> as the code's Sequential numbers them (conv, BN,
/// ReLU; 'M' a 2x2 max-pool; the first conv dense, every other an MoE conv; four pools),
/// adaptive average pooling to 2x2, classifier.{0,2,4} with ReLUs between.
LayerGraph vgg_path(Reader& r, int64_t e, int64_t height, int64_t width) {
  constexpr int64_t M = 0;
  const std::vector<int64_t> cfg{64, 64,  M,   128, 128, M,   256, 256, 256,
                                 M,  512, 512, 512, M,   512, 512, 512};
  LayerGraph g;
  int64_t idx = 0, channels = 0;
  for (int64_t v : cfg) {
    const std::string p = "features." + std::to_string(idx);
    if (v == M) {
      g.add(Layer::max_pool(p, 2, 2, 0));
      height /= 2, width /= 2, idx += 1;
      continue;
    }
    auto w = idx == 0 ? r.get(p + ".weight") : r.group(p + ".weight", e);
    channels = w.size(0);
    g.add(r.conv(p, w, 1, 1));
    g.add(r.batch_norm("features." + std::to_string(idx + 1)));
    g.add(relu());
    idx += 3;
  }
  // AdaptiveAvgPool2d((2, 2)): the identity on 2x2 maps, a k x k average (as a
  // convolution) on 2k x 2k maps; other sizes pool unevenly and are refused.
  if (height != width || height % 2 != 0)
    r.fail(
        "the VGG preset reads images whose feature maps are 2k x 2k after four pools "
        "(e.g. 32x32, 64x64); these give " +
        std::to_string(height) + "x" + std::to_string(width));
  if (height > 2) {
    const int64_t k = height / 2;
    auto w = torch::zeros({channels, channels, k, k}, torch::kFloat64);
    for (int64_t c = 0; c < channels; ++c) w[c][c].fill_(1.0 / static_cast<double>(k * k));
    g.add(Layer::conv2d("avgpool", w, {}, k, 0));
  }
  g.add(Layer::simple(Layer::Kind::flatten));
  for (int c : {0, 2, 4}) {
    const std::string p = "classifier." + std::to_string(c);
    g.add(Layer::dense(p, r.get(p + ".weight"), r.get(p + ".bias")));
    if (c != 4) g.add(relu());
  }
  return g;
}

}  // namespace

bool graph_preset(const std::string& preset) { return preset == kWrn || preset == kVgg; }

std::vector<GraphComponent> paper2_graph_components(const ImportOptions& o, ModelSpec& spec) {
  TorchFile file(o.source);
  Source s = source_of(file, {"state_dict", ""}, {"module."}, "");
  if (o.input_shape.size() != 3)
    throw ConfigError::invalid("--input-shape", std::to_string(o.input_shape.size()) + " values",
                               "C,H,W");
  spec.in_channels = o.input_shape[0], spec.height = o.input_shape[1],
  spec.width = o.input_shape[2];
  const bool wrn = o.preset == kWrn;
  if (!s.has("router.fc.weight"))
    s.fail(
        "preset needs key 'router.fc.weight' (paper 2's router), which the state dict does "
        "not hold");
  spec.experts = o.experts ? o.experts : s.ref("router.fc.weight").sizes.at(0);
  const std::string head = wrn ? "fc.weight" : "classifier.4.weight";
  if (!s.has(head)) s.fail("preset needs key '" + head + "', which the state dict does not hold");
  spec.num_classes = o.classes ? o.classes : s.ref(head).sizes.at(0);
  spec.routing = Routing::top_k, spec.top_k = 1;

  // The normalisation: WRN's forward applies normalize.* first (the router sees the
  // normalised image too); VGG's never does, whatever the keys hold.
  const bool has_norm = s.has("normalize.mean") && s.has("normalize.std");
  if (has_norm) s.used.insert("normalize.mean"), s.used.insert("normalize.std");
  if (wrn && has_norm) {
    if (!o.mean.empty() || !o.std.empty())
      s.fail(
          "the model normalises its input itself (normalize.mean / normalize.std): "
          "--mean/--std would normalise twice");
    auto values = [&](const char* k) {
      auto t = s.load(k).to(torch::kDouble).flatten().contiguous();
      return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
    };
    spec.mean = values("normalize.mean"), spec.std = values("normalize.std");
  } else {
    spec.mean = o.mean, spec.std = o.std;
  }

  std::vector<GraphComponent> parts;
  Reader r(s, spec.experts);
  const auto blocks = wrn ? wrn_blocks(s) : std::array<int64_t, 3>{};
  for (int64_t e = 0; e < spec.experts; ++e) {
    GraphComponent c;
    c.role = "experts[" + std::to_string(e) + "]";
    c.source = o.source;
    c.graph = wrn ? wrn_path(r, e, blocks) : vgg_path(r, e, spec.height, spec.width);
    c.record = {{"torch", o.source}, {"group", e}};
    parts.push_back(std::move(c));
  }

  // The router: router.* is a ResNet-20; every copy the training script registered under
  // an MoE convolution (<layer>.router.*) must equal it.
  auto router = backbone_make("resnet20", spec.in_channels, spec.height, spec.width, spec.experts);
  Source rs = source_of(file, {s.where}, {"module."}, "router.");
  KeyMap map;
  map.name = o.preset + " router";
  map.rules = {{"(.*)", "$1"}};
  fill(*router, rs, map);
  router->eval();
  for (const auto& k : s.order)
    if (k.compare(0, 7, "router.") == 0) s.used.insert(k);
  check_copies(s, {{R"((.+)\.router\.(.+))", "router.$2"}});
  check_all_used(s, {}, "preset " + o.preset);
  GraphComponent rc;
  rc.role = "router", rc.source = o.source;
  rc.graph = router->graph();
  rc.reference = [router](const torch::Tensor& xn) { return router->forward(xn); };
  rc.record = {{"torch", o.source}, {"backbone", "resnet20"}, {"prefix", "router."}};
  parts.push_back(std::move(rc));
  return parts;
}

}  // namespace moecert::import_impl
