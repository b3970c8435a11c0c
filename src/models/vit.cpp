// Vision Transformer (Dosovitskiy et al. 2021; paper 1's ViT-small): a p x p patch
// embedding (conv, stride p), a class token and a learned position embedding, `depth`
// pre-norm blocks x + attn(norm1(x)), x + mlp(norm2(x)) with multi-head self-attention
// and a GELU MLP of 4·dim, then LayerNorm of the class token and a linear head.
// `vit-small` = depth 12, dim 384, 6 heads; `vit-<depth>-<dim>-<heads>` any size;
// `-p<k>` sets the patch (default: 16 on inputs of 224 and more, else the smallest
// divisor of the side that is at least side/8 — 4 on 28 and 32, 8 on 64). Names follow
// timm (patch_embed.proj, cls_token, pos_embed, blocks.<i>.norm1, .attn.qkv,
// .attn.proj, .norm2, .mlp.fc1, .mlp.fc2, norm, head) so state dicts map 1:1.
// LayerNorm eps 1e-6 as timm. The float32 forward runs the operators of
// include/moecert/functional.h, the forms the bounds assume.
#include <cmath>
#include <numeric>
#include <optional>

#include "backbone-impl.h"
#include "moecert/functional.h"

namespace moecert::backbones {
namespace {

constexpr double kEps = 1e-6;

struct VitConfig {
  int64_t depth, dim, heads, patch;
};

int64_t default_patch(int64_t h, int64_t w) {
  if (std::min(h, w) >= 224) return 16;
  const int64_t side = std::gcd(h, w), want = (std::min(h, w) + 7) / 8;
  for (int64_t p = std::max<int64_t>(1, want); p <= side; ++p)
    if (side % p == 0) return p;
  return side;
}

/// The configuration `kind` names at input size h x w (patch 0: invalid suffix).
std::optional<VitConfig> vit_config(const std::string& kind, int64_t h, int64_t w) {
  std::string body = kind;
  int64_t patch = default_patch(h, w);
  const size_t at = kind.rfind("-p");
  if (at != std::string::npos && at > 3) {
    const auto p = family_params(kind.substr(at + 2), "");
    if (p.size() != 1) return std::nullopt;
    patch = p[0], body = kind.substr(0, at);
  }
  if (body == "vit-small") return VitConfig{12, 384, 6, patch};
  const auto p = family_params(body, "vit-");
  if (p.size() != 3) return std::nullopt;
  return VitConfig{p[0], p[1], p[2], patch};
}

/// Layer norm module with the explicit float forward.
torch::Tensor norm_apply(nn::LayerNorm& ln, const torch::Tensor& x) {
  return layer_norm_last(x, ln->weight, ln->bias, kEps);
}
Layer norm_layer(const std::string& name, const nn::LayerNorm& ln) {
  return Layer::layer_norm(name, f64(ln->weight), f64(ln->bias), static_cast<float>(kEps));
}

class AttentionImpl : public nn::Module {
 public:
  AttentionImpl(int64_t dim, int64_t heads)
      : qkv(register_module("qkv", nn::Linear(dim, 3 * dim))),
        proj(register_module("proj", nn::Linear(dim, dim))),
        heads_(heads),
        scale_(static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim / heads)))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto qkv_out = qkv(x).chunk(3, -1);
    auto p = softmax_last(attention_scores(qkv_out[0], qkv_out[1], heads_, scale_));
    return proj(attention_mix(p, qkv_out[2], heads_));
  }
  /// q, k, v as three linear nodes on the qkv weight's row blocks; returns proj's node.
  int append_graph(LayerGraph& g, const std::string& p, int in) {
    const int64_t d = proj->weight.size(0);
    auto w = f64(qkv->weight), b = f64(qkv->bias);
    int part[3];
    const char* names[3] = {"q", "k", "v"};
    for (int i = 0; i < 3; ++i)
      part[i] = g.add(
          Layer::dense(p + ".qkv." + names[i], w.narrow(0, i * d, d), b.narrow(0, i * d, d)), {in});
    const int s = g.add(Layer::attention_scores(p + ".scores", heads_, scale_), {part[0], part[1]});
    const int sm = g.add(Layer::simple(Layer::Kind::softmax, p + ".softmax"), {s});
    g.add(Layer::attention_mix(p + ".mix", heads_), {sm, part[2]});
    return g.add(linear_layer(p + ".proj", proj));
  }
  nn::Linear qkv, proj;

 private:
  int64_t heads_;
  double scale_;  // the float32 value the model multiplies by
};
TORCH_MODULE(Attention);

class MlpImpl : public nn::Module {
 public:
  MlpImpl(int64_t dim, int64_t hidden)
      : fc1(register_module("fc1", nn::Linear(dim, hidden))),
        fc2(register_module("fc2", nn::Linear(hidden, dim))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(gelu_erf(fc1(x))); }
  nn::Linear fc1, fc2;
};
TORCH_MODULE(Mlp);

