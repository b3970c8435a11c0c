// `moecert import` (include/moecert/import.h): a state dict from a torch.save file mapped
// onto a moecert model by a layout (a preset of the papers' codes or a JSON key map),
// checked against reference logits, written as a checkpoint directory.
#include "moecert/import.h"

#include <torch/torch.h>

#include <fstream>
#include <map>
#include <regex>
#include <set>

#include "import-impl.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/limits.h"
#include "moecert/runtime.h"
#include "moecert/torch_file.h"

namespace moecert {
namespace import_impl {

/// The tensors under the first of `candidates` (dotted paths; "" = root) that holds any;
/// `member` ("Smoe.") narrows to one sub-model.
Source source_of(TorchFile& file, const std::vector<std::string>& candidates,
                 const std::vector<std::string>& strip, const std::string& member) {
  for (const auto& where : candidates) {
    const std::string prefix = where.empty() ? "" : where + ".";
    Source s{file, where, {}, {}, {}};
    for (const auto& [key, ref] : file.tensors()) {
      if (key.compare(0, prefix.size(), prefix) != 0) continue;
      std::string k = key.substr(prefix.size());
      for (bool again = true; again;) {
        again = false;
        for (const auto& p : strip)
          if (!p.empty() && k.compare(0, p.size(), p) == 0) k = k.substr(p.size()), again = true;
      }
      if (!member.empty()) {
        if (k.compare(0, member.size(), member) != 0) continue;
        k = k.substr(member.size());
      }
      if (!s.refs.emplace(k, ref).second)
        s.fail("two tensors map to key '" + k + "' once prefixes are removed");
      s.order.push_back(k);
    }
    if (!s.refs.empty()) return s;
  }
  std::string tried;
  for (const auto& c : candidates)
    tried += (tried.empty() ? "'" : ", '") + (c.empty() ? "<root>" : c) + "'";
  throw DataError(
      "import of " + file.path() + ": no tensors under " + tried +
      (member.empty() ? "" : " with member prefix '" + member + "'") + " (the file holds " +
      std::to_string(file.tensors().size()) + " tensors" +
      (file.tensors().empty() ? "" : ", the first '" + file.tensors().front().first + "'") + ")");
}

}  // namespace import_impl

namespace {

using import_impl::Source;

const std::vector<int64_t>& sizes_of(const Source& s, const std::string& key) {
  if (!s.has(key)) s.fail("the layout needs key '" + key + "', which the state dict does not hold");
  return s.ref(key).sizes;
}

// --- presets ------------------------------------------------------------------------

ModelSpec base_spec(const ImportOptions& o) {
  ModelSpec spec;
  if (o.input_shape.size() != 3)
    throw ConfigError::invalid("--input-shape", std::to_string(o.input_shape.size()) + " values",
                               "C,H,W");
  spec.in_channels = o.input_shape[0], spec.height = o.input_shape[1],
  spec.width = o.input_shape[2];
  spec.routing = Routing::top_k, spec.top_k = 1;
  return spec;
}

int64_t count_indices(const Source& s, const std::string& pattern) {
  const std::regex re(pattern);
  std::set<int64_t> seen;
  std::smatch m;
  for (const auto& k : s.order)
    if (std::regex_match(k, m, re)) seen.insert(std::stoll(m[1].str()));
  for (int64_t i = 0; i < static_cast<int64_t>(seen.size()); ++i)
    if (!seen.count(i))
      s.fail("expert indices are not 0..E-1: " + std::to_string(i) + " is missing");
  return static_cast<int64_t>(seen.size());
}

/// Paper 1's MOE_Resnet18: experts.{i}.net.<ResNet-18>, router.gate (a linear layer on
/// the flattened normalised image; argmax, no weight).
KeyMap paper1_map(const ImportOptions& o, const Source& s) {
  KeyMap m;
  m.name = o.preset;
  m.architecture = base_spec(o);
  auto& a = m.architecture;
  a.kind = "moe", a.expert = "resnet18", a.router = "linear";
  a.experts = o.experts ? o.experts : count_indices(s, R"(experts\.(\d+)\.net\..*)");
  a.num_classes = o.classes ? o.classes : sizes_of(s, "experts.0.net.linear.weight").at(0);
  if (a.experts > 1) {
    const auto& g = sizes_of(s, "router.gate.weight");
    if (g.size() != 2 || g[0] != a.experts || g[1] != a.in_channels * a.height * a.width)
      s.fail("router.gate.weight has shape " + shape_str(g) + ", expected [" +
             std::to_string(a.experts) + ", " + std::to_string(a.in_channels * a.height * a.width) +
             "] for --input-shape " + std::to_string(a.in_channels) + "," +
             std::to_string(a.height) + "," + std::to_string(a.width));
  }
  m.rules = {{R"(router\.fc\.(weight|bias))", "router.gate.$1"},
             {R"(experts\.(\d+)\.(.+))", "experts.$1.net.$2"}};
  return m;
}

/// Paper 2's MoE-CNN ResNet-18: block convs [W·N, in, 3, 3] (group e = rows [eW,(e+1)W)),
/// BatchNorms of W channels shared by the groups, a dense 64-channel stem, dense shortcuts
/// and a dense head on W·8 features; a ResNet-20 router whose copies under every MoE conv
/// must equal router.*.
KeyMap paper2_map(const ImportOptions& o, const Source& s) {
  KeyMap m;
  m.name = o.preset;
  m.architecture = base_spec(o);
  auto& a = m.architecture;
  a.kind = "moe-cnn", a.expert = "resnet18", a.router = "resnet20";
  a.experts = o.experts ? o.experts : sizes_of(s, "router.fc.weight").at(0);
  a.num_classes = o.classes ? o.classes : sizes_of(s, "linear.weight").at(0);
  const auto& c = sizes_of(s, "layer1.0.conv1.weight");
  if (c.size() != 4 || c[0] % a.experts != 0)
    s.fail("layer1.0.conv1.weight has shape " + shape_str(c) +
           ": its rows are not N = " + std::to_string(a.experts) + " channel groups");
  a.scale = o.scale ? o.scale : static_cast<double>(c[0] / a.experts) / 64.0;
  m.rules = {
      {R"(body\.groups\.(\d+)\.(layer\d+\.\d+\.conv[12]\.weight))", "$2", KeyOp::group_rows, 1},
      {R"(body\.groups\.(\d+)\.(.+))", "$2"},
      {R"(body\.linear\.weight)", "linear.weight", KeyOp::tile_columns},
      {R"(body\.linear\.bias)", "linear.bias"},
      {R"(router\.(.+))", "router.$1"}};
  m.ignore = {R"(layer\d+\.\d+\.conv[12]\.router\..+)", R"(normalize\.(mean|std))"};
  m.must_equal = {{R"(layer\d+\.\d+\.conv[12]\.router\.(.+))", "router.$1"}};
  m.mean_key = "normalize.mean", m.std_key = "normalize.std";
  return m;
}

KeyOp key_op_parse(const std::string& s, const std::string& file) {
  if (s == "copy") return KeyOp::copy;
  if (s == "group_rows") return KeyOp::group_rows;
  if (s == "tile_columns") return KeyOp::tile_columns;
  throw ConfigError(file + ": rules[].op '" + s + "' is not one of copy, group_rows, tile_columns");
}

/// A JSON key map: {"architecture": {...}, "state_dict": "net", "strip_prefixes": [...],
/// "rules": [{"to", "from", "op", "group"}], "ignore": [...], "must_equal": [[a, b]]}.
KeyMap json_map(const ImportOptions& o) {
  std::ifstream in(o.key_map);
  if (!in) throw ConfigError("--key-map " + o.key_map + ": cannot be read");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    throw ConfigError("--key-map " + o.key_map + ": not JSON (" + e.what() + ")");
  }
  const std::string f = "--key-map " + o.key_map;
  if (!j.is_object() || !j.contains("architecture") || !j.contains("rules") ||
      !j["rules"].is_array())
    throw ConfigError(f + ": needs an object with \"architecture\" and \"rules\" (an array)");
  static const std::set<std::string> known = {"architecture", "state_dict", "strip_prefixes",
                                              "rules",        "ignore",     "must_equal",
                                              "mean_key",     "std_key"};
  for (const auto& [k, v] : j.items())
    if (!known.count(k)) throw ConfigError(f + ": unknown field '" + k + "'");
  KeyMap m;
  m.name = o.key_map;
  auto arch = ModelSpec{}.to_json();
  try {
    arch.update(j["architecture"]);
    // The normalisation comes from the options (set_normalisation); until then, the
    // identity for the architecture's channel count.
    if (!j["architecture"].contains("mean") && arch["in_channels"].is_number_integer()) {
      const auto c = static_cast<size_t>(std::max<int64_t>(1, arch["in_channels"].get<int64_t>()));
      arch["mean"] = std::vector<double>(std::min<size_t>(c, 4096), 0.0);
      arch["std"] = std::vector<double>(std::min<size_t>(c, 4096), 1.0);
    }
    m.architecture = ModelSpec::from_json(arch);
  } catch (const std::exception& e) {
    throw ConfigError(f + ": " + e.what());
  }
  try {
    m.state_dict = j.value("state_dict", "");
    if (j.contains("strip_prefixes"))
      m.strip_prefixes = j["strip_prefixes"].get<std::vector<std::string>>();
    m.ignore = j.value("ignore", std::vector<std::string>{});
    for (const auto& pair : j.value("must_equal", nlohmann::json::array()))
      m.must_equal.emplace_back(pair.at(0).get<std::string>(), pair.at(1).get<std::string>());
    m.mean_key = j.value("mean_key", ""), m.std_key = j.value("std_key", "");
    for (const auto& r : j["rules"]) {
      KeyRule rule{r.at("to").get<std::string>(), r.at("from").get<std::string>()};
      rule.op = key_op_parse(r.value("op", "copy"), f);
      rule.group = r.value("group", 0);
      m.rules.push_back(rule);
    }
    for (const auto& r : m.rules) std::regex check(r.to);
    for (const auto& r : m.ignore) std::regex check(r);
  } catch (const ConfigError&) {
    throw;
  } catch (const std::exception& e) {
    throw ConfigError(f + ": " + e.what());
  }
  return m;
}

}  // namespace

