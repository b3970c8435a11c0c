#include "moecert/dual.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "moecert/error.h"

namespace moecert {

DualImpl::DualImpl(Moe standard, Moe robust, double alpha)
    : standard_(register_module("standard", std::move(standard))),
      robust_(register_module("robust", std::move(robust))),
      alpha_(0) {
  const auto &s = standard_->spec(), &r = robust_->spec();
  if (s.in_channels != r.in_channels || s.height != r.height || s.width != r.width ||
      s.num_classes != r.num_classes)
    throw ConfigError("dual: the standard and robust models differ in input shape or classes");
  set_alpha(alpha);
}

void DualImpl::set_alpha(double alpha) {
  if (!(alpha >= 0.0 && alpha <= 1.0))
    throw ConfigError::invalid("--alpha", std::to_string(alpha), "a number in [0, 1]");
  alpha_ = alpha;
}

torch::Tensor DualImpl::mix(const torch::Tensor& lp_s, const torch::Tensor& lp_r) const {
  if (alpha_ == 0.0) return lp_s;
  if (alpha_ == 1.0) return lp_r;
  return torch::logaddexp(lp_s + std::log1p(-alpha_), lp_r + std::log(alpha_));
}

torch::Tensor DualImpl::forward(const torch::Tensor& x) {
  if (alpha_ == 1.0) return robust_->forward(x);  // F_S has weight 0: not computed
  if (alpha_ == 0.0) return standard_->forward(x);
  return mix(standard_->forward(x), robust_->forward(x));
}

AttackSubject attack_subject(DualImpl& dual) {
  AttackSubject s;
  s.module = &dual;
  s.has_router = dual.standard().num_experts() > 1 || dual.robust().num_experts() > 1;
  s.target = [&dual](AttackTarget t, const torch::Tensor& x) -> LogProbFn {
    auto fs = attack_target_fn(dual.standard(), t, x);
    auto fr = attack_target_fn(dual.robust(), t, x);
    return [&dual, fs, fr](const torch::Tensor& xx) {
      if (dual.alpha() == 1.0) return fr(xx);
      if (dual.alpha() == 0.0) return fs(xx);
      return dual.mix(fs(xx), fr(xx));
    };
  };
  // Each member's class margin (the mixture is the whole model), and route-aware runs
  // through each member's router judged by the mixture.
  s.aware = [&dual](const torch::Tensor& y) {
    std::vector<AwareObjective> out;
    auto margin_loss = [y](const torch::Tensor& lp) {
      auto zy = lp.gather(1, y.unsqueeze(1)).squeeze(1);
      return std::get<0>(
                 lp.scatter(1, y.unsqueeze(1), -std::numeric_limits<float>::infinity()).max(1)) -
             zy;
    };
    out.push_back({"member-standard", [&dual, margin_loss](const torch::Tensor& x) {
                     return margin_loss(dual.standard().forward(x));
                   }});
    out.push_back({"member-robust", [&dual, margin_loss](const torch::Tensor& x) {
                     return margin_loss(dual.robust().forward(x));
                   }});
    LogProbFn whole = [&dual](const torch::Tensor& x) { return dual.forward(x); };
    for (auto& o : route_aware_objectives(dual.standard(), whole, y, "standard-"))
      out.push_back(std::move(o));
    for (auto& o : route_aware_objectives(dual.robust(), whole, y, "robust-"))
      out.push_back(std::move(o));
    return out;
  };
  MoeImpl* routed = dual.robust().num_experts() > 1     ? &dual.robust()
                    : dual.standard().num_experts() > 1 ? &dual.standard()
                                                        : nullptr;
  if (routed) {
    s.experts = routed->num_experts();
    s.route = [routed](const torch::Tensor& x) {
      return routed->router_logits(x).argmax(/*dim=*/1);
    };
  }
  return s;
}

}  // namespace moecert
