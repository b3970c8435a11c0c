// The 2-D MoEs of the branch-and-bound tests: small enough to know the exact answer (a
// linear top-k router, one-hidden-layer ReLU experts: the margin is linear on every cell
// of the arrangement of the hidden units' lines, the router's boundaries and the box),
// and a random-point attack on them.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "certify/bab.h"
#include "certify/forms.h"

namespace moecert_test {

using namespace moecert;

inline const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

using Line = std::array<double, 3>;  // a0·x0 + a1·x1 = d

/// The pairwise intersections of `lines` and the box [lo, hi]'s four sides that lie in
/// the box (within 1e-9, then clamped into it): the vertices of the arrangement there. [m, 2]
inline torch::Tensor vertices_in_box(std::vector<Line> lines, const std::vector<double>& lo,
                                     const std::vector<double>& hi) {
  lines.push_back({1, 0, lo[0]}), lines.push_back({1, 0, hi[0]});
  lines.push_back({0, 1, lo[1]}), lines.push_back({0, 1, hi[1]});
  std::vector<double> pts;
  for (size_t a = 0; a < lines.size(); ++a)
    for (size_t b = a + 1; b < lines.size(); ++b) {
      const auto &p = lines[a], &q = lines[b];
      const double det = p[0] * q[1] - p[1] * q[0];
      if (std::abs(det) < 1e-12) continue;
      const double x0 = (p[2] * q[1] - p[1] * q[2]) / det, x1 = (p[0] * q[2] - p[2] * q[0]) / det;
      const double tol = 1e-9;
      if (x0 < lo[0] - tol || x0 > hi[0] + tol || x1 < lo[1] - tol || x1 > hi[1] + tol) continue;
      pts.push_back(std::clamp(x0, lo[0], hi[0])), pts.push_back(std::clamp(x1, lo[1], hi[1]));
    }
  return torch::tensor(pts, f64).view({-1, 2});
}

/// A 2-D MoE: E experts (E = 1: a dense net) of `hidden` ReLU units and K classes, a
/// linear top-k router (k = 1: the selected expert's logits; k > 1: the mixture of the
/// selected experts' probabilities, weighted by the softmax of their router logits).
/// Weights are float32 numbers (the float32 model rounds nothing).
struct Toy {
  int64_t E, K, hidden, k;
  torch::Tensor R, c;                         // router [E, 2], [E]
  std::vector<torch::Tensor> W1, b1, W2, b2;  // per expert
  LayerGraph router;
  std::vector<LayerGraph> experts;
  forms::MemberGraphs graphs;

  Toy(int64_t e, int64_t classes, int64_t h, uint64_t seed, int64_t top_k = 1)
      : E(e), K(classes), hidden(h), k(top_k) {
    torch::manual_seed(seed);
    auto w = [](std::vector<int64_t> s, double scale) {
      return (torch::randn(s) * scale).to(torch::kFloat64);  // float32 values
    };
    R = w({E, 2}, 3), c = w({E}, 1);
    for (int64_t j = 0; j < E; ++j) {
      // Hidden lines through points of the unit square, so that classes vary there.
      W1.push_back(w({h, 2}, 4));
      auto through = (0.2 + 0.6 * torch::rand({h, 2})).to(torch::kFloat).to(torch::kFloat64);
      b1.push_back(-(W1[j] * through).sum(1).to(torch::kFloat).to(torch::kFloat64));
      W2.push_back(w({K, h}, 1)), b2.push_back(w({K}, 0.5));
      experts.push_back({Layer::simple(Layer::Kind::flatten), Layer::dense("fc1", W1[j], b1[j]),
                         Layer::simple(Layer::Kind::relu), Layer::dense("fc2", W2[j], b2[j])});
    }
    if (E > 1) router = {Layer::simple(Layer::Kind::flatten), Layer::dense("gate", R, c)};
    ModelSpec s;
    s.in_channels = 1, s.height = 1, s.width = 2, s.num_classes = K, s.experts = E, s.top_k = k;
    graphs = forms::member_graphs(s, router, experts);
  }

  torch::Tensor expert64(int64_t j, const torch::Tensor& x) const {  // x [n, 2]
    return torch::relu(x.matmul(W1[j].t()) + b1[j]).matmul(W2[j].t()) + b2[j];
  }

  /// The float32 model as branch and bound's Logits (holds a reference to the toy).
  bab::Logits logits() const {
    return [this](const torch::Tensor& v) { return logits32(v); };
  }