namespace import_impl {

// --- mapping ------------------------------------------------------------------------

/// Our tensor `key` from the source by `rule` (whose regex matched as `m`).
torch::Tensor mapped(Source& s, const std::string& key, const torch::Tensor& ours,
                     const KeyRule& rule, const std::smatch& m) {
  const std::string from = m.format(rule.from);
  if (!s.has(from)) {
    if (key.size() >= 19 && key.compare(key.size() - 19, 19, "num_batches_tracked") == 0) return {};
    s.fail("model tensor '" + key + "' comes from '" + from + "' (rule '" + rule.to +
           "'), which the state dict does not hold");
  }
  s.used.insert(from);
  const auto& ref = s.ref(from);
  const auto want = ours.sizes().vec();
  int64_t g = 0;
  bool fits = ref.sizes.size() == want.size();
  if (rule.op == KeyOp::group_rows) {
    g = std::stoll(m[static_cast<size_t>(rule.group)].str());
    fits = fits && !want.empty() && want[0] > 0 && ref.sizes[0] % want[0] == 0 &&
           ref.sizes[0] >= (g + 1) * want[0] &&
           std::equal(want.begin() + 1, want.end(), ref.sizes.begin() + 1);
  } else if (rule.op == KeyOp::tile_columns) {
    fits = fits && want.size() == 2 && ref.sizes[0] == want[0] && ref.sizes[1] > 0 &&
           want[1] % ref.sizes[1] == 0;
  } else {
    fits = fits && ref.sizes == want;
  }
  if (!fits)
    s.fail("'" + from + "' has shape " + shape_str(ref.sizes) +
           ", which cannot give model tensor '" + key + "' of shape " + shape_str(want) +
           (rule.op == KeyOp::group_rows     ? " as its channel group " + std::to_string(g)
            : rule.op == KeyOp::tile_columns ? " by repeating its columns"
                                             : ""));
  const bool floating = c10::isFloatingType(ours.scalar_type());
  if (floating != c10::isFloatingType(ref.dtype))
    s.fail("'" + from + "' holds " + std::string(c10::toString(ref.dtype)) + " values but '" + key +
           "' needs " + c10::toString(ours.scalar_type()));
  auto t = rule.op == KeyOp::group_rows ? s.load_kept(from) : s.load(from);
  if (rule.op == KeyOp::group_rows) t = t.narrow(0, g * want[0], want[0]);
  if (rule.op == KeyOp::tile_columns) t = t.repeat({1, want[1] / ref.sizes[1]});
  return t.to(ours.scalar_type());
}

std::vector<double> per_channel(const std::vector<double>& v, int64_t channels, const char* option,
                                double dflt) {
  if (v.empty()) return std::vector<double>(static_cast<size_t>(channels), dflt);
  if (v.size() == 1) return std::vector<double>(static_cast<size_t>(channels), v[0]);
  if (static_cast<int64_t>(v.size()) != channels)
    throw ConfigError::invalid(option, std::to_string(v.size()) + " values",
                               "1 or " + std::to_string(channels) + " (one per channel)");
  return v;
}

void check_copies(Source& s, const std::vector<std::pair<std::string, std::string>>& must_equal) {
  for (const auto& [pattern, target] : must_equal) {
    const std::regex re(pattern);
    std::smatch m;
    for (const auto& k : s.order)
      if (std::regex_match(k, m, re)) {
        const std::string other = m.format(target);
        if (!s.has(other)) s.fail("'" + k + "' has no original '" + other + "'");
        if (!torch::equal(s.load(k), s.load_kept(other)))
          s.fail("'" + k + "' differs from '" + other + "', which it must copy");
        s.used.insert(k);
      }
  }
}

void check_all_used(const Source& s, const std::vector<std::string>& ignore,
                    const std::string& what) {
  std::vector<std::regex> res;
  for (const auto& i : ignore) res.emplace_back(i);
  std::vector<std::string> unused;
  for (const auto& k : s.order) {
    if (s.used.count(k)) continue;
    bool ignored = false;
    for (const auto& re : res) ignored = ignored || std::regex_match(k, re);
    if (!ignored) unused.push_back(k);
  }
  if (unused.empty()) return;
  std::string list;
  for (size_t i = 0; i < unused.size() && i < 5; ++i) list += (i ? ", '" : "'") + unused[i] + "'";
  s.fail(std::to_string(unused.size()) + " tensor(s) of the state dict are not part of " + what +
         " (" + list + (unused.size() > 5 ? ", ..." : "") +
         "): it does not describe this file (wrong preset, expert count or architecture)");
}

/// Fills every parameter and buffer of `model` (but the normalisation) from the source.
int64_t fill(torch::nn::Module& model, Source& s, const KeyMap& map) {
  std::vector<std::pair<std::regex, const KeyRule*>> rules;
  for (const auto& r : map.rules) rules.emplace_back(std::regex(r.to), &r);
  int64_t filled = 0;
  torch::NoGradGuard no_grad;
  auto visit = [&](const std::string& key, torch::Tensor& ours) {
    if (key == "mean" || key == "std") return;  // the normalisation: from the options
    std::smatch m;
    for (const auto& [re, rule] : rules)
      if (std::regex_match(key, m, re)) {
        auto t = mapped(s, key, ours, *rule, m);
        if (t.defined()) ours.copy_(t), ++filled;
        return;
      }
    s.fail("no rule of layout '" + map.name + "' names model tensor '" + key + "'");
  };
  for (auto& p : model.named_parameters(true)) visit(p.key(), p.value());
  for (auto& b : model.named_buffers(true)) visit(b.key(), b.value());
  check_copies(s, map.must_equal);
  check_all_used(s, map.ignore, "layout '" + map.name + "'");
  s.kept.clear();
  return filled;
}

}  // namespace import_impl

