// Certified training (SPEC §2 `ibp`, `crown-ibp`): κ·CE(F(x), y) + (1 − κ)·CE(z, y),
// z the worst-case logits of the bound over the ε-ball (Gowal et al. 2018; Zhang et
// al., ICLR 2020), with ε, κ and CROWN-IBP's β on the schedule of CertifiedConfig.
// For a top-1 MoE the bound is the worst case over every expert the router can
// select on the ball (include/moecert/train_bounds.h); docs/training.md
// "Certified training".
#include <torch/torch.h>

#include <algorithm>
#include <iomanip>
#include <sstream>

#include "learner.h"
#include "moecert/train_bounds.h"
#include "moecert/training.h"

namespace moecert {

CertifiedPoint certified_schedule(const TrainConfig& cfg, int64_t step, int64_t total) {
  const auto& c = cfg.certified;
  // JTDMoE's robust member may be the one trained with crown-ibp (--jtd-robust).
  const bool crown =
      cfg.method == "crown-ibp" || (cfg.method == "jtdmoe" && cfg.jtd_robust == "crown-ibp");
  const double target = c.eps >= 0 ? c.eps : cfg.attack.eps;
  const double kappa_end = c.kappa_end >= 0 ? c.kappa_end : (crown ? 0.0 : 0.5);
  const double epochs = static_cast<double>(cfg.epochs);
  const double warmup = c.warmup >= 0 ? c.warmup : 0.05 * epochs,
               ramp = c.ramp >= 0 ? c.ramp : 0.25 * epochs;
  // The step in epochs, and the progress through the ramp in [0, 1] (0 at its first step).
  const double t =
      total > 0 ? static_cast<double>(step) * epochs / static_cast<double>(total) : epochs;
  double p = 1.0;
  if (t < warmup)
    p = -1.0;  // warm-up: ε = 0
  else if (ramp > 0)
    p = std::min(1.0, (t - warmup) / ramp);
  CertifiedPoint out;
  if (p < 0) {
    out.eps = 0, out.kappa = c.kappa_start, out.beta = crown ? 1.0 : 0.0;
    return out;
  }
  out.eps = p * target;
  out.kappa = c.kappa_start + p * (kappa_end - c.kappa_start);
  out.beta = crown ? 1.0 - p : 0.0;
  return out;
}

torch::Tensor mixture_loss(const torch::Tensor& prob_margin, int64_t classes) {
  // F_y − F_k >= p_k for every k != y and Σ_k F_k = 1 give F_y >= q = (1 + Σ_k p_k)/K.
  const double t = 0.05;  // below it, the tangent of −log at t (slope −1/t): finite for q <= 0
  auto q = (1.0 + prob_margin.sum(1)) / static_cast<double>(classes);
  return torch::where(q.ge(t), -torch::log(q.clamp_min(t)), std::log(1.0 / t) + (t - q) / t);
}

namespace {

/// Soft or top-k > 1 routing: the output is a mixture, bounded by the mixture form.
bool mixture(const ModelSpec& s) {
  return s.experts > 1 && (s.routing == Routing::soft || s.top_k > 1);
}

/// `ibp` / `crown-ibp`.
class CertifiedTraining : public TrainMethod {
 public:
  explicit CertifiedTraining(bool crown) : crown_(crown) {}
  std::string name() const override { return crown_ ? "crown-ibp" : "ibp"; }
  void at_step(int64_t step, int64_t total) override { step_ = step, total_ = total; }
  double route_eps(const TrainConfig& cfg) const override {
    return certified_schedule(cfg, step_, total_).eps;
  }

  StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                 const TrainConfig& cfg) override {
    const CertifiedPoint at = certified_schedule(cfg, step_, total_);
    model.train();
    auto out = model.forward_full(x);
    StepStats s;
    auto clean = torch::nll_loss(out.log_probs, y);
    s.loss = at.kappa * clean;
    s.clean_correct = attack_count_correct(out.log_probs.detach(), y);
    s.usage_clean = expert_usage(out.routing, model.num_experts());
    if (at.eps > 0) {
      auto eps = torch::full({x.size(0)}, at.eps, x.options());
      torch::Tensor robust;
      if (mixture(model.spec())) {
        auto m = moe_mixture_margins(model, x, y, eps, at.beta, cfg.certified.box);
        robust = mixture_loss(m.prob_margin, model.spec().num_classes).mean();
        s.checked.emplace_back("certified probability margins", m.prob_margin.detach());
        s.adv_correct = m.prob_margin.detach().amin(1).gt(0).sum().item<int64_t>();
      } else {
        auto m = moe_certified_margins(model, x, y, eps, at.beta, cfg.certified.box);
        // CE of the worst-case logits z: z_y = 0, z_k = τ − (lower bound of h_y − h_k).
        auto z = torch::cat({torch::zeros({x.size(0), 1}, m.margin.options()),
                             cfg.certified.cert_margin - m.margin},
                            1);
        robust = torch::logsumexp(z, 1).mean();
        s.checked.emplace_back("certified margins", m.margin.detach());
        s.adv_correct = m.margin.detach().amin(1).gt(0).sum().item<int64_t>();
      }
      s.loss = s.loss + (1 - at.kappa) * robust;
    }
    s.checked.emplace_back("training loss", s.loss.detach());
    finish_step(s, out, cfg, "clean");
    std::ostringstream note;
    note << std::fixed << std::setprecision(4) << "eps " << at.eps << std::setprecision(3)
         << "  kappa " << at.kappa;
    if (crown_) note << "  beta " << at.beta;
    s.note = note.str();
    return s;
  }

 private:
  bool crown_;
  int64_t step_ = 0, total_ = 1;
};

}  // namespace

std::unique_ptr<TrainMethod> certified_method_make(bool crown) {
  return std::make_unique<CertifiedTraining>(crown);
}

}  // namespace moecert
