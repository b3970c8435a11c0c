// The two learners: a single MoE under one TrainMethod, and JTDMoE's bi-level
// alternating updates of a dual-model (paper 1, SPEC §2).
#include "learner.h"
#include "moecert/error.h"
#include "moecert/train_bounds.h"

namespace moecert {

std::unique_ptr<torch::optim::Optimizer> optimizer_make(std::vector<torch::Tensor> params,
                                                        const TrainConfig& c) {
  if (c.optimizer == "sgd")
    return std::make_unique<torch::optim::SGD>(
        std::move(params),
        torch::optim::SGDOptions(c.lr).momentum(c.momentum).weight_decay(c.weight_decay));
  return std::make_unique<torch::optim::Adam>(
      std::move(params), torch::optim::AdamOptions(c.lr).weight_decay(c.weight_decay));
}

namespace {

/// Applies --router-train to a MoE: sets its router gradient, or (none) freezes its
/// router for the whole run; returns the parameters its optimizer updates.
std::vector<torch::Tensor> router_policy(MoeImpl& model, const TrainConfig& c,
                                         std::vector<std::unique_ptr<FrozenParameters>>& hold) {
  if (c.router_train != "none") {
    model.set_router_gradient(router_gradient_parse(c.router_train));
    return unique_tensors(model.parameters());
  }
  hold.push_back(std::make_unique<FrozenParameters>(model.router_parameters()));
  return model.expert_parameters();
}

/// --route-margin: adds w·mean(max(0, −gap)) at the method's current radius (nothing
/// while it is 0, as in certified training's warm-up).
void add_route_margin(StepStats& s, MoeImpl& model, const torch::Tensor& x, const TrainConfig& cfg,
                      const TrainMethod& method) {
  const double eps = method.route_eps(cfg);
  if (!(cfg.route_margin > 0 && eps > 0)) return;
  auto gap =
      route_gap_lower(model, x, torch::full({x.size(0)}, eps, x.options()), cfg.certified.box);
  s.checked.emplace_back("route gap", gap.detach());
  s.loss = s.loss + cfg.route_margin * torch::relu(-gap).mean();
}

/// An optimizer and, in a data-parallel run, the reducer of its gradients (made at
/// its first step, kept for the run: its hooks stay on the parameters).
class Stepper {
 public:
  explicit Stepper(std::unique_ptr<torch::optim::Optimizer> opt) : opt_(std::move(opt)) {}
  torch::optim::Optimizer* get() const { return opt_.get(); }

  /// One optimizer step on the loss. Data-parallel: each rank's loss is scaled by its
  /// share of the global batch and the gradients summed over the group, which gives
  /// the gradient of the global batch's mean loss (docs/distributed.md).
  void apply(const StepStats& s, const TrainConfig& cfg) {
    opt_->zero_grad();
    if (cfg.group) {
      if (!reducer_ || reducer_group_ != cfg.group) {
        std::vector<torch::Tensor> params;
        for (auto& g : opt_->param_groups())
          for (auto& p : g.params()) params.push_back(p);
        reducer_.reset();
        reducer_ = std::make_unique<GradientReducer>(params, *cfg.group);
        reducer_group_ = cfg.group;
      }
      reducer_->backward(s.loss * cfg.rank_share);
    } else {
      s.loss.backward();
    }
    opt_->step();
  }

 private:
  std::unique_ptr<torch::optim::Optimizer> opt_;
  std::unique_ptr<GradientReducer> reducer_;
  const Collective* reducer_group_ = nullptr;
};

class SingleLearner : public Learner {
 public:
  SingleLearner(MoeImpl& model, const TrainConfig& cfg)
      : model_(model),
        method_(train_method_make(cfg.method)),
        opt_(optimizer_make(router_policy(model, cfg, frozen_), cfg)) {}

