// Building blocks shared by the backbone files: the stem convolution's kernel
// choice, modules as graph layers, the MoE-CNN body over trunks, and LiveGraphs.
#include <torch/version.h>

#include <set>

#include "backbone-impl.h"
#include "moecert/distributed.h"

namespace moecert {
namespace {

thread_local bool live_graphs = false;

/// BatchNorm modules shared across the trunks of a MoE-CNN (paper 2's layout): while
/// one is installed, batch_norm() records every module it makes (the first trunk) or
/// hands the recorded ones out in the same order (the other trunks, built by the same
/// code, ask for the same sequence of channel counts).
struct BatchNormSharing {
  std::vector<torch::nn::BatchNorm2d> made;
  size_t next = 0;
  bool replay = false;
};
thread_local BatchNormSharing* bn_sharing = nullptr;

thread_local Collective* sync_bn_group = nullptr;

/// Σ over the ranks of a group, whose gradient is the Σ over the ranks of the
/// gradients: every rank's loss depends on every rank's summand.
class AllReduceSum : public torch::autograd::Function<AllReduceSum> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               int64_t group) {
    ctx->saved_data["group"] = group;
    std::vector<torch::Tensor> t{x.detach().clone()};
    reinterpret_cast<Collective*>(group)->all_reduce_sum(t);
    return t[0];
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* group = reinterpret_cast<Collective*>(ctx->saved_data["group"].toInt());
    std::vector<torch::Tensor> t{grads[0].contiguous().clone()};
    group->all_reduce_sum(t);
    return {t[0], torch::Tensor()};
  }
};

