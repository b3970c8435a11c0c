// Graph-component structures (architecture.graphs of a manifest, written by `moecert
// import`): the structure check, and for an accepted structure the component built from
// it and one forward pass on zeros of its input shape.
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "fuzz.h"
#include "moecert/error.h"
#include "moecert/models.h"

#ifndef MOECERT_LIBFUZZER
static const bool graph_seeds = moecert_fuzz::register_seeder("graph", [](const std::string& dir) {
  // The structures of a cnn-s expert (conv, ReLU, linear), a ResNet MoE-CNN path
  // (BatchNorm, residual sums) and a small ViT (tokens, LayerNorm, attention).
  auto write = [&](const std::string& name, const moecert::LayerGraph& g,
                   const std::vector<int64_t>& input) {
    std::ofstream(dir + "/" + name) << moecert::graph_structure(g, input).dump();
  };
  torch::manual_seed(1);
  moecert::ModelSpec s;
  s.experts = 1;
  moecert::Moe cnn(s);
  write("cnn-s.json", cnn->component_graph(0), {1, 28, 28});
  moecert::ModelSpec r;
  r.kind = "moe-cnn", r.scale = 0.125, r.experts = 2, r.expert = "resnet18";
  r.in_channels = 3, r.height = 8, r.width = 8, r.mean = {0.5, 0.5, 0.5},
  r.std = {0.25, 0.25, 0.25};
  moecert::Moe res(r);
  write("resnet18-path.json", res->component_graph(0), {3, 8, 8});
  moecert::ModelSpec v;
  v.experts = 1, v.expert = "vit-1-8-2-p4", v.in_channels = 1, v.height = 8, v.width = 8;
  v.mean = {0.5}, v.std = {0.25};
  moecert::Moe vit(v);
  write("vit.json", vit->component_graph(0), {1, 8, 8});
});
#endif

#if defined(MOECERT_FUZZ_GRAPH) || !defined(MOECERT_LIBFUZZER)
MOECERT_FUZZ_TARGET(graph) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const std::exception&) {
    return 0;  // not JSON: the manifest reader's answer, fuzzed by the manifest harness
  }
  try {
    const auto info = moecert::graph_structure_check(j, "fuzz");
    auto net = moecert::graph_net_make(j, "fuzz");
    std::vector<int64_t> shape{1};
    shape.insert(shape.end(), info.input_shape.begin(), info.input_shape.end());
    torch::NoGradGuard no_grad;
    auto out = net->forward(torch::zeros(shape));
    if (out.sizes().vec() != std::vector<int64_t>{1, info.output_shape.at(0)})
      throw std::logic_error("graph component: output shape differs from its check");
  } catch (const moecert::Error&) {
  }
  return 0;
}
#endif
