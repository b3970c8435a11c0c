// The backbones and routers the whole-graph certification tests bound: a cnn-s expert,
// a cnn router, an mlp expert, a ResNet-18 MoE-CNN path with BatchNorm statistics, a
// cnn-s MoE-CNN path, WRN and DenseNet-BC MoE-CNN paths, and a graph with max-pooling
// (always last). Fixed seed.
#pragma once

#include <torch/torch.h>

#include <tuple>

#include "moecert/models.h"

namespace moecert_test {

struct Net {
  std::string name;
  moecert::LayerGraph graph;
  moecert::Shape input;
};

/// A random batch for a net: B inputs in [0, 1]^input and B specifications C of
/// `rows` random rows over its K outputs, in float64.
struct Probe {
  torch::Tensor x, C;
};
inline Probe random_probe(const Net& net, int64_t K, int64_t B, int64_t rows = 3) {
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  return {torch::rand(std::vector<int64_t>{B, net.input[0], net.input[1], net.input[2]}, f64),
          torch::randn({B, rows, K}, f64)};
}

inline std::vector<Net> nets() {
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  torch::manual_seed(21);
  std::vector<Net> out;
  moecert::ModelSpec s;
  s.experts = 2, s.router = "cnn";
  moecert::Moe moe(s);
  moe->eval();
  out.push_back({"cnn-s expert", moe->component_graph(0), {1, 28, 28}});
  out.push_back({"cnn router", moe->component_graph(-1), {1, 28, 28}});
  moecert::ModelSpec m;
  m.in_channels = 1, m.height = 4, m.width = 4, m.experts = 2, m.expert = "mlp", m.router = "mlp";
  m.mean = {0.5}, m.std = {0.25};
  moecert::Moe mlp(m);
  out.push_back({"mlp expert", mlp->component_graph(1), {1, 4, 4}});
  moecert::ModelSpec r;
  r.kind = "moe-cnn", r.scale = 0.125, r.experts = 2, r.expert = "resnet18";
  r.in_channels = 3, r.height = 8, r.width = 8, r.mean = {0.5, 0.5, 0.5},
  r.std = {0.25, 0.25, 0.25};
  moecert::Moe res(r);
  res->eval();
  {  // non-trivial BatchNorm statistics
    torch::NoGradGuard ng;
    for (auto& b : res->named_buffers())
      if (b.key().find("running_var") != std::string::npos)
        b.value().uniform_(0.5, 2.0);
      else if (b.key().find("running_mean") != std::string::npos)
        b.value().uniform_(-0.2, 0.2);
  }
  out.push_back({"resnet18 path (MoE-CNN)", res->component_graph(1), {3, 8, 8}});
  moecert::ModelSpec c;
  c.kind = "moe-cnn", c.experts = 2;
  moecert::Moe cnn(c);
  cnn->eval();
  out.push_back({"cnn-s path (MoE-CNN)", cnn->component_graph(0), {1, 28, 28}});
  // Pre-activation residual blocks with 1x1 shortcuts (WRN) and dense concatenations
  // with average-pool transitions (DenseNet-BC), as narrow MoE-CNN paths.
  for (auto [name, expert, scale] :
       {std::tuple{"wrn-10-1 path (MoE-CNN)", "wrn-10-1", 0.25},
        std::tuple{"densenet-bc-16-4 path (MoE-CNN)", "densenet-bc-16-4", 0.5}}) {
    moecert::ModelSpec w = r;
    w.expert = expert, w.scale = scale;
    moecert::Moe m(w);
    m->eval();
    torch::NoGradGuard ng;
    for (auto& b : m->named_buffers())
      if (b.key().find("running_var") != std::string::npos)
        b.value().uniform_(0.5, 2.0);
      else if (b.key().find("running_mean") != std::string::npos)
        b.value().uniform_(-0.2, 0.2);
    out.push_back({name, m->component_graph(1), {3, 8, 8}});
  }
  // A graph with max-pooling straight after a conv and after a ReLU.
  out.push_back(
      {"conv + max-pool",
       {moecert::Layer::affine("norm", torch::full({1}, 2.0, f64), torch::full({1}, -1.0, f64)),
        moecert::Layer::conv2d("c1", torch::randn({4, 1, 3, 3}, f64), torch::randn({4}, f64), 1, 1),
        moecert::Layer::max_pool("p1", 2, 2, 0), moecert::Layer::simple(moecert::Layer::Kind::relu),
        moecert::Layer::conv2d("c2", torch::randn({6, 4, 3, 3}, f64) * 0.5, torch::randn({6}, f64),
                               1, 1),
        moecert::Layer::simple(moecert::Layer::Kind::relu), moecert::Layer::max_pool("p2", 3, 2, 1),
        moecert::Layer::simple(moecert::Layer::Kind::flatten),
        moecert::Layer::dense("fc", torch::randn({5, 24}, f64) * 0.3, torch::randn({5}, f64))},
       {1, 8, 8}});
  return out;
}

}  // namespace moecert_test
