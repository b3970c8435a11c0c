// Certified training (SPEC §2 `ibp`, `crown-ibp`): κ·CE(F(x), y) + (1 − κ)·CE(z, y),
// z the worst-case logits of the bound over the ε-ball (Gowal et al. 2018; Zhang et
// al., ICLR 2020), with ε, κ and CROWN-IBP's β on the schedule of CertifiedConfig.
// For a top-1 MoE the bound is the worst case over every expert the router can
// select on the ball (include/moecert/train_bounds.h); docs/training.md
// "Certified training".
#include "moecert/error.h"
#include "moecert/train_bounds.h"
#include "moecert/training.h"

#include <torch/torch.h>

#include <algorithm>
#include <iomanip>
#include <sstream>

namespace moecert {

CertifiedPoint certified_schedule(const TrainConfig& cfg, int64_t step, int64_t total) {
  const auto& c = cfg.certified;
  const bool crown = cfg.method == "crown-ibp";
  const double target = c.eps >= 0 ? c.eps : cfg.attack.eps;
  const double kappa_end = c.kappa_end >= 0 ? c.kappa_end : (crown ? 0.0 : 0.5);
  const double epochs = static_cast<double>(cfg.epochs);
  const double warmup = c.warmup >= 0 ? c.warmup : 0.05 * epochs, ramp = c.ramp >= 0 ? c.ramp : 0.25 * epochs;
  // The step in epochs, and the progress through the ramp in [0, 1] (0 at its first step).
  const double t = total > 0 ? static_cast<double>(step) * epochs / static_cast<double>(total) : epochs;
  double p = 1.0;
  if (t < warmup) p = -1.0;  // warm-up: ε = 0
  else if (ramp > 0) p = std::min(1.0, (t - warmup) / ramp);
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

namespace {

/// `ibp` / `crown-ibp`.
class CertifiedTraining : public TrainMethod {
 public:
  explicit CertifiedTraining(bool crown) : crown_(crown) {}
  std::string name() const override { return crown_ ? "crown-ibp" : "ibp"; }
  void at_step(int64_t step, int64_t total) override { step_ = step, total_ = total; }

  StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                 const TrainConfig& cfg) override {
    const ModelSpec& spec = model.spec();
    if (spec.experts > 1 && (spec.routing != Routing::top_k || spec.top_k != 1))  // at step 1, not after the warm-up
      throw ConfigError("certified training: the model routes " +
                        std::string(spec.routing == Routing::soft ? "softly" : "to its top " + std::to_string(spec.top_k)) +
                        "; ibp / crown-ibp train top-1 routing and dense models (E = 1)");
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
      auto m = moe_certified_margins(model, x, y, eps, at.beta, cfg.certified.box);
      // CE of the worst-case logits z: z_y = 0, z_k = −(lower bound of h_y − h_k).
      auto z = torch::cat({torch::zeros({x.size(0), 1}, m.margin.options()), -m.margin}, 1);
      auto robust = (torch::logsumexp(z, 1)).mean();
      s.loss = s.loss + (1 - at.kappa) * robust;
      s.checked.emplace_back("certified margins", m.margin.detach());
      if (cfg.certified.route_margin > 0 && m.route_gap.defined())
        s.loss = s.loss + cfg.certified.route_margin * torch::relu(-m.route_gap).mean();
      s.adv_correct = m.margin.detach().amin(1).gt(0).sum().item<int64_t>();
    }
    s.checked.emplace_back("training loss", s.loss.detach());
    s.checked.emplace_back("log F (clean)", out.log_probs.detach());
    if (out.routing.logits.defined()) {
      s.checked.emplace_back("router logits (clean)", out.routing.logits.detach());
      if (cfg.balance > 0) s.loss = s.loss + cfg.balance * load_balance_loss(out.routing.logits);
    }
    std::ostringstream note;
    note << std::fixed << std::setprecision(4) << "eps " << at.eps << std::setprecision(3) << "  kappa "
         << at.kappa;
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