  torch::nn::Module& module() override { return model_; }
  std::vector<torch::optim::Optimizer*> optimizers() override { return {opt_.get()}; }
  StepStats update(const torch::Tensor& x, const torch::Tensor& y, const TrainConfig& cfg,
                   const std::function<void(const StepStats&)>& check) override {
    StepStats s = method_->step(model_, x, y, cfg);
    add_route_margin(s, model_, x, cfg, *method_);
    check(s);
    opt_.apply(s, cfg);
    return s;
  }
  void at_step(int64_t step, int64_t total) override { method_->at_step(step, total); }
  AttackSubject subject() override { return attack_subject(model_); }
  nlohmann::json manifest_fields() override { return {{"architecture", model_.spec().to_json()}}; }
  int64_t num_experts() override { return model_.num_experts(); }

 private:
  std::vector<std::unique_ptr<FrozenParameters>> frozen_;  // the router, with --router-train none
  MoeImpl& model_;
  std::unique_ptr<TrainMethod> method_;
  Stepper opt_;
};

/// AdvMoE (paper 2): per batch an experts/backbone step with the router frozen,
/// then a router step with the experts frozen, each with its own optimizer.
class AdvMoeLearner : public Learner {
 public:
  AdvMoeLearner(MoeImpl& model, const TrainConfig& cfg)
      : model_(model),
        opt_experts_(optimizer_make(model.expert_parameters(), cfg)),
        opt_router_(optimizer_make(model.router_parameters(), cfg)) {
    model.set_router_gradient(router_gradient_parse(cfg.router_train));
  }

  torch::nn::Module& module() override { return model_; }
  std::vector<torch::optim::Optimizer*> optimizers() override {
    return {opt_experts_.get(), opt_router_.get()};
  }
  StepStats update(const torch::Tensor& x, const torch::Tensor& y, const TrainConfig& cfg,
                   const std::function<void(const StepStats&)>& check) override {
    StepStats experts = advmoe_expert_step(model_, x, y, cfg);
    check(experts);
    opt_experts_.apply(experts, cfg);
    StepStats router = advmoe_router_step(model_, x, y, cfg);
    check(router);
    opt_router_.apply(router, cfg);
    return experts;  // loss and accuracies of the expert step, as a TRADES run reports them
  }
  AttackSubject subject() override { return attack_subject(model_); }
  nlohmann::json manifest_fields() override { return {{"architecture", model_.spec().to_json()}}; }
  int64_t num_experts() override { return model_.num_experts(); }

 private:
  MoeImpl& model_;
  Stepper opt_experts_, opt_router_;
};

class JtdLearner : public Learner {
 public:
  JtdLearner(DualImpl& dual, const TrainConfig& cfg)
      : dual_(dual),
        robust_method_(train_method_make(cfg.jtd_robust)),
        opt_robust_(optimizer_make(router_policy(dual.robust(), cfg, frozen_), cfg)),
        opt_standard_(optimizer_make(router_policy(dual.standard(), cfg, frozen_), cfg)) {}

  torch::nn::Module& module() override { return dual_; }
  std::vector<torch::optim::Optimizer*> optimizers() override {
    return {opt_robust_.get(), opt_standard_.get()};
  }
  StepStats update(const torch::Tensor& x, const torch::Tensor& y, const TrainConfig& cfg,
                   const std::function<void(const StepStats&)>& check) override {
    StepStats robust = jtdmoe_robust_step(dual_, x, y, cfg, robust_method_.get());
    add_route_margin(robust, dual_.robust(), x, cfg, *robust_method_);
    check(robust);
    opt_robust_.apply(robust, cfg);
    StepStats standard = jtdmoe_standard_step(dual_, x, y, cfg);
    check(standard);
    opt_standard_.apply(standard, cfg);
    // Report the dual-model's loss and accuracies; usage is the robust member's.
    standard.usage_clean = robust.usage_clean;
    standard.usage_adv = robust.usage_adv;
    return standard;
  }
  void at_step(int64_t step, int64_t total) override { robust_method_->at_step(step, total); }
  AttackSubject subject() override { return attack_subject(dual_); }
  nlohmann::json manifest_fields() override {
    return {{"kind", "dual"},
            {"alpha", dual_.alpha()},
            {"architecture",
             {{"standard", dual_.standard().spec().to_json()},
              {"robust", dual_.robust().spec().to_json()}}}};
  }
  int64_t num_experts() override { return dual_.robust().num_experts(); }