/// Convolution whose backward pass uses LibTorch's im2col kernels instead of
/// oneDNN's. For a stem with one to three input channels on the CPU oneDNN's
/// backward is ~2x slower than its own forward would suggest (measured: 3.3 ms
/// vs 1.5 ms for conv 1->16 at B = 128, 28x28); the forward stays on oneDNN.
/// The values are the same convolution; only the kernel choice differs.
class StemConvFunction : public torch::autograd::Function<StemConvFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w, const torch::Tensor& b, int64_t stride) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["has_bias"] = b.defined();
    return torch::conv2d(x, w, b, stride, /*padding=*/1);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t s = ctx->saved_data["stride"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [gx, gw, gb] = at::_slow_conv2d_backward(
        grads[0].contiguous(), saved[0], saved[1], /*kernel_size=*/{3, 3}, {s, s}, {1, 1},
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)});
    return {gx, gw, has_bias ? gb : torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

namespace backbones {

torch::Tensor conv3x3_apply(nn::Conv2d& conv, const torch::Tensor& x) {
  if (x.is_cpu() && x.size(1) <= 3 && conv->bias.defined() && torch::GradMode::is_enabled())
    return StemConvFunction::apply(x, conv->weight, conv->bias, conv->options.stride()->at(0));
  return conv(x);
}

torch::Tensor f64(const torch::Tensor& t) {
  if (live_graphs) return t;
  return t.defined() ? t.detach().to(torch::kFloat64).clone() : torch::Tensor();
}

Layer conv_layer(const std::string& name, const nn::Conv2d& c) {
  const auto& o = c->options;
#if TORCH_VERSION_MAJOR >= 2  // the padding variant became a std::variant
  const auto* pad = std::get_if<torch::ExpandingArray<2>>(&o.padding());
#else
  const auto* pad = c10::get_if<torch::ExpandingArray<2>>(&o.padding());
#endif
  if (!pad || (*pad)->at(0) != (*pad)->at(1) || o.stride()->at(0) != o.stride()->at(1) ||
      o.dilation()->at(0) != 1 || o.dilation()->at(1) != 1 || o.groups() != 1)
    throw UnsupportedLayerError("certify: convolution '" + name +
                                "' has an unsupported stride/padding/dilation/groups setting");
  return Layer::conv2d(name, f64(c->weight), f64(c->bias), o.stride()->at(0), (*pad)->at(0));
}

Layer linear_layer(const std::string& name, const nn::Linear& l) {
  return Layer::dense(name, f64(l->weight), f64(l->bias));
}

Layer batchnorm_layer(const std::string& name, const nn::BatchNorm2d& bn) {
  return Layer::batch_norm(name, f64(bn->weight), f64(bn->bias), f64(bn->running_mean),
                           f64(bn->running_var), bn->options.eps());
}

nn::BatchNorm2d batch_norm(int64_t channels) {
  if (!bn_sharing) return nn::BatchNorm2d(channels);
  auto& s = *bn_sharing;
  if (!s.replay) return s.made.emplace_back(channels);
  if (s.next >= s.made.size() || s.made[s.next]->options.num_features() != channels)
    throw Error(ExitCode::internal,
                "moe-cnn: the trunks of one MoE-CNN ask for different BatchNorm layers");
  return s.made[s.next++];
}

torch::Tensor bn_forward(nn::BatchNorm2d bn, const torch::Tensor& x) {
  Collective* group = sync_bn_group;
  if (!group || group->size() <= 1 || !bn->is_training()) return bn->forward(x);
  // The global batch's per-channel Σx, Σx² and count, in float64 as LibTorch's own
  // CPU BatchNorm accumulates; the biased variance normalises, the unbiased one
  // updates the running variance (as torch.nn.SyncBatchNorm).
  const int64_t C = x.size(1);
  auto xd = x.to(torch::kFloat64);
  const std::vector<int64_t> dims{0, 2, 3};
  auto local = torch::cat({xd.sum(dims), (xd * xd).sum(dims),
                           torch::full({1}, static_cast<double>(x.numel() / C), xd.options())});
  auto global = AllReduceSum::apply(local, reinterpret_cast<int64_t>(group));
  const double n = global[2 * C].item<double>();
  auto mean = global.narrow(0, 0, C) / n;
  auto var = global.narrow(0, C, C) / n - mean * mean;
  const auto& o = bn->options;
  auto y = (xd - mean.view({1, C, 1, 1})) * torch::rsqrt(var + o.eps()).view({1, C, 1, 1});
  y = y.to(x.scalar_type());
  if (o.affine()) y = y * bn->weight.view({1, C, 1, 1}) + bn->bias.view({1, C, 1, 1});
  if (o.track_running_stats()) {
    torch::NoGradGuard no_grad;
    const double m = o.momentum().value_or(0.1);
    const double unbiased = n > 1 ? n / (n - 1) : 1.0;
    bn->running_mean.mul_(1 - m).add_(mean.detach().to(bn->running_mean.scalar_type()), m);
    bn->running_var.mul_(1 - m).add_((var.detach() * unbiased).to(bn->running_var.scalar_type()),
                                     m);
    bn->num_batches_tracked.add_(1);
  }
  return y;
}

Layer avgpool2_layer(const std::string& name, int64_t channels, const torch::Tensor& like) {
  auto opts = like.options().dtype(live_graphs ? like.scalar_type() : torch::kFloat64);
  auto w =
      torch::eye(channels, opts).view({channels, channels, 1, 1}).expand({-1, -1, 2, 2}) * 0.25;
  return Layer::conv2d(name, w.contiguous(), {}, 2, 0);
}

std::vector<int64_t> family_params(const std::string& kind, const std::string& prefix) {
  if (kind.rfind(prefix, 0) != 0) return {};
  std::vector<int64_t> out;
  size_t pos = prefix.size();
  while (pos <= kind.size()) {
    const size_t dash = std::min(kind.find('-', pos), kind.size());
    const std::string part = kind.substr(pos, dash - pos);
    if (part.empty() || part.size() > 6 ||
        part.find_first_not_of("0123456789") != std::string::npos)
      return {};
    out.push_back(std::stoll(part));
    pos = dash + 1;
  }
  return out;
}

namespace {

BackboneArgs trunk_args(const BackboneArgs& a, double scale) {
  BackboneArgs t = a;
  t.outputs = 0, t.width = scale;
  return t;
}

class TrunkGroupsImpl : public ChannelGroupNetImpl {
 public:
  // The head is initialised before the trunks (the order of the random draws that
  // earlier versions used, so a seed gives the same model).
  TrunkGroupsImpl(const BackboneEntry& e, const BackboneArgs& a, int64_t n_groups, double scale,
                  bool shared_batch_norm)
      : features_(e.trunk_features(trunk_args(a, scale))),
        groups(register_module("groups", nn::ModuleList())),
        linear(register_module("linear", nn::Linear(n_groups * features_, a.outputs))) {
    BatchNormSharing sharing;
    struct Install {  // uninstalled on every exit, exceptions included
      explicit Install(BatchNormSharing* s) { bn_sharing = s; }
      ~Install() { bn_sharing = nullptr; }
    } install(shared_batch_norm ? &sharing : nullptr);
    for (int64_t g = 0; g < n_groups; ++g) {
      sharing.replay = g > 0, sharing.next = 0;
      trunks_.push_back(e.make(trunk_args(a, scale)));
      groups->push_back(trunks_.back());
      if (sharing.replay && sharing.next != sharing.made.size())
        throw Error(ExitCode::internal,
                    "moe-cnn: the trunks of one MoE-CNN have different BatchNorm layers");
    }
  }
  torch::Tensor forward_path(int64_t g, const torch::Tensor& x,
                             const torch::Tensor& gate) override {
    auto f = trunks_.at(static_cast<size_t>(g))->forward(x);
    if (gate.defined()) f = f * gate.view({-1, 1});
    return torch::linear(f, linear->weight.narrow(1, g * features_, features_), linear->bias);
  }
  LayerGraph path_graph(int64_t g) override {
    auto graph = trunks_.at(static_cast<size_t>(g))->graph();  // ends with the pooled features
    graph.add(Layer::dense("linear[group " + std::to_string(g) + "]",
                           f64(linear->weight.narrow(1, g * features_, features_)),
                           f64(linear->bias)));
    return graph;
  }

 private:
  int64_t features_ = 0;
  std::vector<std::shared_ptr<BackboneImpl>> trunks_;

 public:
  nn::ModuleList groups;
  nn::Linear linear;
};

}  // namespace

std::shared_ptr<ChannelGroupNetImpl> trunk_groups_make(const BackboneEntry& e,
                                                       const BackboneArgs& a, int64_t groups,
                                                       double scale, bool shared_batch_norm) {
  return std::make_shared<TrunkGroupsImpl>(e, a, groups, scale, shared_batch_norm);
}

BackboneCost trunk_groups_cost(const BackboneEntry& e, const BackboneArgs& a, int64_t groups,
                               double scale) {
  BackboneArgs t = a;
  t.outputs = 0, t.width = scale;
  const auto trunk = e.cost(t);
  const double n = static_cast<double>(groups), k = static_cast<double>(a.outputs);
  const double f = static_cast<double>(e.trunk_features(t));
  return {n * trunk.parameters + n * f * k + k, trunk.activations + k};
}

}  // namespace backbones

std::vector<torch::Tensor> unique_tensors(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> out;
  std::set<const void*> seen;
  for (const auto& p : params)
    if (seen.insert(p.unsafeGetTensorImpl()).second) out.push_back(p);
  return out;
}

int64_t module_parameter_count(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : unique_tensors(module.parameters())) n += p.numel();
  return n;
}

LiveGraphs::LiveGraphs() : previous_(live_graphs) { live_graphs = true; }
LiveGraphs::~LiveGraphs() { live_graphs = previous_; }
bool LiveGraphs::active() { return live_graphs; }

SyncBatchNormScope::SyncBatchNormScope(Collective* group) : previous_(sync_bn_group) {
  sync_bn_group = group;
}
SyncBatchNormScope::~SyncBatchNormScope() { sync_bn_group = previous_; }
Collective* SyncBatchNormScope::active() { return sync_bn_group; }

}  // namespace moecert