namespace {

using import_impl::fill;

/// The normalisation: the options', else the source's (mean_key / std_key), else none.
void set_normalisation(ModelSpec& spec, const ImportOptions& o, Source& s, const KeyMap& map) {
  const bool given = !o.mean.empty() || !o.std.empty();
  if (given) {
    if (o.mean.size() != o.std.size())
      throw ConfigError("--mean and --std must have the same number of values");
    spec.mean = o.mean, spec.std = o.std;
  }
  if (!map.mean_key.empty() && s.has(map.mean_key) && s.has(map.std_key)) {
    s.used.insert(map.mean_key), s.used.insert(map.std_key);
    auto to_vec = [&](const std::string& k) {
      auto t = s.load(k).to(torch::kDouble).flatten();
      return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
    };
    const auto mean = to_vec(map.mean_key), sd = to_vec(map.std_key);
    if (given)
      throw ConfigError("the state dict holds its normalisation (" + map.mean_key +
                        "); leave out --mean/--std, which would apply a second one");
    spec.mean = mean, spec.std = sd;
    return;
  }
  if (!given) {
    if (map.mean_key.empty() && o.preset.rfind("paper1", 0) == 0)
      throw ConfigError(
          "--mean and --std are required: paper 1's code normalises in its data loader, outside "
          "the "
          "model (its CIFAR-10 values on the 0-1 scale: --mean 0.491400,0.482200,0.446500 "
          "--std 0.202300,0.199400,0.201000)");
    spec.mean.assign(static_cast<size_t>(spec.in_channels), 0.0);
    spec.std.assign(static_cast<size_t>(spec.in_channels), 1.0);
  }
  spec.mean = import_impl::per_channel(spec.mean, spec.in_channels, "--mean", 0.0);
  spec.std = import_impl::per_channel(spec.std, spec.in_channels, "--std", 1.0);
}

}  // namespace

