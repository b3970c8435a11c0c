// Fused row kernels of the backward walk (no autograd): the hot loops of CROWN
// written as one pass over a row's coefficients, reading the per-sample tensors in
// place instead of gathering copies of them (dense rows: by sample; patch rows: by
// the window's position). Same arithmetic as the tensor formulation in the rules,
// which α-CROWN (autograd) uses.
#pragma once

#include <torch/types.h>

#include "moecert/rules.h"

namespace moecert::bp {

/// min over [lo, hi] of Σ A·z per row, and Σ |A|·max(|lo|, |hi|). -> {[R], [R]}
std::pair<torch::Tensor, torch::Tensor> rows_box(const Coeffs& c, const torch::Tensor& lo,
                                                 const torch::Tensor& hi);

/// The ReLU relaxation step: A_out = A⁺·low + A⁻·up and Σ A⁻·icpt per row.
std::pair<torch::Tensor, torch::Tensor> rows_relu(const Coeffs& c, const torch::Tensor& low,
                                                  const torch::Tensor& up,
                                                  const torch::Tensor& icpt);

/// Σ |A| per row, in one read of the rows. -> [R]
torch::Tensor rows_l1(const torch::Tensor& A);

/// Whether the fused kernels apply: CPU float64 rows with autograd off.
bool rows_fusable(const Coeffs& c);

/// The chord of a ReLU over [l, u] on its unstable units (l < 0 < u): relu(z) <= s·z + t
/// with s = u / (u − l) and t = −l·s raised by 4u(|l|·s + u), which covers the float64
/// rounding of s and t; 0 on the other units. The ReLU rule's upper line, and the line
/// input planes replace (docs/certification.md §10). -> {s, t}
std::pair<torch::Tensor, torch::Tensor> relu_chord(const torch::Tensor& l, const torch::Tensor& u);

}  // namespace moecert::bp
