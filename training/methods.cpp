// The training objectives of SPEC §2. Each computes one batch's loss; attacks run
// in eval mode with frozen parameters (BatchNorm statistics see only real batches,
// and no weight-gradient kernel runs inside an attack).
#include <torch/torch.h>

#include "learner.h"
#include "moecert/error.h"
#include "moecert/training.h"

namespace moecert {

torch::Tensor kl_rows(const torch::Tensor& log_p, const torch::Tensor& log_q) {
  // Σ_k p_k (log p_k − log q_k); terms with p_k = 0 contribute 0 (exp(-inf) = 0).
  return (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(/*dim=*/1);
}

torch::Tensor load_balance_loss(const torch::Tensor& router_logits, Collective* group) {
  const int64_t E = router_logits.size(1);
  auto probs = torch::softmax(router_logits, /*dim=*/1);
  auto top = probs.argmax(/*dim=*/1);
  auto share = torch::one_hot(top, E).to(probs.dtype()).mean(/*dim=*/0);  // no gradient
  if (group) {
    // Counts and rows of the whole batch: [count_0 .. count_{E-1}, rows].
    std::vector<torch::Tensor> packed{
        torch::cat({torch::one_hot(top, E).sum(/*dim=*/0),
                    torch::full({1}, router_logits.size(0), top.options())})
            .to(torch::kDouble)};
    group->all_reduce_sum(packed);
    share = (packed[0].narrow(0, 0, E) / packed[0][E]).to(probs.dtype());
  }
  return static_cast<double>(E) * (share * probs.mean(/*dim=*/0)).sum();
}

torch::Tensor expert_usage(const MoeRouting& routing, int64_t experts) {
  if (!routing.logits.defined()) return torch::full({1}, routing.selected.size(0), torch::kLong);
  return torch::bincount(routing.logits.argmax(/*dim=*/1).cpu(), /*weights=*/{}, experts);
}

torch::Tensor rter_regulariser(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                               const PgdConfig& attack) {
  const int64_t E = model.num_experts();
  if (E < 2)
    throw ConfigError("rt-er needs at least 2 experts (it regularises the second-ranked one)");
  // One batched PGD for all experts: each sample is routed to its second-ranked
  // expert (a fixed routing), so the attack on sample n is PGD against f_i alone,
  // i = its second-ranked expert; PGD's steps are per sample, so this is the
  // per-expert formulation of paper 1 run as one pass over the batch.
  MoeRouting second;
  {
    torch::NoGradGuard no_grad;
    second.selected =
        std::get<1>(model.router_logits(x).topk(2, /*dim=*/1)).narrow(1, 1, 1);  // [B, 1]
    second.log_w = torch::zeros({x.size(0), 1}, x.options());
  }
  LogProbFn f_second = [&model, &second](const torch::Tensor& in) {
    return model.forward_parts(in, in, &second).log_probs;
  };
  torch::Tensor x_adv;
  {
    const bool training = model.is_training();
    model.eval();
    FrozenParameters frozen(model);
    PgdConfig own = attack;
    own.start_stream += 1 << 20;  // starts of their own, not the whole-model attack's
    x_adv = attack_pgd(f_second, x, y, own);
    if (training) model.train();
  }
  return kl_rows(f_second(x), f_second(x_adv)).sum();
}

void finish_step(StepStats& s, const MoeOutput& out, const TrainConfig& cfg,
                 const std::string& what, bool balance) {
  s.checked.emplace_back("log F (" + what + ")", out.log_probs.detach());
  if (out.routing.logits.defined()) {
    s.checked.emplace_back("router logits (" + what + ")", out.routing.logits.detach());
    if (balance && cfg.balance > 0)
      s.loss = s.loss + cfg.balance * load_balance_loss(out.routing.logits, cfg.group);
  }
}

namespace {

/// PGD on the whole model, in eval mode with frozen parameters. With the top2 router
/// gradient the attack sees the top-2 mixture's router gradient (docs/training.md).
torch::Tensor whole_model_pgd(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                              const PgdConfig& attack) {
  model.eval();
  FrozenParameters frozen(model);
  struct Relaxed {
    MoeImpl& m;
    ~Relaxed() { m.set_attack_relaxation(false); }
  } relaxed{model};
  model.set_attack_relaxation(true);
  return attack_pgd(attack_target_fn(model, AttackTarget::whole, x), x, y, attack);
}

/// Clean accuracy and routing of a batch without gradients, in eval mode; returns
/// the clean log F(x) [B, C] (TRADES' attack target).
torch::Tensor clean_stats(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                          StepStats& s) {
  torch::NoGradGuard no_grad;
  model.eval();
  auto out = model.forward_full(x);
  s.clean_correct = attack_count_correct(out.log_probs, y);
  s.usage_clean = expert_usage(out.routing, model.num_experts());
  return out.log_probs;
}

/// `st`: CE(F(x), y) on log F.
class StandardTraining : public TrainMethod {
 public:
  std::string name() const override { return "st"; }
  StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                 const TrainConfig& cfg) override {
    model.train();
    auto out = model.forward_full(x);
    StepStats s;
    s.loss = torch::nll_loss(out.log_probs, y);
    s.checked.emplace_back("training loss", s.loss.detach());
    s.clean_correct = attack_count_correct(out.log_probs.detach(), y);
    s.usage_clean = expert_usage(out.routing, model.num_experts());
    finish_step(s, out, cfg, "clean");
    return s;
  }
};

/// `at`: Madry adversarial training, CE(F(x_adv), y); `rt-er` adds RT-ER's
/// regulariser β/B · Σ KL on each sample's second-ranked expert (paper 1).
class AdversarialTraining : public TrainMethod {
 public:
  explicit AdversarialTraining(bool rter) : rter_(rter) {}
  std::string name() const override { return rter_ ? "rt-er" : "at"; }
  StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                 const TrainConfig& cfg) override {
    auto x_adv = whole_model_pgd(model, x, y, cfg.attack);
    StepStats s;
    clean_stats(model, x, y, s);
    model.train();
    auto out = model.forward_full(x_adv);
    s.loss = torch::nll_loss(out.log_probs, y);
    if (rter_) {
      auto reg = rter_regulariser(model, x, y, cfg.attack);
      s.checked.emplace_back("RT-ER regulariser", reg.detach());
      s.loss = s.loss + cfg.beta / static_cast<double>(x.size(0)) * reg;
    }
    s.checked.emplace_back("training loss", s.loss.detach());
    s.adv_correct = attack_count_correct(out.log_probs.detach(), y);
    s.usage_adv = expert_usage(out.routing, model.num_experts());
    finish_step(s, out, cfg, "adversarial");
    return s;
  }

 private:
  bool rter_;
};

/// `trades`: CE(F(x), y) + β · KL(F(x) || F(x_adv)), x_adv maximising that KL.
class TradesTraining : public TrainMethod {
 public:
  std::string name() const override { return "trades"; }
  StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                 const TrainConfig& cfg) override {
    StepStats s;
    const torch::Tensor target = clean_stats(model, x, y, s);  // leaves eval mode on
    torch::Tensor x_adv;
    {
      FrozenParameters frozen(model);
      PerSampleLoss kl = [&target](const torch::Tensor& lp) { return kl_rows(target, lp); };
      x_adv = attack_pgd_objective(attack_target_fn(model, AttackTarget::whole, x), x, kl,
                                   cfg.attack, y);
    }
    model.train();
    auto clean = model.forward_full(x);
    auto adv = model.forward_full(x_adv);
    auto kl = kl_rows(clean.log_probs, adv.log_probs).mean();  // batchmean, as in TRADES
    s.loss = torch::nll_loss(clean.log_probs, y) + cfg.beta * kl;
    s.checked.emplace_back("training loss", s.loss.detach());
    s.adv_correct = attack_count_correct(adv.log_probs.detach(), y);
    s.usage_adv = expert_usage(adv.routing, model.num_experts());
    finish_step(s, clean, cfg, "clean");
    finish_step(s, adv, cfg, "adversarial", /*balance=*/false);
    return s;
  }
};

