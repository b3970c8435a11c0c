// The transformer operators written as the elementary float operations that both
// the float32 model (src/models/vit.cpp) and the bound rules evaluate: no fused
// kernels, so that the float32 error bounds of docs/certification.md §12 describe
// exactly what runs. All act on the last dimension; batch first.
#pragma once

#include <torch/types.h>

namespace moecert {

/// y = γ·(x − mean)/sqrt(var + eps) + β over the last dimension (var: mean of the
/// squared deviations, the biased estimator of nn.LayerNorm).
torch::Tensor layer_norm_last(const torch::Tensor& x, const torch::Tensor& gamma,
                              const torch::Tensor& beta, double eps);
/// gelu(x) = (x/2)·(1 + erf(x/√2)), the exact (erf) form of nn.GELU.
torch::Tensor gelu_erf(const torch::Tensor& x);
/// softmax over the last dimension: exp(x − max) / Σ exp(x − max).
torch::Tensor softmax_last(const torch::Tensor& x);
/// q, k [B, N, D] -> [B, heads, N, N]: scale·q_h k_hᵀ, head h = columns
/// [h·D/heads, (h+1)·D/heads).
torch::Tensor attention_scores(const torch::Tensor& q, const torch::Tensor& k, int64_t heads,
                               double scale);
/// p [B, heads, N, N], v [B, N, D] -> [B, N, D]: p_h v_h, heads side by side.
torch::Tensor attention_mix(const torch::Tensor& p, const torch::Tensor& v, int64_t heads);
/// [B, N, D] -> [B, heads, N, D/heads].
torch::Tensor split_heads(const torch::Tensor& x, int64_t heads);
/// [B, heads, N, d] -> [B, N, heads·d].
torch::Tensor merge_heads(const torch::Tensor& x);

}  // namespace moecert
