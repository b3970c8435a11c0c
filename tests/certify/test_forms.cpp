// The pieces of the MoE-aware certificate forms: the softmax margin bound over a box
// of logit differences, the simplex LP of router weights, the router's selection
// logic, and the float32 allowance on a constructed near-tie.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "certify/forms.h"
#include "moecert/certify.h"
#include "moecert/model_io.h"

using namespace moecert;

namespace {
auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
}

TEST_CASE("softmax margin bound: exact minimum of f_y - f_k over a box of logit differences",
          "[unit][certify][forms]") {
  torch::manual_seed(8);
  const int64_t n = 200, K = 4;
  auto centre = torch::randn({n, K}, f64) * 2, radius = torch::rand({n, K}, f64) * 1.5;
  auto labels = torch::randint(K, {n}, torch::kLong);
  auto lo = centre - radius, hi = centre + radius;
  auto bound = forms::softmax_margin_lower(lo, hi, labels);
  // f_y − f_k = (1 − e^{δ_k}) / (1 + Σ_{j≠y} e^{δ_j}) is monotone in every δ_j on the box, so
  // its minimum sits at a corner: enumerate all 2^K corners.
  for (int64_t b = 0; b < n; ++b) {
    const int64_t y = labels[b].item<int64_t>();
    for (int64_t k = 0; k < K; ++k) {
      if (k == y) continue;
      double exact = INFINITY;
      for (int mask = 0; mask < (1 << K); ++mask) {
        std::vector<double> d(K);
        for (int64_t j = 0; j < K; ++j)
          d[j] = j == y ? 0.0 : ((mask >> j) & 1 ? hi : lo)[b][j].item<double>();
        double den = 1;
        for (int64_t j = 0; j < K; ++j)
          if (j != y) den += std::exp(d[j]);
        exact = std::min(exact, (1 - std::exp(d[k])) / den);
      }
      const double got = bound[b][k].item<double>();
      CHECK(got <= exact);
      CHECK(got >= exact - 1e-9);
    }
    CHECK(std::isinf(bound[b][y].item<double>()));
  }
}

TEST_CASE("router-weight LP: the greedy minimum equals the best vertex", "[unit][certify][forms]") {
  torch::manual_seed(9);
  const int64_t n = 300, E = 4;
  auto a = torch::rand({n, E}, f64), b = torch::rand({n, E}, f64);
  auto lo = torch::min(a, b) * 0.5, hi = torch::max(a, b);
  // keep Σ lo <= 1 <= Σ hi (true weights lie inside)
  lo = lo / torch::max(lo.sum(1, true), torch::ones({n, 1}, f64));
  hi = torch::where(hi.sum(1, true).lt(1.0), hi / hi.sum(1, true), hi).clamp_max(1.0);
  auto mu = torch::randn({n, E}, f64);
  auto got = forms::simplex_min(lo, hi, mu);
  for (int64_t r = 0; r < n; ++r) {
    double best = INFINITY;
    // Vertices: all coordinates but one at a bound, the free one fixed by Σ a = 1.
    for (int64_t free = 0; free < E; ++free)
      for (int mask = 0; mask < (1 << E); ++mask) {
        double s = 0, v = 0;
        for (int64_t j = 0; j < E; ++j) {
          if (j == free) continue;
          const double aj = ((mask >> j) & 1 ? hi : lo)[r][j].item<double>();
          s += aj, v += aj * mu[r][j].item<double>();
        }
        const double af = 1 - s;
        if (af < lo[r][free].item<double>() - 1e-12 || af > hi[r][free].item<double>() + 1e-12)
          continue;
        best = std::min(best, v + af * mu[r][free].item<double>());
      }
    REQUIRE(std::isfinite(best));
    CHECK(got[r].item<double>() <= best + 1e-12);
    CHECK(got[r].item<double>() >= best - 1e-9);
  }
}

TEST_CASE("the float32 allowance refuses a near-tie that float32 rounding breaks",
          "[soundness][certify][forms]") {
  // A dense model on 2 pixels whose class 1 beats class 0 by δ = 2e-5 in exact
  // arithmetic everywhere, while both logits are 3000·(x_a + x_b) + c: away from x = 0
  // float32 rounds them to the same value (the spacing of floats at 600 is 6e-5) and
  // argmax picks class 0.
  ModelSpec s;
  s.in_channels = 1, s.height = 1, s.width = 2, s.num_classes = 3, s.experts = 1, s.expert = "mlp";
  s.mean = {0.0}, s.std = {1.0};
  Moe model(s);
  {
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.zero_();
    auto params = model->named_parameters();
    auto w1 = params["experts.0.fc1.weight"], w2 = params["experts.0.fc2.weight"],
         w3 = params["experts.0.fc3.weight"];
    w1[0][0] = 1, w1[1][1] = 1, w2[0][0] = 1, w2[1][1] = 1;
    w3[0][0] = w3[0][1] = w3[1][0] = w3[1][1] = 3000;
    params["experts.0.fc3.bias"][1] = 2e-5f;
    params["experts.0.fc3.bias"][2] = -50;
  }
  model->eval();
  // Float32 misclassifies a point at L-inf distance 0.1 of x = (0, 0), where it is right.
  auto x0 = torch::zeros({1, 1, 1, 2});
  {
    torch::NoGradGuard ng;
    REQUIRE(model->forward(x0).argmax(1).item<int64_t>() == 1);
    REQUIRE(model->forward(x0 + 0.1).argmax(1).item<int64_t>() == 0);
    auto exact = model->component_graph(0);
    auto h = graph_forward(exact, (x0 + 0.1).to(torch::kFloat64));
    REQUIRE(h[0][1].item<double>() > h[0][0].item<double>());  // exact arithmetic: class 1
  }
  Dataset d;
  d.name = "near-tie";
  d.images = torch::zeros({1, 1, 1, 2}, torch::kUInt8);
  d.labels = torch::ones({1}, torch::kLong);
  d.num_classes = 3, d.mean = {0.0}, d.std = {1.0};
  LoadedModel loaded;
  loaded.model = model;
  loaded.manifest = nlohmann::json::object();
  CertifyConfig cfg;
  cfg.estimators = {Estimator::global, Estimator::local, Estimator::crown};
  cfg.eps_grid = EpsGrid({0.1});
  cfg.empirical = false;
  cfg.search_rounds = 10;
  auto radii_of = [&](bool exact) {
    cfg.exact_arithmetic = exact;
    auto res = certify_run(loaded, d, {0}, cfg, torch::kCPU, false).to_json();
    REQUIRE(res["rows"][0]["correct"].get<bool>());
    return res["rows"][0]["radii"];
  };
  // Exact arithmetic certifies far beyond the float32 counterexample: not sound for the model.
  CHECK(radii_of(true)["margin_crown"].get<double>() >= 0.1);
  // With the allowance no form reaches it.
  const auto fp32 = radii_of(false);
  for (const auto& [form, v] : fp32.items()) {
    INFO(form);
    CHECK(v.get<double>() < 0.1);
  }
}
