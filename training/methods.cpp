// The training objectives of SPEC §2. Each computes one batch's loss.
#include "moecert/error.h"
#include "moecert/training.h"

#include <torch/torch.h>

namespace moecert {
namespace {

/// `st`: CE(F(x), y) on log F.
class StandardTraining : public TrainMethod {
 public:
  std::string name() const override { return "st"; }
  StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                 const TrainConfig&) override {
    model.train();
    auto log_probs = model.forward(x);
    StepStats s;
    s.loss = torch::nll_loss(log_probs, y);
    s.clean_correct = attack_count_correct(log_probs.detach(), y);
    return s;
  }
};

/// `at`: Madry adversarial training, CE(F(x_adv), y) with x_adv = PGD on F. The
/// attack runs in eval mode so that BatchNorm statistics see only real batches.
class AdversarialTraining : public TrainMethod {
 public:
  std::string name() const override { return "at"; }
  StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                 const TrainConfig& cfg) override {
    model.eval();
    torch::Tensor x_adv = attack_pgd(attack_target_fn(model, AttackTarget::whole, x), x, y, cfg.attack);
    StepStats s;
    {
      torch::NoGradGuard no_grad;
      s.clean_correct = attack_count_correct(model.forward(x), y);
    }
    model.train();
    auto log_probs = model.forward(x_adv);
    s.loss = torch::nll_loss(log_probs, y);
    s.adv_correct = attack_count_correct(log_probs.detach(), y);
    return s;
  }
};

}  // namespace

std::unique_ptr<TrainMethod> train_method_make(const std::string& name) {
  if (name == "st") return std::make_unique<StandardTraining>();
  if (name == "at") return std::make_unique<AdversarialTraining>();
  throw ConfigError::invalid("--method", name, "st | at");
}

}  // namespace moecert