/// The TRADES loss CE(F(x), y) + β·KL(F(x) || F(x_adv)) of one AdvMoE step.
StepStats advmoe_trades(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& x_adv,
                        const torch::Tensor& y, const TrainConfig& cfg, StepStats s, bool balance) {
  model.train();
  auto clean = model.forward_full(x);
  auto adv = model.forward_full(x_adv);
  s.loss = torch::nll_loss(clean.log_probs, y) +
           cfg.beta * kl_rows(clean.log_probs, adv.log_probs).mean();
  s.checked.emplace_back("training loss", s.loss.detach());
  s.adv_correct = attack_count_correct(adv.log_probs.detach(), y);
  s.usage_adv = expert_usage(adv.routing, model.num_experts());
  finish_step(s, clean, cfg, "clean", balance);
  finish_step(s, adv, cfg, "adversarial", /*balance=*/false);
  return s;
}

void advmoe_require_router(MoeImpl& model) {
  if (model.num_experts() < 2)
    throw ConfigError(
        "advmoe alternates router and expert updates: it needs a model with a router "
        "(--experts >= 2)");
}

}  // namespace

torch::Tensor advmoe_attack(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                            const TrainConfig& cfg, StepStats& s) {
  advmoe_require_router(model);
  torch::Tensor lp_clean, la_clean;
  {
    torch::NoGradGuard no_grad;
    model.eval();
    auto out = model.forward_full(x);
    lp_clean = out.log_probs;
    la_clean = torch::log_softmax(out.routing.logits, /*dim=*/1);
    s.clean_correct = attack_count_correct(lp_clean, y);
    s.usage_clean = expert_usage(out.routing, model.num_experts());
  }
  const int64_t C = lp_clean.size(1), E = la_clean.size(1);
  FrozenParameters frozen(model);
  // The map returns [log F | log a] side by side so one PGD run sees both terms.
  LogProbFn both = [&model](const torch::Tensor& in) {
    auto out = model.forward_full(in);
    return torch::cat({out.log_probs, torch::log_softmax(out.routing.logits, 1)}, /*dim=*/1);
  };
  PerSampleLoss kl = [&](const torch::Tensor& z) {
    return kl_rows(lp_clean, z.narrow(1, 0, C)) + kl_rows(la_clean, z.narrow(1, C, E));
  };
  return attack_pgd_objective(both, x, kl, cfg.attack);  // no labels: keep the highest KL
}

