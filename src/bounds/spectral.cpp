// Verified p = 2 operator norms (SPEC §4.1): the batched spectral bound with a
// Cholesky certificate, and the circular-embedding bound of a convolution. Proofs:
// docs/certification.md §2.
#include "moecert/spectral.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "moecert/error.h"

namespace moecert {
namespace {

/// γ_k = k·u / (1 − k·u): the relative error bound of k chained float64 operations.
double gamma_f64(double k) {
  const double u = std::numeric_limits<double>::epsilon() / 2;
  return k * u / (1.0 - k * u);
}

}  // namespace

// Proof of every step in docs/certification.md §2 ("p = 2 spectral norms").
double max_spectral_norm_upper(torch::Tensor a, double slack) {
  a = a.to(a.is_complex() ? torch::kComplexDouble : torch::kFloat64).contiguous();
  if (!torch::isfinite(a).all().item<bool>())
    throw NumericError::non_finite("layer weight", "the p = 2 operator norm");
  if (a.size(1) < a.size(2)) a = a.transpose(1, 2).conj();  // the Gram matrix is the smaller side
  const int64_t m = a.size(1), n = a.size(2), batch = a.size(0);
  const double u = std::numeric_limits<double>::epsilon() / 2;
  auto gram = torch::matmul(a.transpose(1, 2).conj(), a).contiguous();  // [F, n, n]
  auto diag = torch::real(gram.diagonal(0, 1, 2)).to(torch::kFloat64);  // [F, n], ĝ_ii >= 0
  // ‖A‖_F² <= tr(Ĝ) / (1 − γ): each ĝ_ii is a rounded sum of m squares (x2 for the trace).
  auto fro2 = diag.sum(1) / (1.0 - gamma_f64(2.0 * static_cast<double>(m + n) + 4.0));
  // ‖Ĝ − G‖_2 <= γ_{2m+4} ‖|A|^H |A|‖_2 <= γ_{2m+4} ‖A‖_F² (complex inner products).
  auto formation = gamma_f64(2.0 * static_cast<double>(m) + 4.0) * fro2;

  // 1. estimate (float32, block power iteration with Rayleigh-Ritz; no soundness role)
  const int64_t block = std::min<int64_t>(n, 8);
  auto g32 = gram.to(a.is_complex() ? torch::kComplexFloat : torch::kFloat32);
  auto gen = at::detail::createCPUGenerator(0x6d6f65);
  auto v = torch::randn({batch, n, block}, gen, torch::TensorOptions().dtype(g32.scalar_type()));
  // Orthonormalise every third product: enough to keep the block well conditioned in
  // float32, and QR costs more than the product on the small matrices.
  for (int it = 1; it <= defaults::spectral_power_iterations; ++it) {
    v = torch::matmul(g32, v);
    if (it % 3 == 0) v = std::get<0>(at::linalg_qr(v, "reduced"));
  }
  // Rayleigh-Ritz in float64: a float32 quotient may sit ~1e-7 above λ_max.
  v = std::get<0>(at::linalg_qr(v.to(gram.scalar_type()), "reduced"));
  auto ritz =
      at::linalg_eigvalsh(torch::matmul(v.transpose(1, 2).conj(), torch::matmul(gram, v)), "L");
  const double estimate = std::max(ritz.select(1, block - 1).max().item<double>(), 0.0);
  const double mu = estimate * (1.0 + slack) + std::numeric_limits<double>::min();

  // 2. verify λ_max(Ĝ_f) <= μ for all f at once: B = fl(μI − Ĝ) = μI − Ĝ + D with
  // |D_ii| <= u |μ − ĝ_ii|; a completed Cholesky gives R̂^H R̂ = B + ΔB with
  // ‖ΔB‖_2 <= γ ‖R̂‖_F² <= γ tr(B) / (1 − γ), so λ_max(Ĝ) <= μ + |D| + γ tr(B)/(1 − γ).
  auto eye = torch::eye(n, torch::TensorOptions().dtype(gram.scalar_type()));
  auto b = eye * mu - gram;
  auto info = std::get<1>(at::linalg_cholesky_ex(b, false, false));
  const double gc = gamma_f64(2.0 * static_cast<double>(n) + 8.0);
  auto b_diag = mu - diag;  // the diagonal of B (before its rounding)
  auto verified = mu + u * b_diag.abs().amax(1) + gc * b_diag.sum(1).abs() / (1.0 - gc);
  auto bound2 = verified;  // [F], valid where info == 0
  // 3. the frequencies Cholesky could not verify: exact eigenvalues plus the error
  // bound of a backward-stable Hermitian solver, 10 n² u ‖Ĝ‖_F (generous over LAPACK's p(n)).
  auto failed = info.ne(0).nonzero().flatten();
  if (failed.numel() > 0) {
    auto gf = gram.index_select(0, failed);
    auto top = at::linalg_eigvalsh(gf, "L").select(1, n - 1).to(torch::kFloat64);
    auto gfro =
        at::linalg_matrix_norm(gf, "fro", {-2, -1}, false, c10::nullopt).to(torch::kFloat64);
    bound2 = bound2.index_copy(
        0, failed, torch::clamp_min(top, 0.0) + 10.0 * static_cast<double>(n * n) * u * gfro);
  }
  bound2 = bound2 + formation;
  return std::sqrt(bound2.max().item<double>()) *
         (1.0 + 4.0 * u);  // the sum and the root round too
}

double conv_circular_norm(const torch::Tensor& weight, int64_t padding, int64_t h, int64_t w) {
  const int64_t out = weight.size(0), in = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t nh = h + 2 * padding, nw = w + 2 * padding;
  if (nh < kh || nw < kw)
    throw ShapeError::unexpected("conv_circular_norm grid", ">= kernel", {nh, nw});
  auto wt = weight.to(torch::kFloat64).cpu();
  // A 1x1 kernel has the same matrix W at every frequency.
  if (kh == 1 && kw == 1) return max_spectral_norm_upper(wt.flatten(1).unsqueeze(0));
  // K̂(ω) = Σ_taps W[:, :, t] e^{-iω·t} for the half spectrum 0 <= ω_w <= N_w/2 (a real
  // kernel has conjugate matrices at ω and −ω, equal norms): one [F, taps] x [taps, O·I]
  // product lays the frequency matrices out as [F, O, I] directly.
  const int64_t fw = nw / 2 + 1;
  auto fu = torch::arange(nh, torch::kFloat64).view({nh, 1}).expand({nh, fw}).reshape({-1, 1});
  auto fv = torch::arange(fw, torch::kFloat64).view({1, fw}).expand({nh, fw}).reshape({-1, 1});
  auto tu = torch::arange(kh, torch::kFloat64).view({kh, 1}).expand({kh, kw}).reshape({1, -1});
  auto tv = torch::arange(kw, torch::kFloat64).view({1, kw}).expand({kh, kw}).reshape({1, -1});
  auto angle =
      -2.0 * M_PI * (fu * tu / static_cast<double>(nh) + fv * tv / static_cast<double>(nw));
  auto phase = torch::complex(torch::cos(angle), torch::sin(angle));  // [F, taps]
  auto taps = torch::complex(wt.reshape({out * in, kh * kw}).t().contiguous(),
                             torch::zeros({kh * kw, out * in}, torch::kFloat64));  // [taps, O·I]
  return max_spectral_norm_upper(torch::matmul(phase, taps).view({-1, out, in}));
}

}  // namespace moecert
