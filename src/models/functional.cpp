// The transformer operators as elementary float operations (include/moecert/functional.h).
#include "moecert/functional.h"

#include <torch/torch.h>

#include <cmath>

namespace moecert {

torch::Tensor layer_norm_last(const torch::Tensor& x, const torch::Tensor& gamma,
                              const torch::Tensor& beta, double eps) {
  auto d = x - x.mean(-1, /*keepdim=*/true);
  auto var = (d * d).mean(-1, /*keepdim=*/true);
  return d / torch::sqrt(var + eps) * gamma + beta;
}

torch::Tensor gelu_erf(const torch::Tensor& x) {
  return (x * 0.5) * (1 + torch::erf(x * M_SQRT1_2));
}

torch::Tensor softmax_last(const torch::Tensor& x) {
  auto z = torch::exp(x - std::get<0>(x.max(-1, /*keepdim=*/true)));
  return z / z.sum(-1, /*keepdim=*/true);
}

torch::Tensor split_heads(const torch::Tensor& x, int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, x.size(2) / heads}).transpose(1, 2);
}

torch::Tensor merge_heads(const torch::Tensor& x) {
  return x.transpose(1, 2).reshape({x.size(0), x.size(2), x.size(1) * x.size(3)});
}

torch::Tensor attention_scores(const torch::Tensor& q, const torch::Tensor& k, int64_t heads,
                               double scale) {
  return torch::matmul(split_heads(q, heads), split_heads(k, heads).transpose(-2, -1)) * scale;
}

torch::Tensor attention_mix(const torch::Tensor& p, const torch::Tensor& v, int64_t heads) {
  return merge_heads(torch::matmul(p, split_heads(v, heads)));
}

}  // namespace moecert
