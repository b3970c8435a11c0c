// Dual-model (paper 1): F_D(x) = (1 - α)·F_S(x) + α·F_R(x), a standard MoE F_S and
// a robust MoE F_R. Stored as one checkpoint whose weights are `standard.*` and
// `robust.*`, and whose manifest has "kind": "dual" and "alpha".
#pragma once

#include "moecert/attacks.h"
#include "moecert/models.h"

namespace moecert {

class DualImpl : public torch::nn::Module {
 public:
  /// Members must agree on input shape and class count; α in [0, 1].
  DualImpl(Moe standard, Moe robust, double alpha);

  /// log F_D(x). x: [B, C, H, W] in [0, 1] -> [B, classes]
  torch::Tensor forward(const torch::Tensor& x);
  /// log((1 - α)·exp(lp_s) + α·exp(lp_r)), stably. [B, K], [B, K] -> [B, K]
  torch::Tensor mix(const torch::Tensor& lp_standard, const torch::Tensor& lp_robust) const;

  double alpha() const { return alpha_; }
  void set_alpha(double alpha);
  MoeImpl& standard() { return *standard_; }
  MoeImpl& robust() { return *robust_; }
  const MoeImpl& standard() const { return *standard_; }
  const MoeImpl& robust() const { return *robust_; }

 private:
  Moe standard_, robust_;
  double alpha_;
};
TORCH_MODULE(Dual);

/// Attack subject of a dual-model: component attacks act on both members at once
/// (RA-E freezes both routings, RA-R attacks both routers).
AttackSubject attack_subject(DualImpl& dual);

}  // namespace moecert