  /// The float32 model's logits at x [n, 1, 1, 2] (float32).
  torch::Tensor logits32(const torch::Tensor& x) const {
    auto v = x.flatten(1).to(torch::kFloat);
    if (k > 1) {  // log F = logsumexp_j (log a_j + log_softmax(h_j)) over the selected j
      auto [g, sel] = v.matmul(R.to(torch::kFloat).t()).add(c.to(torch::kFloat)).topk(k, 1);
      auto log_a = torch::log_softmax(g, 1);
      std::vector<torch::Tensor> parts;
      for (int64_t j = 0; j < E; ++j)
        parts.push_back(torch::log_softmax(
            torch::relu(v.matmul(W1[j].to(torch::kFloat).t()) + b1[j].to(torch::kFloat))
                    .matmul(W2[j].to(torch::kFloat).t()) +
                b2[j].to(torch::kFloat),
            1));
      auto lsm = torch::stack(parts, 1);  // [n, E, K]
      auto picked = lsm.gather(1, sel.unsqueeze(2).expand({-1, -1, K}));
      return torch::logsumexp(picked + log_a.unsqueeze(2), 1);
    }
    auto out = torch::zeros({v.size(0), K});
    auto pick = E > 1 ? v.matmul(R.to(torch::kFloat).t()).add(c.to(torch::kFloat)).argmax(1)
                      : torch::zeros({v.size(0)}, torch::kLong);
    for (int64_t j = 0; j < E; ++j) {
      auto h = torch::relu(v.matmul(W1[j].to(torch::kFloat).t()) + b1[j].to(torch::kFloat))
                   .matmul(W2[j].to(torch::kFloat).t()) +
               b2[j].to(torch::kFloat);
      out = torch::where(pick.eq(j).unsqueeze(1), h, out);
    }
    return out;
  }

  /// The exact least margin min_k (h_y − h_k) of the selected expert over the box
  /// [lo, hi] (route regions closed): the least over the vertices of the arrangement.
  double exact_margin(const std::vector<double>& lo, const std::vector<double>& hi,
                      int64_t y) const {
    double best = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < E; ++j) {
      std::vector<Line> lines;
      for (int64_t u = 0; u < hidden; ++u)
        lines.push_back(
            {W1[j][u][0].item<double>(), W1[j][u][1].item<double>(), -b1[j][u].item<double>()});
      for (int64_t t = 0; t < E; ++t)
        if (t != j)
          lines.push_back({(R[j][0] - R[t][0]).item<double>(), (R[j][1] - R[t][1]).item<double>(),
                           (c[t] - c[j]).item<double>()});
      auto x = vertices_in_box(lines, lo, hi);
      if (x.size(0) == 0) continue;
      auto ok = torch::ones({x.size(0)}, torch::kBool);
      if (E > 1) {
        auto g = x.matmul(R.t()) + c;
        ok = (g.select(1, j).unsqueeze(1) >= g - 1e-9).all(1);
      }
      if (!ok.any().item<bool>()) continue;
      auto h = expert64(j, x.index_select(0, ok.nonzero().flatten()));
      auto m = (h.select(1, y).unsqueeze(1) - h).index_fill(1, torch::tensor({y}), INFINITY);
      best = std::min(best, m.min().item<double>());
    }
    return best;
  }
};

/// A random point of [0.2, 0.8]², held exactly in float32. [1, 1, 1, 2] float64
inline torch::Tensor random_centre() {
  return (0.2 + 0.6 * torch::rand({1, 1, 1, 2}, f64)).to(torch::kFloat).to(torch::kFloat64);
}

/// An attack for the toys: the float32 model at 256 seeded random points of the box.
inline bab::Attack random_points(const bab::Logits& logits32, const bab::Problem& p) {
  return [logits32, &p](int round, const torch::Tensor&) {
    torch::manual_seed(1000 + round);
    auto lo = (p.x - p.eps).clamp_min(0.0), hi = (p.x + p.eps).clamp_max(1.0);
    auto pts = (lo + (hi - lo) * torch::rand({256, 1, 1, 2}, f64)).to(torch::kFloat);
    auto wrong = logits32(pts).argmax(1).ne(p.label).nonzero().flatten();
    return wrong.numel() ? pts.narrow(0, wrong[0].item<int64_t>(), 1) : torch::Tensor();
  };
}
inline bab::Attack random_points(const Toy& toy, const bab::Problem& p) {
  return random_points([&toy](const torch::Tensor& v) { return toy.logits32(v); }, p);
}

}  // namespace moecert_test
