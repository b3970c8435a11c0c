// Mixture-of-Experts models (SPEC §1). kind "moe" (paper 1): normalisation -> router
// g -> top-k or soft gate -> experts h_i -> F(x) = Σ_i a_i(x) softmax(h_i(x)); E = 1
// is the dense baseline (no router). kind "moe-cnn" (paper 2, AdvMoE): one backbone
// whose conv layers hold N channel groups of width scale·C_out; the router's top-1
// choice picks the group of every layer, so "expert" i is the path through group i
// (paths share the head). All maps take x: [B, C, H, W] with pixels in [0, 1].
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moecert/graph.h"

namespace moecert {

/// How the router's weights pick experts.
enum class Routing { soft, top_k };

/// The router's gradient under top-1 routing in training mode (docs/training.md
/// "Router gradient"). The forward value is the same for both: the selected expert's
/// output with weight 1.
enum class RouterGradient {
  /// The weight's gradient is that of a_sel = softmax(g)_sel (AdvMoE's channel mask
  /// for moe-cnn). For CE it always raises a_sel: collapse is its fixed point.
  straight_through,
  /// The gradient of the renormalised top-2 mixture log(ã1 f1 + ã2 f2) with the
  /// experts' outputs held constant: raises the router logit of whichever of the two
  /// best-ranked experts gives the better loss. Costs one forward of the
  /// second-ranked expert per training sample, without gradients.
  top2,
};
/// "straight-through" | "top2" -> RouterGradient; ConfigError otherwise.
RouterGradient router_gradient_parse(const std::string& s);

/// What a model or backbone costs, computed from its shape alone (before anything is
/// built): its parameters, and the float32 values its forward pass keeps per sample.
struct BackboneCost {
  double parameters = 0, activations = 0;
};

/// Everything needed to rebuild a model; stored as "architecture" in model.json.
struct ModelSpec {
  std::string kind = "moe";  ///< moe (model-level) | moe-cnn (channel groups)
  double scale = 0.5;        ///< moe-cnn: group width r as a share of C_out
  /// moe-cnn over trunks: one BatchNorm per layer shared by every channel group (paper
  /// 2's layout: γ, β and the running statistics are the same for all groups; in training
  /// each path normalises its own samples with their batch statistics). false: each
  /// group has its own (checkpoints written before the field existed).
  bool shared_batch_norm = false;
  int64_t in_channels = 1, height = 28, width = 28, num_classes = 10;
  int64_t experts = 4;            ///< E (moe-cnn: N groups); 1 = dense, no router
  std::string expert = "cnn-s";   ///< a registered backbone, or "graph" (graphs)
  std::string router = "linear";  ///< a registered router, or "graph" (graphs)
  Routing routing = Routing::top_k;
  int64_t top_k = 1;                        ///< k of top-k routing (1 <= k <= E)
  std::vector<double> mean{0.5}, std{0.5};  ///< input normalisation, per channel
  /// Graph components (expert and/or router "graph", written by `moecert import`):
  /// {"experts": [structure per expert], "router": structure}; see graph_structure.
  nlohmann::json graphs;

  nlohmann::json to_json() const;
  /// Parses and validates; throws ConfigError naming the bad field.
  static ModelSpec from_json(const nlohmann::json& j);
  /// Throws ConfigError if fields are inconsistent (k > E, unknown kinds, ...) or
  /// outside their limits (include/moecert/limits.h).
  void validate() const;
  /// The model's parameters (router and every expert) and per-sample activations
  /// (router and the experts one sample runs through).
  BackboneCost cost() const;
  /// Refuses (ConfigError, exit 2) a model whose parameters, with their gradients and
  /// optimizer state (16 bytes each), or a batch of `batch` samples through it (16
  /// bytes per activation) exceed limits::memory_budget(). `batch_option` names the
  /// option that set the batch size.
  void check_memory(int64_t batch = 0, const std::string& batch_option = "--batch-size") const;
};

/// While one is alive (on this thread), graph(), path_graph() and component_graph()
/// build layers that alias the live parameters and buffers (their dtype, autograd
/// on) instead of float64 copies: the graphs certified training differentiates
/// through (include/moecert/train_bounds.h). BatchNorm enters with its running
/// statistics (its eval-mode map) either way.
class LiveGraphs {
 public:
  LiveGraphs();
  ~LiveGraphs();
  LiveGraphs(const LiveGraphs&) = delete;
  LiveGraphs& operator=(const LiveGraphs&) = delete;
  static bool active();

