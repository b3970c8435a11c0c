// Batched MoE dispatch (SPEC §1). The batch is grouped by expert; each selected
// expert runs once on its group; the results are scattered back by the inverse
// permutation. No per-sample loop, and an unselected expert is never computed.
#include <torch/torch.h>

#include <cmath>
#include <type_traits>

#include "moecert/backbones.h"
#include "moecert/distributed.h"
#include "moecert/error.h"
#include "moecert/limits.h"
#include "moecert/models.h"

namespace moecert {

namespace {
const char* routing_name(Routing r) { return r == Routing::soft ? "soft" : "top-k"; }

/// Expert i of a MoE-CNN: the path through channel group i of the shared body.
/// Holds no parameters of its own (they are registered once, under "body").
class ChannelGroupPathImpl : public BackboneImpl {
 public:
  ChannelGroupPathImpl(ChannelGroupNetImpl* body, int64_t group) : body_(body), group_(group) {}
  torch::Tensor forward(torch::Tensor x) override { return body_->forward_path(group_, x); }
  int64_t group() const { return group_; }
  LayerGraph graph() override { return body_->path_graph(group_); }

 private:
  ChannelGroupNetImpl* body_;
  int64_t group_;
};
constexpr const char* kGraph = "graph";

/// A graph component's cost, after checking that it reads [C, H, W] images and gives
/// `outputs` values.
BackboneCost graph_component_check(const nlohmann::json& structure, const std::string& where,
                                   const std::vector<int64_t>& image, int64_t outputs) {
  const auto info = graph_structure_check(structure, where);
  if (info.input_shape != image)
    throw ConfigError(where + ": reads inputs of shape " + shape_str(info.input_shape) +
                      ", the model's images are " + shape_str(image));
  if (info.output_shape != std::vector<int64_t>{outputs})
    throw ConfigError(where + ": gives outputs of shape " + shape_str(info.output_shape) + ", " +
                      std::to_string(outputs) + " values expected");
  return info.cost;
}

}  // namespace

RouterGradient router_gradient_parse(const std::string& s) {
  if (s == "top2") return RouterGradient::top2;
  if (s == "straight-through") return RouterGradient::straight_through;
  throw ConfigError::invalid("--router-train", s, "top2 | straight-through | none");
}

nlohmann::json ModelSpec::to_json() const {
  nlohmann::json j = {{"kind", kind},
                      {"scale", scale},
                      {"in_channels", in_channels},
                      {"height", height},
                      {"width", width},
                      {"num_classes", num_classes},
                      {"experts", experts},
                      {"expert", expert},
                      {"router", router},
                      {"routing", routing_name(routing)},
                      {"top_k", top_k},
                      {"mean", mean},
                      {"std", std}};
  if (!graphs.is_null()) j["graphs"] = graphs;
  if (kind == "moe-cnn") j["batch_norm"] = shared_batch_norm ? "shared" : "per-group";
  return j;
}

ModelSpec ModelSpec::from_json(const nlohmann::json& j) {
  ModelSpec s;
  if (!j.is_object())
    throw ConfigError("architecture: must be an object, got " + std::string(j.type_name()));
  auto field = [&](const char* name, auto& out) {
    if (!j.contains(name))
      throw ConfigError("architecture: missing field '" + std::string(name) + "'");
    // An integer field takes integers only: a float such as 1e300 has no int64 value.
    if constexpr (std::is_same_v<std::decay_t<decltype(out)>, int64_t>)
      if (!j.at(name).is_number_integer() ||
          (j.at(name).is_number_unsigned() && j.at(name).get<uint64_t>() > uint64_t(INT64_MAX)))
        throw ConfigError("architecture: field '" + std::string(name) +
                          "' must be an integer, got " + j.at(name).dump().substr(0, 40));
    try {
      j.at(name).get_to(out);
    } catch (const nlohmann::json::exception& e) {
      throw ConfigError("architecture: field '" + std::string(name) + "' has the wrong type (" +
                        e.what() + ")");
    }
  };
  std::string routing;
  // Checkpoints written before MoE-CNN existed carry no kind: they are model-level MoEs.
  if (j.contains("kind")) field("kind", s.kind);
  if (j.contains("scale")) field("scale", s.scale);
  field("in_channels", s.in_channels);
  field("height", s.height);
  field("width", s.width);
  field("num_classes", s.num_classes);
  field("experts", s.experts);
  field("expert", s.expert);
  field("router", s.router);
  field("routing", routing);
  field("top_k", s.top_k);
  field("mean", s.mean);
  field("std", s.std);
  if (j.contains("graphs")) s.graphs = j.at("graphs");
  if (j.contains("batch_norm")) {
    std::string bn;
    field("batch_norm", bn);
    if (bn != "shared" && bn != "per-group")
      throw ConfigError::invalid("architecture.batch_norm", bn, "shared | per-group");
    s.shared_batch_norm = bn == "shared";
  }
  if (routing == "soft")
    s.routing = Routing::soft;
  else if (routing == "top-k")
    s.routing = Routing::top_k;
  else
    throw ConfigError::invalid("architecture.routing", routing, "soft | top-k");
  s.validate();
  return s;
}

void ModelSpec::validate() const {
  limits::check_range("in_channels", in_channels, 1, limits::max_channels);
  limits::check_range("height", height, 1, limits::max_side);
  limits::check_range("width", width, 1, limits::max_side);
  limits::check_range("experts", experts, 1, limits::max_experts);
  limits::check_range("num_classes", num_classes, 2, limits::max_classes);
  BackboneArgs a;
  a.in_channels = in_channels, a.height = height, a.width_px = width, a.outputs = num_classes;
  a.kind = expert;
  if (expert == kGraph) {
    if (kind != "moe") throw ConfigError("architecture: graph experts need kind moe");
    const auto& list =
        graphs.is_object() && graphs.contains("experts") ? graphs.at("experts") : nlohmann::json();
    if (!list.is_array() || static_cast<int64_t>(list.size()) != experts)
      throw ConfigError(
          "architecture: expert \"graph\" needs graphs.experts, one structure per "
          "expert (" +
          std::to_string(experts) + "), as `moecert import` writes");
    for (size_t i = 0; i < list.size(); ++i)
      graph_component_check(list[i], "architecture.graphs.experts[" + std::to_string(i) + "]",
                            {in_channels, height, width}, num_classes);
  } else {
    backbone_find(a, kind == "moe-cnn" ? BackboneRole::channel_groups : BackboneRole::expert,
                  "--expert");
  }
  a.kind = router, a.outputs = experts;
  if (experts > 1 && router == kGraph) {
    if (!graphs.is_object() || !graphs.contains("router"))
      throw ConfigError(
          "architecture: router \"graph\" needs graphs.router, as `moecert import` writes");
    graph_component_check(graphs.at("router"), "architecture.graphs.router",
                          {in_channels, height, width}, experts);
  } else if (experts > 1) {
    backbone_find(a, BackboneRole::router, "--router");
  }
  if (routing == Routing::top_k && (top_k < 1 || top_k > experts))
    throw ConfigError::invalid("--top-k", std::to_string(top_k),
                               "1 <= k <= experts (" + std::to_string(experts) + ")");
  if (static_cast<int64_t>(mean.size()) != in_channels ||
      static_cast<int64_t>(std.size()) != in_channels)
    throw ConfigError("architecture: mean/std need one value per input channel (" +
                      std::to_string(in_channels) + ")");
  for (double s : std)
    if (!(s > 0 && std::isfinite(s)))
      throw ConfigError::invalid("std", std::to_string(s), "a positive number");
  for (double m : mean)
    if (!std::isfinite(m)) throw ConfigError::invalid("mean", std::to_string(m), "a finite number");
  if (kind != "moe" && kind != "moe-cnn")
    throw ConfigError::invalid("--arch", kind, "moe | moe-cnn");
  if (shared_batch_norm && kind != "moe-cnn")
    throw ConfigError("architecture: batch_norm \"shared\" is a moe-cnn layout (kind is " + kind +
                      ")");
  if (kind == "moe-cnn") {
    if (experts < 2)
      throw ConfigError::invalid("--experts", std::to_string(experts),
                                 ">= 2 channel groups for --arch moe-cnn (the dense baseline is "
                                 "--arch moe --experts 1)");
    if (routing != Routing::top_k || top_k != 1)
      throw ConfigError(
          "--arch moe-cnn routes top-1 (one channel group per sample): use "
          "--routing top-k --top-k 1");
    // Every layer keeps at least one channel (round(r·C) >= 1 is enforced per layer).
    if (!(scale >= 1.0 / 64 && scale <= 1))
      throw ConfigError::invalid("--scale", std::to_string(scale), "in [1/64, 1]");
  }
}

BackboneCost ModelSpec::cost() const {
  if (kind == "moe-cnn") {
    auto c = channel_group_cost(expert, in_channels, height, width, num_classes, experts, scale);
    const auto r = backbone_cost(router, in_channels, height, width, experts);
    return {c.parameters + r.parameters, c.activations + r.activations};
  }
  const std::vector<int64_t> image{in_channels, height, width};
  BackboneCost e;
  if (expert == kGraph) {  // validated: one structure per expert; the largest counts
    for (size_t i = 0; i < graphs.at("experts").size(); ++i) {
      const auto g = graph_component_check(graphs.at("experts")[i], "architecture.graphs.experts",
                                           image, num_classes);
      e.parameters = std::max(e.parameters, g.parameters);
      e.activations = std::max(e.activations, g.activations);
    }
  } else {
    e = backbone_cost(expert, in_channels, height, width, num_classes);
  }
  BackboneCost c{static_cast<double>(experts) * e.parameters, e.activations};
  if (experts > 1) {
    const auto r = router == kGraph
                       ? graph_component_check(graphs.at("router"), "architecture.graphs.router",
                                               image, experts)
                       : backbone_cost(router, in_channels, height, width, experts);
    const double used =
        routing == Routing::soft ? static_cast<double>(experts) : static_cast<double>(top_k);
    c.parameters += r.parameters;
    c.activations = r.activations + used * e.activations;
  }
  return c;
}

void ModelSpec::check_memory(int64_t batch, const std::string& batch_option) const {
  const auto c = cost();
  const std::string shape =
      std::to_string(in_channels) + "x" + std::to_string(height) + "x" + std::to_string(width);
  limits::check_memory(
      "the model (" + std::to_string(static_cast<int64_t>(c.parameters)) + " parameters)",
      "architecture", std::to_string(experts) + " " + expert + " experts on " + shape + " inputs",
      16.0 * c.parameters);
  if (batch > 0)
    limits::check_memory("a batch through the model", batch_option, std::to_string(batch),
                         16.0 * c.parameters + 16.0 * static_cast<double>(batch) * c.activations);
}

MoeImpl::MoeImpl(ModelSpec spec) : spec_(std::move(spec)) {
  spec_.validate();
  spec_.check_memory();
  auto channel_buffer = [&](const std::vector<double>& v) {
    return torch::tensor(v, torch::kFloat32).view({1, spec_.in_channels, 1, 1});
  };
  mean_ = register_buffer("mean", channel_buffer(spec_.mean));
  std_ = register_buffer("std", channel_buffer(spec_.std));
  if (spec_.experts > 1)
    router_ = register_module(
        "router", spec_.router == kGraph
                      ? graph_net_make(spec_.graphs.at("router"), "architecture.graphs.router")
                      : backbone_make(spec_.router, spec_.in_channels, spec_.height, spec_.width,
                                      spec_.experts));
  if (spec_.kind == "moe-cnn") {
    body_ =
        register_module("body", channel_group_make(spec_.expert, spec_.in_channels, spec_.height,
                                                   spec_.width, spec_.num_classes, spec_.experts,
                                                   spec_.scale, spec_.shared_batch_norm));
    for (int64_t i = 0; i < spec_.experts; ++i)
      experts_.push_back(std::make_shared<ChannelGroupPathImpl>(body_.get(), i));
    return;
  }
  experts_list_ = register_module("experts", torch::nn::ModuleList());
  for (int64_t i = 0; i < spec_.experts; ++i) {
    experts_.push_back(
        spec_.expert == kGraph
            ? graph_net_make(spec_.graphs.at("experts")[static_cast<size_t>(i)],
                             "architecture.graphs.experts[" + std::to_string(i) + "]")
            : backbone_make(spec_.expert, spec_.in_channels, spec_.height, spec_.width,
                            spec_.num_classes));
    experts_list_->push_back(experts_.back());
  }
}

std::vector<torch::Tensor> MoeImpl::router_parameters() {
  return router_ ? router_->parameters() : std::vector<torch::Tensor>{};
}

std::vector<torch::Tensor> MoeImpl::expert_parameters() {
  if (body_) return unique_tensors(body_->parameters());
  return experts_list_->parameters();
}

void MoeImpl::check_input(const torch::Tensor& x, const char* what) const {
  if (x.dim() != 4 || x.size(1) != spec_.in_channels || x.size(2) != spec_.height ||
      x.size(3) != spec_.width)
    throw ShapeError::unexpected(std::string("model input (") + what + ")",
                                 "[B, " + std::to_string(spec_.in_channels) + ", " +
                                     std::to_string(spec_.height) + ", " +
                                     std::to_string(spec_.width) + "]",
                                 x.sizes().vec());
}

LayerGraph MoeImpl::component_graph(int64_t expert) {
  BackboneImpl* net = expert < 0 ? router_.get() : experts_.at(static_cast<size_t>(expert)).get();
  if (!net) throw ConfigError("model has a single expert: there is no router");
  LayerGraph g;
  auto mean = mean_.flatten(), sd = std_.flatten();
  if (!LiveGraphs::active())
    mean = mean.detach().to(torch::kFloat64), sd = sd.detach().to(torch::kFloat64);
  g.add(Layer::affine("normalise", 1.0 / sd, -mean / sd));
  g.append(net->graph());
  return g;
}

torch::Tensor MoeImpl::normalise(const torch::Tensor& x) const { return (x - mean_) / std_; }

torch::Tensor MoeImpl::router_logits(const torch::Tensor& x) {
  check_input(x, "router");
  if (!router_) throw ConfigError("model has a single expert: there is no router");
  return router_->forward(normalise(x));
}

torch::Tensor MoeImpl::expert_logits(int64_t i, const torch::Tensor& x) {
  check_input(x, "expert");
  return experts_.at(static_cast<size_t>(i))->forward(normalise(x));
}

bool MoeImpl::top2_router_gradient() const {
  if (router_gradient_ != RouterGradient::top2 || !torch::GradMode::is_enabled() || !router_ ||
      spec_.routing != Routing::top_k || spec_.top_k != 1 || spec_.experts < 2)
    return false;
  if (attack_relaxation_) return true;
  if (!is_training()) return false;
  for (const auto& p : router_->parameters())
    if (p.requires_grad()) return true;
  return false;
}

MoeRouting MoeImpl::route(const torch::Tensor& x) {
  const int64_t B = x.size(0), E = spec_.experts;
  MoeRouting r;
  if (E == 1) {
    r.selected =
        torch::zeros({B, 1}, torch::TensorOptions().dtype(torch::kLong).device(x.device()));
    r.log_w = torch::zeros({B, 1}, x.options());
    return r;
  }
  r.logits = router_logits(x);
  if (spec_.routing == Routing::soft) {
    r.selected = torch::arange(E, torch::TensorOptions().dtype(torch::kLong).device(x.device()))
                     .expand({B, E});
    r.log_w = torch::log_softmax(r.logits, /*dim=*/1);
  } else if (top2_router_gradient()) {
    // The router's gradient comes from the top-2 mixture in forward_parts; the
    // selected expert's weight is exactly 1 and carries none.
    r.selected = std::get<1>(r.logits.max(/*dim=*/1, /*keepdim=*/true));
    r.log_w = torch::zeros({B, 1}, x.options());
  } else if (spec_.kind == "moe-cnn") {
    // AdvMoE's channel mask: the selected group's features are multiplied by a gate
    // that is 1 in value and carries the gradient of the router probability, so the
    // router learns whether scaling that path up or down lowers the loss.
    r.selected = std::get<1>(r.logits.max(/*dim=*/1, /*keepdim=*/true));
    auto a_sel = torch::softmax(r.logits, /*dim=*/1).gather(1, r.selected);
    r.gate = 1.0 + (a_sel - a_sel.detach());
    r.log_w = torch::zeros_like(a_sel);
  } else if (spec_.top_k == 1) {
    r.selected = std::get<1>(r.logits.max(/*dim=*/1, /*keepdim=*/true));
    // Straight-through: the weight is exactly 1 in the forward pass, but its
    // gradient is that of a_sel = softmax(g)_sel (d log w = d w at w = 1).
    auto a_sel = torch::softmax(r.logits, /*dim=*/1).gather(1, r.selected);
    r.log_w = a_sel - a_sel.detach();
  } else {
    r.selected = std::get<1>(r.logits.topk(spec_.top_k, /*dim=*/1));
    r.log_w = torch::log_softmax(r.logits.gather(1, r.selected), /*dim=*/1);
  }
  return r;
}

torch::Tensor MoeImpl::dispatch(const torch::Tensor& xn, const torch::Tensor& selected,
                                const torch::Tensor& gate) {
  const int64_t B = xn.size(0), k = selected.size(1), E = spec_.experts;
  if (k == E && (E == 1 || spec_.routing == Routing::soft)) {
    // Every expert sees every sample, in index order: no grouping needed.
    std::vector<torch::Tensor> outs;
    for (auto& e : experts_) outs.push_back(torch::log_softmax(e->forward(xn), /*dim=*/1));
    return torch::stack(outs, /*dim=*/1);
  }
  auto flat = selected.reshape({-1});  // [B*k]
  auto order = std::get<1>(flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto counts = torch::bincount(flat, /*weights=*/{}, /*minlength=*/E).cpu();
  // Under --sync-bn every rank must run the same experts (each BatchNorm is a
  // collective): an expert runs, on an empty batch where this rank routed nothing to
  // it, when any rank routed a sample to it.
  auto runs = counts;
  if (Collective* group = SyncBatchNormScope::active();
      group && group->size() > 1 && is_training()) {  // as bn_forward: one rank is plain BN
    std::vector<torch::Tensor> t{counts.clone()};
    group->all_reduce_sum(t);
    runs = t[0];
  }
  auto samples = torch::div(order, k, /*rounding_mode=*/"floor");  // row of each entry
  std::vector<torch::Tensor> parts;
  int64_t offset = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = counts[e].item<int64_t>();
    if (runs[e].item<int64_t>() == 0) continue;
    auto rows = samples.narrow(0, offset, n);
    auto group = xn.index_select(0, rows);
    auto logits = body_ && gate.defined()
                      ? body_->forward_path(e, group, gate.reshape({-1}).index_select(0, rows))
                      : experts_[static_cast<size_t>(e)]->forward(group);
    parts.push_back(torch::log_softmax(logits, 1));
    offset += n;
  }
  auto sorted = torch::cat(parts, /*dim=*/0);  // [B*k, classes]
  auto inverse = torch::empty_like(order);
  inverse.scatter_(0, order, torch::arange(B * k, order.options()));
  return sorted.index_select(0, inverse).view({B, k, -1});
}

MoeOutput MoeImpl::forward_parts(const torch::Tensor& x_router, const torch::Tensor& x_experts,
                                 const MoeRouting* fixed) {
  check_input(x_experts, "experts");
  MoeOutput out;
  out.routing = fixed ? *fixed : route(x_router);
  if (out.routing.selected.size(0) != x_experts.size(0))
    throw ShapeError::unexpected("routing", "one row per sample",
                                 out.routing.selected.sizes().vec());
  auto xn = normalise(x_experts);
  auto lsm = dispatch(xn, out.routing.selected, out.routing.gate);  // [B, k, C]
  if (lsm.size(1) == 1) {
    out.log_probs = lsm.select(1, 0) + out.routing.log_w;  // log w + log f
    if (!fixed && top2_router_gradient()) {
      // Router gradient of the renormalised top-2 mixture with the experts' outputs
      // held constant (docs/training.md): log F2 = logsumexp_j(log ã_j + log f_j),
      // ã = softmax over the two best router logits. Added as log F2 − log F2 (value
      // 0), so the output stays the selected expert's and the experts' gradients stay
      // those of the top-1 path.
      auto best2 = out.routing.logits.topk(2, /*dim=*/1);
      torch::Tensor lsm2;
      {
        torch::NoGradGuard no_grad;
        lsm2 = dispatch(xn, std::get<1>(best2).narrow(1, 1, 1), {}).select(1, 0);
      }
      auto log_a = torch::log_softmax(std::get<0>(best2), /*dim=*/1);  // [B, 2]
      auto pair = torch::stack({lsm.select(1, 0).detach(), lsm2}, /*dim=*/1);
      auto mix = torch::logsumexp(pair + log_a.unsqueeze(-1), /*dim=*/1);  // [B, C]
      out.log_probs = out.log_probs + (mix - mix.detach());
    }
  } else {
    // log F = logsumexp_i(log a_i + log_softmax(h_i)): stable for tiny weights.
    out.log_probs = torch::logsumexp(lsm + out.routing.log_w.unsqueeze(-1), /*dim=*/1);
  }
  return out;
}

torch::Tensor moe_reference_probs(MoeImpl& model, const torch::Tensor& x) {
  const auto& spec = model.spec();
  std::vector<torch::Tensor> rows;
  for (int64_t b = 0; b < x.size(0); ++b) {
    auto xb = x.narrow(0, b, 1);
    if (spec.experts == 1) {
      rows.push_back(torch::softmax(model.expert_logits(0, xb), 1));
      continue;
    }
    auto g = model.router_logits(xb)[0];
    torch::Tensor sel = spec.routing == Routing::soft ? torch::arange(spec.experts)
                                                      : std::get<1>(g.topk(spec.top_k));
    auto a = torch::softmax(g.index_select(0, sel), 0);
    auto F = torch::zeros({1, spec.num_classes});
    for (int64_t j = 0; j < sel.size(0); ++j)
      F = F + a[j] * torch::softmax(model.expert_logits(sel[j].item<int64_t>(), xb), 1);
    rows.push_back(F);
  }
  return torch::cat(rows, 0);
}

}  // namespace moecert