 private:
  std::vector<std::unique_ptr<FrozenParameters>> frozen_;  // routers, with --router-train none
  DualImpl& dual_;
  std::unique_ptr<TrainMethod> robust_method_;  // --jtd-robust
  Stepper opt_robust_, opt_standard_;
};

}  // namespace

StepStats jtdmoe_robust_step(DualImpl& dual, const torch::Tensor& x, const torch::Tensor& y,
                             const TrainConfig& cfg, TrainMethod* robust) {
  // F_R alone: F_S takes no part in this loss, so it gets no gradient.
  if (robust) return robust->step(dual.robust(), x, y, cfg);
  static const auto rter = train_method_make("rt-er");
  return rter->step(dual.robust(), x, y, cfg);
}

StepStats jtdmoe_standard_step(DualImpl& dual, const torch::Tensor& x, const torch::Tensor& y,
                               const TrainConfig& cfg) {
  // CE(F_D(x), y) + γ·CE(F_D(x_adv), y) with F_R frozen: its parameters do not
  // require gradients here, so the loss moves F_S only.
  FrozenParameters frozen_robust(dual.robust());
  StepStats s;
  torch::Tensor x_adv;
  if (cfg.jtd_gamma > 0) {
    dual.eval();
    FrozenParameters frozen_standard(dual.standard());
    x_adv = attack_pgd(attack_subject(dual).target(AttackTarget::whole, x), x, y, cfg.attack);
  }
  dual.train();
  auto lp = dual.forward(x);
  s.loss = torch::nll_loss(lp, y);
  s.clean_correct = attack_count_correct(lp.detach(), y);
  s.checked.emplace_back("log F_D (clean)", lp.detach());
  if (cfg.jtd_gamma > 0) {
    auto lp_adv = dual.forward(x_adv);
    s.loss = s.loss + cfg.jtd_gamma * torch::nll_loss(lp_adv, y);
    s.adv_correct = attack_count_correct(lp_adv.detach(), y);
    s.checked.emplace_back("log F_D (adversarial)", lp_adv.detach());
  }
  s.checked.emplace_back("JTDMoE standard loss", s.loss.detach());
  return s;
}

std::unique_ptr<Learner> learner_single(MoeImpl& model, const TrainConfig& cfg) {
  if (cfg.method == "jtdmoe")
    throw ConfigError("--method jtdmoe trains a dual-model: it needs two members, not one MoE");
  if (cfg.method == "advmoe") {
    if (model.num_experts() < 2)
      throw ConfigError(
          "--method advmoe alternates router and expert updates: it needs "
          "--experts >= 2 (a router)");
    return std::make_unique<AdvMoeLearner>(model, cfg);
  }
  return std::make_unique<SingleLearner>(model, cfg);
}

std::unique_ptr<Learner> learner_jtdmoe(DualImpl& dual, const TrainConfig& cfg) {
  if (cfg.method != "jtdmoe") throw ConfigError("a dual-model is trained with --method jtdmoe");
  if (cfg.jtd_robust == "rt-er" && dual.robust().num_experts() < 2)
    throw ConfigError(
        "jtdmoe: the robust member needs at least 2 experts for RT-ER (--jtd-robust rt-er)");
  return std::make_unique<JtdLearner>(dual, cfg);
}

TrainSummary train_run(MoeImpl& model, const Dataset& train, const Dataset& held_out,
                       const TrainConfig& cfg, const nlohmann::json& manifest_base,
                       torch::Device device) {
  cfg.validate();
  auto learner = learner_single(model, cfg);
  return train_loop(*learner, train, held_out, cfg, manifest_base, device);
}

TrainSummary train_dual_run(DualImpl& dual, const Dataset& train, const Dataset& held_out,
                            const TrainConfig& cfg, const nlohmann::json& manifest_base,
                            torch::Device device) {
  cfg.validate();
  auto learner = learner_jtdmoe(dual, cfg);
  return train_loop(*learner, train, held_out, cfg, manifest_base, device);
}

}  // namespace moecert