 private:
  bool previous_;
};

/// A logit map x [B, C, H, W] (already normalised) -> logits [B, K].
class BackboneImpl : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(torch::Tensor x) = 0;
  /// Its layer graph in float64 (eval mode: BatchNorm as a per-channel affine map),
  /// or on the live parameters under LiveGraphs.
  virtual LayerGraph graph() = 0;
};

/// Builds an expert backbone (`cnn-s`, `resnet18`) or router (`linear`, `cnn`)
/// with `outputs` logits. Throws ConfigError for an unknown kind.
std::shared_ptr<BackboneImpl> backbone_make(const std::string& kind, int64_t in_channels,
                                            int64_t height, int64_t width, int64_t outputs);

/// MoE-CNN body (AdvMoE): the parameters of the N channel-group paths of one
/// backbone. Path g runs group g of every MoE conv layer (width round(scale·C_out))
/// and the column block g of the shared head: the dense network of width N·r·C with
/// every other channel zero, computed without those channels.
class ChannelGroupNetImpl : public torch::nn::Module {
 public:
  /// Logits of path `group`. x: [B, C, H, W] (already normalised) -> [B, K]. A
  /// defined `gate` [B] multiplies the path's features before the shared head: the
  /// straight-through channel mask of AdvMoE (value 1, gradient to the router).
  virtual torch::Tensor forward_path(int64_t group, const torch::Tensor& x,
                                     const torch::Tensor& gate = {}) = 0;
  /// Layer graph of path `group` (float64).
  virtual LayerGraph path_graph(int64_t group) = 0;
};

/// Builds the MoE-CNN body of backbone `kind` (cnn-s | resnet18). Throws ConfigError.
std::shared_ptr<ChannelGroupNetImpl> channel_group_make(const std::string& kind,
                                                        int64_t in_channels, int64_t height,
                                                        int64_t width, int64_t outputs,
                                                        int64_t groups, double scale,
                                                        bool shared_batch_norm = false);

/// The routing of a batch: which experts each sample uses and with what weight.
struct MoeRouting {
  torch::Tensor logits;    ///< [B, E] router logits g(x) (undefined for E = 1)
  torch::Tensor selected;  ///< [B, k] int64 expert indices (soft: k = E, 0..E-1)
  torch::Tensor log_w;     ///< [B, k] log routing weights of the selected experts
  /// moe-cnn only: [B, 1] straight-through channel gate of the selected group, equal
  /// to 1 in value with the gradient of its router probability (undefined otherwise).
  torch::Tensor gate;
};

/// Output of one MoE evaluation.
struct MoeOutput {
  torch::Tensor log_probs;  ///< [B, C] log F(x), computed stably
  MoeRouting routing;
};

class MoeImpl : public torch::nn::Module {
 public:
  explicit MoeImpl(ModelSpec spec);

  /// log F(x). x: [B, C, H, W] in [0, 1] -> [B, C]
  torch::Tensor forward(const torch::Tensor& x) { return forward_full(x).log_probs; }
  /// log F(x) together with the routing that produced it.
  MoeOutput forward_full(const torch::Tensor& x) { return forward_parts(x, x, nullptr); }
  /// The general form behind the component attacks: the router sees `x_router`,
  /// the experts see `x_experts`; with `fixed` the router is bypassed and the
  /// given routing is used (RA-E). Both inputs: [B, C, H, W] in [0, 1].
  MoeOutput forward_parts(const torch::Tensor& x_router, const torch::Tensor& x_experts,
                          const MoeRouting* fixed);
  /// Routing of a batch. x: [B, C, H, W] in [0, 1]
  MoeRouting route(const torch::Tensor& x);
  /// Expert i's logits h_i(x). x: [B, C, H, W] in [0, 1] -> [B, C]
  torch::Tensor expert_logits(int64_t i, const torch::Tensor& x);
  /// Router logits g(x). x: [B, C, H, W] in [0, 1] -> [B, E]
  torch::Tensor router_logits(const torch::Tensor& x);