namespace import_impl {

/// Logits of the expert each sample is routed to, and the route. x in [0, 1].
std::pair<torch::Tensor, torch::Tensor> selected_logits(MoeImpl& model, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  const int64_t B = x.size(0);
  auto routes = model.route(x).selected.select(1, 0);
  torch::Tensor logits;
  for (int64_t e = 0; e < model.num_experts(); ++e) {
    auto idx = (routes == e).nonzero().flatten();
    if (idx.numel() == 0) continue;
    auto out = model.expert_logits(e, x.index_select(0, idx));
    if (!logits.defined()) logits = torch::zeros({B, out.size(1)}, out.options());
    logits.index_copy_(0, idx, out);
  }
  return {logits, routes};
}

/// Compares the model with the reference file; throws (exit 2) on a mismatch.
nlohmann::json self_check(MoeImpl& model, const ImportOptions& o) {
  TorchFile ref(o.reference);
  std::map<std::string, TorchTensorRef> t(ref.tensors().begin(), ref.tensors().end());
  const std::string f = "--reference " + o.reference;
  for (const char* k : {"inputs", "logits"})
    if (!t.count(k))
      throw DataError(f +
                      ": needs tensors \"inputs\" [B, C, H, W] in [0, 1] and \"logits\" [B, K]");
  const auto& spec = model.spec();
  const auto& in = t["inputs"].sizes;
  if (in.size() != 4 || in[1] != spec.in_channels || in[2] != spec.height || in[3] != spec.width ||
      in[0] < 1 || in[0] > 100000)
    throw DataError(f + ": inputs have shape " + shape_str(in) + ", expected [B, " +
                    std::to_string(spec.in_channels) + ", " + std::to_string(spec.height) + ", " +
                    std::to_string(spec.width) + "]");
  const auto& lg = t["logits"].sizes;
  if (lg.size() != 2 || lg[0] != in[0] || lg[1] != spec.num_classes)
    throw DataError(f + ": logits have shape " + shape_str(lg) + ", expected [" +
                    std::to_string(in[0]) + ", " + std::to_string(spec.num_classes) + "]");
  auto x = ref.load(t["inputs"]).to(torch::kFloat);
  if (x.min().item<double>() < 0 || x.max().item<double>() > 1)
    throw DataError(f + ": inputs must be pixels in [0, 1] (the model normalises them itself)");
  const auto want = ref.load(t["logits"]).to(torch::kFloat);
  model.eval();
  torch::Tensor got, routes;
  for (int64_t b0 = 0; b0 < x.size(0); b0 += 64) {
    auto [l, r] = selected_logits(model, x.narrow(0, b0, std::min<int64_t>(64, x.size(0) - b0)));
    got = got.defined() ? torch::cat({got, l}) : l;
    routes = routes.defined() ? torch::cat({routes, r}) : r;
  }
  const double diff = (got - want).abs().max().item<double>();
  nlohmann::json check = {{"reference", o.reference},
                          {"reference_sha256", sha256_file(o.reference)},
                          {"samples", x.size(0)},
                          {"max_abs_logit_diff", diff},
                          {"tolerance", o.tolerance}};
  int64_t route_mismatch = 0;
  if (t.count("routes")) {
    auto want_routes = ref.load(t["routes"]).to(torch::kLong).flatten();
    if (want_routes.numel() != x.size(0))
      throw DataError(f + ": routes must have one value per input");
    route_mismatch = (want_routes != routes).sum().item<int64_t>();
    check["routes_agree"] = x.size(0) - route_mismatch;
  }
  if (!(diff <= o.tolerance) || route_mismatch > 0)
    throw DataError(
        "import of " + o.source + " does not reproduce " + f +
        ": max |Δ logit| = " + fmt_fixed(diff, 6) + " (tolerance " + fmt_fixed(o.tolerance, 6) +
        ")" + (route_mismatch ? ", " + std::to_string(route_mismatch) + " route(s) differ" : "") +
        ". Check --mean/--std, --input-shape and the preset; nothing was written");
  return check;
}

}  // namespace import_impl