class BlockImpl : public nn::Module {
 public:
  BlockImpl(int64_t dim, int64_t heads)
      : norm1(register_module("norm1", nn::LayerNorm(nn::LayerNormOptions({dim}).eps(kEps)))),
        attn(register_module("attn", Attention(dim, heads))),
        norm2(register_module("norm2", nn::LayerNorm(nn::LayerNormOptions({dim}).eps(kEps)))),
        mlp(register_module("mlp", Mlp(dim, 4 * dim))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = x + attn->forward(norm_apply(norm1, x));
    return x + mlp->forward(norm_apply(norm2, x));
  }
  void append_graph(LayerGraph& g, const std::string& p) {
    const int x = g.output();
    g.add(norm_layer(p + ".norm1", norm1), {x});
    const int a = attn->append_graph(g, p + ".attn", g.output());
    const int y = g.add(Layer::simple(Layer::Kind::residual, p + ".attn"), {a, x});
    g.add(norm_layer(p + ".norm2", norm2), {y});
    g.add(linear_layer(p + ".mlp.fc1", mlp->fc1));
    g.add(Layer::simple(Layer::Kind::gelu, p + ".mlp.act"));
    const int m = g.add(linear_layer(p + ".mlp.fc2", mlp->fc2));
    g.add(Layer::simple(Layer::Kind::residual, p + ".mlp"), {m, y});
  }
  nn::LayerNorm norm1;
  Attention attn;
  nn::LayerNorm norm2;
  Mlp mlp;
};
TORCH_MODULE(Block);

class VitImpl : public BackboneImpl {
 public:
  VitImpl(const BackboneArgs& a, const VitConfig& c)
      : proj(nn::Conv2d(nn::Conv2dOptions(a.in_channels, c.dim, c.patch).stride(c.patch))),
        blocks(register_module("blocks", nn::ModuleList())),
        norm(register_module("norm", nn::LayerNorm(nn::LayerNormOptions({c.dim}).eps(kEps)))),
        head(register_module("head", nn::Linear(c.dim, a.outputs))) {
    auto embed = register_module("patch_embed", std::make_shared<nn::Module>());
    embed->register_module("proj", proj);
    const int64_t tokens = 1 + (a.height / c.patch) * (a.width_px / c.patch);
    cls_token = register_parameter("cls_token", torch::randn({1, 1, c.dim}) * 0.02);
    pos_embed = register_parameter("pos_embed", torch::randn({1, tokens, c.dim}) * 0.02);
    for (int64_t i = 0; i < c.depth; ++i) blocks->push_back(Block(c.dim, c.heads));
  }
  torch::Tensor forward(torch::Tensor x) override {
    auto t = proj(x).flatten(2).transpose(1, 2);
    t = torch::cat({cls_token.expand({t.size(0), 1, t.size(2)}), t}, 1) + pos_embed;
    for (const auto& b : *blocks) t = b->as<BlockImpl>()->forward(t);
    return head(norm_apply(norm, t.select(1, 0)));
  }
  LayerGraph graph() override {
    LayerGraph g;
    g.add(conv_layer("patch_embed.proj", proj));
    g.add(Layer::tokens_of("pos_embed", f64(cls_token).view({-1}), f64(pos_embed).squeeze(0)));
    for (size_t i = 0; i < blocks->size(); ++i)
      blocks->ptr<BlockImpl>(i)->append_graph(g, "blocks." + std::to_string(i));
    Layer cls = Layer::simple(Layer::Kind::token_select, "cls_token");
    cls.kernel = 0;
    g.add(cls);
    g.add(norm_layer("norm", norm));
    g.add(linear_layer("head", head));
    return g;
  }
  nn::Conv2d proj;
  nn::ModuleList blocks;
  nn::LayerNorm norm;
  nn::Linear head;
  torch::Tensor cls_token, pos_embed;
};

VitConfig checked(const BackboneArgs& a) {
  const auto c = vit_config(a.kind, a.height, a.width_px);
  if (!c || c->depth < 1 || c->depth > 48 || c->dim < 1 || c->dim > 4096 || c->heads < 1 ||
      c->dim % c->heads != 0 || c->patch < 1)
    throw ConfigError::invalid("backbone", a.kind,
                               "vit-small or vit-<depth>-<dim>-<heads> (1 <= depth <= 48, dim a "
                               "multiple of heads, dim <= 4096), optionally -p<patch>");
  if (a.height % c->patch != 0 || a.width_px % c->patch != 0)
    throw ConfigError::invalid("input size",
                               std::to_string(a.height) + "x" + std::to_string(a.width_px),
                               "a multiple of " + a.kind + "'s patch " + std::to_string(c->patch));
  if ((a.height / c->patch) * (a.width_px / c->patch) > 4096)
    throw ConfigError::invalid("backbone", a.kind,
                               "at most 4096 patches: choose a larger patch with -p<k>");
  return *c;
}

}  // namespace

BackboneEntry vit_backbone() {
  BackboneEntry e{"vit-small | vit-<depth>-<dim>-<heads>[-p<patch>]",
                  "Vision Transformer (paper 1's ViT-small: 12 blocks, dim 384, 6 heads); patch "
                  "16 on 224x224, 4 on 32x32"};
  e.matches = [](const std::string& k) { return k.rfind("vit-", 0) == 0; };
  e.validate = [](const BackboneArgs& a) { checked(a); };
  e.example = "vit-2-16-2-p4";
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<VitImpl>(a, checked(a));
  };
  e.cost = [](const BackboneArgs& a) -> BackboneCost {
    const auto c = checked(a);
    const double D = static_cast<double>(c.dim), K = static_cast<double>(a.outputs);
    const double N = 1 + static_cast<double>((a.height / c.patch) * (a.width_px / c.patch));
    const double H = static_cast<double>(c.heads);
    const double embed = static_cast<double>(a.in_channels * c.patch * c.patch) * D + D;
    const double block =
        2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D);
    const double params =
        embed + D + N * D + static_cast<double>(c.depth) * block + 2 * D + D * K + K;
    const double acts = N * D + static_cast<double>(c.depth) * N * (14 * D + 2 * H * N) + 2 * D + K;
    return {params, acts};
  };
  return e;
}

}  // namespace moecert::backbones