  const ModelSpec& spec() const { return spec_; }
  /// Used by top-1 forwards in training mode with grad mode on and a trainable router;
  /// evaluation and attacks (eval mode) always use the straight-through weight.
  void set_router_gradient(RouterGradient g) { router_gradient_ = g; }
  RouterGradient router_gradient() const { return router_gradient_; }
  /// Training attacks: while on (and the router gradient is top2), forwards use the
  /// top-2 mixture's gradient in eval mode too, so that the attack's input gradient
  /// sees which of the two best-ranked experts is worse for the label.
  void set_attack_relaxation(bool on) { attack_relaxation_ = on; }
  int64_t num_experts() const { return spec_.experts; }
  BackboneImpl& expert(int64_t i) { return *experts_[static_cast<size_t>(i)]; }
  BackboneImpl* router() { return router_.get(); }
  /// moe-cnn: the channel-group body (nullptr for kind moe).
  ChannelGroupNetImpl* channel_groups() { return body_.get(); }
  /// Parameters of the router / of everything else (experts or channel-group body).
  std::vector<torch::Tensor> router_parameters();
  std::vector<torch::Tensor> expert_parameters();
  /// The graph of a component's logit map from raw pixels: input normalisation,
  /// then the router (`expert` = -1) or expert `expert`. Float64 weights.
  LayerGraph component_graph(int64_t expert);
  /// (x - mean) / std per channel. [B, C, H, W] -> [B, C, H, W]
  torch::Tensor normalise(const torch::Tensor& x) const;

 private:
  /// Runs each selected expert once on its group of samples and scatters back.
  /// xn: [B, C, H, W] normalised; selected: [B, k] -> log-softmax [B, k, classes]
  torch::Tensor dispatch(const torch::Tensor& xn, const torch::Tensor& selected,
                         const torch::Tensor& gate);
  void check_input(const torch::Tensor& x, const char* what) const;
  /// Whether this forward gives the router the top-2 mixture's gradient.
  bool top2_router_gradient() const;

  ModelSpec spec_;
  RouterGradient router_gradient_ = RouterGradient::top2;
  bool attack_relaxation_ = false;
  torch::Tensor mean_, std_;  // buffers [1, C, 1, 1]
  std::shared_ptr<BackboneImpl> router_;
  std::shared_ptr<ChannelGroupNetImpl> body_;  // moe-cnn only
  torch::nn::ModuleList experts_list_{nullptr};
  std::vector<std::shared_ptr<BackboneImpl>> experts_;
};
TORCH_MODULE(Moe);

/// Reference evaluation with a per-sample loop (tests and benchmark only):
/// exactly the SPEC formula, in probability space. -> F(x) [B, C]
torch::Tensor moe_reference_probs(MoeImpl& model, const torch::Tensor& x);

/// Number of parameters of a module (a module shared by several parents counted once).
int64_t module_parameter_count(const torch::nn::Module& module);
/// `params` without repeats of the same tensor, first occurrence kept: a module shared
/// by several parents (a MoE-CNN's shared BatchNorm) appears once per parent in
/// Module::parameters(), and an optimizer must step it once.
std::vector<torch::Tensor> unique_tensors(const std::vector<torch::Tensor>& params);
/// Graph components (expert / router kind "graph", ModelSpec::graphs): the structure of
/// a layer graph as JSON — operators, their inputs and geometry, tensor shapes; no
/// values. Written by `moecert import` (ONNX files, other codes' state dicts).
/// Throws UnsupportedLayerError for a gate layer (Jacobian graphs only).
nlohmann::json graph_structure(const LayerGraph& g, const std::vector<int64_t>& input_shape);
/// What a structure describes, checked without allocating its tensors.
struct GraphInfo {
  std::vector<int64_t> input_shape, output_shape;  ///< without the batch dimension
  BackboneCost cost;
};
/// Checks a structure: known operators, tensors of the right ranks, inputs that are
/// earlier nodes, a size within the memory budget, shapes that fit. Throws ConfigError
/// naming `where` and the node.
GraphInfo graph_structure_check(const nlohmann::json& structure, const std::string& where);
/// A component evaluating the structure's operators with float32 parameters
/// "n<node>_<tensor>" (zeros until loaded or filled); its graph() is the same graph
/// in float64. Throws as graph_structure_check.
std::shared_ptr<BackboneImpl> graph_net_make(const nlohmann::json& structure,
                                             const std::string& where);
/// Copies a graph of the component's structure (float64 values) into its parameters,
/// rounded to float32. ConfigError when `net` is not a graph component or shapes differ.
void graph_net_fill(BackboneImpl& net, const LayerGraph& values);

/// The cost of backbone_make(kind, c, h, w, outputs). Throws ConfigError for an unknown kind.
BackboneCost backbone_cost(const std::string& kind, int64_t c, int64_t h, int64_t w,
                           int64_t outputs);
/// The cost of channel_group_make(...) (all groups' parameters; one path's activations;
/// shared BatchNorm counted once per group, an upper bound).
BackboneCost channel_group_cost(const std::string& kind, int64_t c, int64_t h, int64_t w,
                                int64_t outputs, int64_t groups, double scale);

}  // namespace moecert