std::vector<std::pair<std::string, std::string>> import_presets() {
  return {{"paper1-moe-resnet18",
           "paper 1's MOE_Resnet18 (torch.save {\"net\": state_dict, ...}): experts.{i}.net.*, "
           "router.gate"},
          {"paper1-dual",
           "paper 1's Dual_Model_resnet18 (Smoe./Rmoe.): refused as a whole (it blends logits); "
           "--member Smoe|Rmoe imports one member"},
          {"paper2-moe-cnn-resnet18",
           "paper 2's ResNet-18 MoE-CNN (checkpoint.pth.tar {\"state_dict\": ...}): channel-group "
           "convs, "
           "shared BatchNorms, ResNet-20 router"},
          {"paper2-moe-cnn-wrn",
           "paper 2's Wide ResNet MoE-CNN (wrn_28_10_cifar_moe; any depth and width): one graph "
           "expert per channel group, ResNet-20 router"},
          {"paper2-moe-cnn-vgg16",
           "paper 2's VGG-16-BN MoE-CNN (vgg16_bn_moe): one graph expert per channel group, "
           "ResNet-20 router"}};
}

nlohmann::json import_checkpoint(const ImportOptions& o) {
  using namespace import_impl;
  if (has_suffix(o.source, ".onnx") || has_suffix(o.source, ".json")) return import_graph(o);
  if (o.preset.empty() == o.key_map.empty())
    throw ConfigError("import: give exactly one of --preset and --key-map");
  if (!o.preset.empty()) {
    bool known = false;
    for (const auto& [name, help] : import_presets()) known = known || name == o.preset;
    if (!known) {
      std::string names;
      for (const auto& [name, help] : import_presets()) names += (names.empty() ? "" : ", ") + name;
      throw ConfigError::invalid("--preset", o.preset, "one of " + names);
    }
  }
  if (graph_preset(o.preset)) return import_graph(o);
  if (o.preset == "paper1-dual" && o.member.empty())
    throw ConfigError(
        "--preset paper1-dual: paper 1's dual-model blends its members' logits, (1-α)·Smoe(x) + "
        "α·Rmoe(x), "
        "while moecert's dual-model blends their probabilities (SPEC §1), so an import would "
        "certify a "
        "different model. Import each member as one MoE with --member Smoe or --member Rmoe (and "
        "combine them "
        "with `moecert dual`, which blends probabilities, if that is the model you want)");
  if (!o.member.empty() && o.member != "Smoe" && o.member != "Rmoe")
    throw ConfigError::invalid("--member", o.member, "Smoe or Rmoe");
  if (!o.member.empty() && o.preset != "paper1-dual")
    throw ConfigError("--member goes with --preset paper1-dual");
  if (o.reference.empty() && !o.allow_unchecked)
    throw ConfigError(
        "import: --reference REF.pt is required (inputs and the logits the source model gives "
        "them, see "
        "docs/import.md); --allow-unchecked writes the checkpoint without that check, recorded as "
        "such");
  if (!(o.tolerance > 0))
    throw ConfigError::invalid("--tolerance", std::to_string(o.tolerance), "> 0");

  TorchFile file(o.source);
  KeyMap map;
  const std::string member = o.member.empty() ? "" : o.member + ".";
  if (!o.key_map.empty()) {
    map = json_map(o);
  }
  const std::vector<std::string> candidates =
      !o.key_map.empty()                 ? std::vector<std::string>{map.state_dict}
      : o.preset.rfind("paper1", 0) == 0 ? std::vector<std::string>{"net", ""}
                                         : std::vector<std::string>{"state_dict", ""};
  Source src = source_of(file, candidates, map.strip_prefixes, member);
  if (o.preset.rfind("paper1", 0) == 0) map = paper1_map(o, src);
  if (o.preset == "paper2-moe-cnn-resnet18") map = paper2_map(o, src);
  ModelSpec spec = map.architecture;
  set_normalisation(spec, o, src, map);
  spec.validate();
  Moe model(spec);
  const int64_t filled = fill(*model, src, map);
  model->eval();

  nlohmann::json check = {{"kind", "none"},
                          {"note", "written with --allow-unchecked: not compared with the source"}};
  if (!o.reference.empty()) {
    check = self_check(*model, o);
    check["kind"] = "reference logits";
  }
  nlohmann::json record = {
      {"source", o.source},
      {"source_sha256", sha256_file(o.source)},
      {"layout", map.name},
      {"state_dict", src.where + (member.empty() ? "" : (src.where.empty() ? "" : ".") + o.member)},
      {"tensors", filled},
      {"source_scalars", file.scalars()},
      {"check", check}};
  if (!o.key_map.empty()) {
    std::ifstream in(o.key_map);
    record["key_map"] = nlohmann::json::parse(in);
  }
  nlohmann::json manifest = {
      {"architecture", spec.to_json()}, {"training", {{"method", "imported"}}}, {"import", record}};
  if (!o.dataset.empty()) manifest["dataset"] = {{"name", o.dataset}};
  checkpoint_save(o.out, *model, manifest);
  return record;
}

}  // namespace moecert
