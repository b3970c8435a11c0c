// Fused row kernels (see kernels.h). Each row is independent: rows are split over
// threads; within a row the entries are visited in order.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cmath>

namespace moecert::bp {
namespace {

/// Calls f(e, index) for every entry e of row r, with `index` the flat position of
/// the matching element in a per-sample tensor of the node's grid, or -1 (outside
/// the grid: padding, whose coefficient is zero).
struct RowMap {
  bool patches = false;
  int64_t per_sample = 0, C = 0, H = 0, W = 0, K = 1, S = 1, P = 0, sites = 1, Wt = 1;
  torch::Tensor sample_t, site_t;  // contiguous int64 copies (or views) of the rows' indices
  const int64_t* sample = nullptr;
  const int64_t* site = nullptr;

  RowMap(const Coeffs& c, const torch::Tensor& t) : patches(c.patches) {
    per_sample = t[0].numel();
    sample_t = c.sample.to(torch::kLong).contiguous();
    sample = sample_t.data_ptr<int64_t>();
    if (!patches) return;
    C = t.size(1), H = t.size(2), W = t.size(3);
    K = c.kernel, S = c.stride, P = c.pad, sites = c.Ht * c.Wt, Wt = c.Wt;
    site_t = c.site.to(torch::kLong).contiguous();
    site = site_t.data_ptr<int64_t>();
  }

  /// Dense rows: the row's per-sample slice (entry e is element e of it).
  int64_t base(int64_t r) const { return sample[r] * per_sample; }

  /// Patch rows: f(e, index) for every entry e.
  template <class F>
  void row(int64_t r, int64_t entries, F&& f) const {
    const int64_t base = sample[r] * per_sample;
    const int64_t s = site[r] % sites, i0 = (s / Wt) * S - P, j0 = (s % Wt) * S - P;
    int64_t e = 0;
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t u = 0; u < K; ++u) {
        const int64_t y = i0 + u;
        for (int64_t v = 0; v < K; ++v, ++e) {
          const int64_t x = j0 + v;
          f(e, (y < 0 || y >= H || x < 0 || x >= W) ? -1 : base + (ch * H + y) * W + x);
        }
      }
  }
};

torch::Tensor contiguous_f64(const torch::Tensor& t) { return t.to(torch::kFloat64).contiguous(); }

}  // namespace

bool rows_fusable(const Coeffs& c) {
  return !torch::GradMode::is_enabled() && c.A.device().is_cpu() &&
         c.A.scalar_type() == torch::kFloat64 && !c.A.requires_grad();
}

torch::Tensor rows_l1(const torch::Tensor& A_in) {
  auto A = A_in.contiguous();
  const int64_t R = A.size(0), n = R ? A.numel() / R : 0;
  auto out = torch::empty({R}, A.options());
  const double* a = A.data_ptr<double>();
  double* o = out.data_ptr<double>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double s = 0;
      const double* ar = a + r * n;
      for (int64_t e = 0; e < n; ++e) s += std::abs(ar[e]);
      o[r] = s;
    }
  });
  return out;
}

std::pair<torch::Tensor, torch::Tensor> rows_box(const Coeffs& c, const torch::Tensor& lo_in,
                                                 const torch::Tensor& hi_in) {
  auto A = c.A.contiguous();
  auto lo = contiguous_f64(lo_in), hi = contiguous_f64(hi_in);
  const int64_t R = A.size(0), n = R ? A.numel() / R : 0;
  auto bound = torch::zeros({R}, A.options()), mag = torch::zeros({R}, A.options());
  const double *a = A.data_ptr<double>(), *l = lo.data_ptr<double>(), *h = hi.data_ptr<double>();
  double *bo = bound.data_ptr<double>(), *mo = mag.data_ptr<double>();
  const RowMap map(c, lo);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double s = 0, m = 0;
      const double* ar = a + r * n;
      auto entry = [&](double v, double li, double hi) {
        s += v >= 0 ? v * li : v * hi;
        m += std::abs(v) * std::max(std::abs(li), std::abs(hi));
      };
      if (!map.patches) {
        const int64_t b = map.base(r);
        for (int64_t e = 0; e < n; ++e) entry(ar[e], l[b + e], h[b + e]);
      } else {
        map.row(r, n, [&](int64_t e, int64_t i) {
          if (i >= 0) entry(ar[e], l[i], h[i]);
        });
      }
      bo[r] = s, mo[r] = m;
    }
  });
  return {bound, mag};
}

std::pair<torch::Tensor, torch::Tensor> rows_relu(const Coeffs& c, const torch::Tensor& low_in,
                                                  const torch::Tensor& up_in,
                                                  const torch::Tensor& icpt_in) {
  auto A = c.A.contiguous();
  auto low = contiguous_f64(low_in), up = contiguous_f64(up_in), icpt = contiguous_f64(icpt_in);
  const int64_t R = A.size(0), n = R ? A.numel() / R : 0;
  auto out = torch::empty_like(A), bias = torch::zeros({R}, A.options());
  const double *a = A.data_ptr<double>(), *lw = low.data_ptr<double>(), *uw = up.data_ptr<double>(),
               *tw = icpt.data_ptr<double>();
  double *oo = out.data_ptr<double>(), *bo = bias.data_ptr<double>();
  const RowMap map(c, low);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double s = 0;
      const double* ar = a + r * n;
      double* orow = oo + r * n;
      auto entry = [&](int64_t e, int64_t i) {
        const double v = ar[e], pos = v > 0 ? v : 0.0, neg = v < 0 ? v : 0.0;
        orow[e] = pos * lw[i] + neg * uw[i];
        s += neg * tw[i];
      };
      if (!map.patches) {
        const int64_t b = map.base(r);
        for (int64_t e = 0; e < n; ++e) entry(e, b + e);
      } else {
        map.row(r, n, [&](int64_t e, int64_t i) {
          if (i < 0)
            orow[e] = 0;
          else
            entry(e, i);
        });
      }
      bo[r] = s;
    }
  });
  return {out, bias};
}

std::pair<torch::Tensor, torch::Tensor> relu_chord(const torch::Tensor& l, const torch::Tensor& u) {
  constexpr double u64 = std::numeric_limits<double>::epsilon() / 2;
  auto unstable = l.lt(0) & u.gt(0);
  auto zeros = torch::zeros_like(l);
  // The clamp only keeps stable units (where s is not used) finite, so that training's
  // gradients through this where() stay finite when l = u (ε = 0): 1e-300 underflows in float32.
  const double tiny = l.scalar_type() == torch::kDouble ? 1e-300 : 1e-30;
  auto s = torch::where(unstable, u / (u - l).clamp_min(tiny), zeros);
  auto t = torch::where(unstable, -l * s + 4 * u64 * (l.abs() * s + u), zeros);
  return {s, t};
}

}  // namespace moecert::bp
