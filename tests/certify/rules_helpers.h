// What the bound rules' sampling tests (test_rules.cpp, test_rules_transformer.cpp) share:
// random input intervals with points inside them, dense coefficient rows over a layer's
// output and the arguments a backward step sees for them.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <utility>
#include <vector>

#include "moecert/rules.h"

namespace moecert_test::rules_helpers {

using moecert::BackwardArgs;
using moecert::Coeffs;
using moecert::Layer;
using moecert::NodeBounds;
using moecert::Shape;

inline const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
inline constexpr int64_t kBatch = 4, kPerSample = 2500;  // 10^4 sampled points per check

inline std::vector<int64_t> batched(int64_t n, const Shape& s) {
  std::vector<int64_t> v{n};
  v.insert(v.end(), s.begin(), s.end());
  return v;
}

/// An input interval per sample (some entries of both signs) and points inside it.
struct Region {
  NodeBounds in;
  torch::Tensor points;  // [kBatch * kPerSample, *in]
};

inline Region region(const Shape& shape) {
  auto c = torch::randn(batched(kBatch, shape), f64), r = torch::rand(batched(kBatch, shape), f64);
  Region g;
  g.in = {c - r, c + r, (c.abs() + r), torch::zeros_like(c)};
  auto u = torch::rand(batched(kBatch * kPerSample, shape), f64);
  auto lo = g.in.lo.repeat_interleave(kPerSample, 0), hi = g.in.hi.repeat_interleave(kPerSample, 0);
  // Half of the points on the interval's corners (where relaxations are tight).
  auto corner = torch::rand({kBatch * kPerSample}, f64).lt(0.5);
  auto t = torch::where(corner.view(batched(-1, Shape(shape.size(), 1))), u.round(), u);
  g.points = lo + t * (hi - lo);
  return g;
}

/// Dense coefficient rows over the output: `rows` per sample.
inline Coeffs dense_rows(const Shape& out, int64_t rows) {
  Coeffs c;
  c.A = torch::randn(batched(kBatch * rows, out), f64);
  c.sample = torch::arange(kBatch, torch::kLong).repeat_interleave(rows);
  return c;
}

/// What a backward step of `l` sees for dense rows `c` (gathered by their samples). The
/// shapes are held by reference: they must outlive the result.
inline BackwardArgs dense_args(const Layer& l, const std::vector<Shape>& in_shapes,
                               const Shape& out, std::vector<const NodeBounds*> in,
                               const Coeffs& c) {
  BackwardArgs a{l, in_shapes, out, std::move(in), {}, {}};
  a.gather = [sample = c.sample](const torch::Tensor& t) { return t.index_select(0, sample); };
  return a;
}

}  // namespace moecert_test::rules_helpers
