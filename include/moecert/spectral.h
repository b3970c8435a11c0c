// Verified p = 2 operator norms of linear and convolutional layers (the global
// Lipschitz factors of the linear and conv2d rules). Proof: docs/certification.md §2.
#pragma once

#include <torch/types.h>

#include "moecert/defaults.h"

namespace moecert {

/// An upper bound on max_f σ_max(A_f) over a batch of matrices [F, m, n] (real or
/// complex; float64 arithmetic). With G_f = A_f^H A_f on the smaller side:
///  1. a float32 block power iteration estimates the largest λ_max(G_f) and sets
///     μ = (1 + slack) · estimate (the estimate plays no part in soundness);
///  2. a float64 Cholesky of μI − G_f that completes proves λ_max(G_f) <= μ up to
///     Higham's backward error of Cholesky, which is added;
///  3. each f whose Cholesky fails gets its exact top eigenvalue (LAPACK) plus the
///     solver's backward-error bound instead.
/// The rounding of forming G_f is added last. Throws NumericError on NaN/Inf input.
double max_spectral_norm_upper(torch::Tensor a, double slack = defaults::spectral_slack);

/// The p = 2 norm of a zero-padded, strided 2-D convolution on h x w inputs, bounded
/// by that of the circular convolution on the (h + 2·padding) x (w + 2·padding) grid:
/// max over frequencies of the spectral norm of the O x I kernel DFT (bounded by
/// max_spectral_norm_upper). weight: [O, I, kh, kw].
double conv_circular_norm(const torch::Tensor& weight, int64_t padding, int64_t h, int64_t w);

}  // namespace moecert