StepStats advmoe_expert_step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                             const TrainConfig& cfg) {
  StepStats s;
  auto x_adv = advmoe_attack(model, x, y, cfg, s);
  FrozenParameters frozen_router(model.router_parameters());
  return advmoe_trades(model, x, x_adv, y, cfg, std::move(s), /*balance=*/false);
}

StepStats advmoe_router_step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                             const TrainConfig& cfg) {
  StepStats s;
  TrainConfig fresh = cfg;
  fresh.attack.start_stream += 1 << 21;  // a fresh x_adv: not the expert step's starts
  auto x_adv = advmoe_attack(model, x, y, fresh, s);
  FrozenParameters frozen_experts(model.expert_parameters());
  return advmoe_trades(model, x, x_adv, y, cfg, std::move(s), /*balance=*/true);
}

const std::vector<MethodEntry>& train_method_registry() {
  static const std::vector<MethodEntry> table{
      {"st", "standard training (clean cross-entropy)", false, false,
       [] { return std::unique_ptr<TrainMethod>(std::make_unique<StandardTraining>()); }},
      {"at", "adversarial training on PGD examples (Madry et al.)", false, true,
       [] { return std::unique_ptr<TrainMethod>(std::make_unique<AdversarialTraining>(false)); }},
      {"trades", "TRADES: clean CE + beta KL(clean || adversarial)", false, true,
       [] { return std::unique_ptr<TrainMethod>(std::make_unique<TradesTraining>()); }},
      {"rt-er", "paper 1's robust training with expert regularisation", false, true,
       [] { return std::unique_ptr<TrainMethod>(std::make_unique<AdversarialTraining>(true)); }},
      {"advmoe", "paper 2's AdvMoE: alternating TRADES steps of experts and router", false, false,
       nullptr},
      {"jtdmoe", "paper 1's joint training of a dual-model (standard + robust member)", false,
       false, nullptr},
      {"ibp", "certified training with IBP bounds (Gowal et al.)", true, true,
       [] { return certified_method_make(/*crown=*/false); }},
      {"crown-ibp", "certified training with CROWN-IBP bounds (Zhang et al.)", true, true,
       [] { return certified_method_make(/*crown=*/true); }},
  };
  return table;
}

std::string train_method_names(bool members_only) {
  std::string out;
  for (const auto& m : train_method_registry())
    if (!members_only || m.jtd_member) out += (out.empty() ? "" : " | ") + std::string(m.name);
  return out;
}

const MethodEntry& train_method_find(const std::string& name, const char* option) {
  for (const auto& m : train_method_registry())
    if (name == m.name) return m;
  throw ConfigError::invalid(option, name, train_method_names());
}

std::unique_ptr<TrainMethod> train_method_make(const std::string& name) {
  const auto& m = train_method_find(name, "--method");
  if (!m.make)
    throw ConfigError::invalid("--method", name,
                               "a per-batch method (" + train_method_names(true) + " | st); " +
                                   name + " runs its own loop");
  return m.make();
}

}  // namespace moecert
