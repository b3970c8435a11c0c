// Training methods (SPEC §2) and the epoch loop with progress, per-epoch
// evaluation, atomic checkpoints and exact resume.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moecert/attacks.h"
#include "moecert/data.h"
#include "moecert/distributed.h"
#include "moecert/dual.h"
#include "moecert/models.h"

namespace moecert {

/// Certified training's schedule (SPEC §2 `ibp`, `crown-ibp`; docs/training.md
/// "Certified training"): ε stays 0 for the warm-up, then ε rises linearly to its
/// target, κ from kappa_start to kappa_end and CROWN-IBP's β from 1 to 0 over the
/// ramp; all three hold their end values after it. Lengths are in epochs (fractions
/// allowed) counted in steps, so a run resumed with more --epochs sees the same
/// values at the same step.
struct CertifiedConfig {
  double eps = -1;           ///< training radius (L∞); < 0: the attack's --eps
  double warmup = -1;        ///< epochs at ε = 0; < 0: 5% of --epochs (Zhang et al.: 10 of 200)
  double ramp = -1;          ///< epochs of the ramp; < 0: 25% of --epochs (Zhang et al.: 50 of 200)
  double kappa_start = 1.0;  ///< weight of the clean loss at the ramp's start
  double kappa_end =
      -1;  ///< and after it; < 0: the method's published value (ibp 0.5, crown-ibp 0)
  /// The bound's margins are trained past this many logits: the robust term is
  /// CE(z, y) with z_k = τ − m_k (0: Gowal et al.'s worst-case logits). A dual-model
  /// at α certifies where F_R's probability margin exceeds c = (1 − α)/α; margins
  /// above ln((1 + (K − 1)c) / (1 − c)) ensure it (1.47 for α = 0.8, K = 10).
  double cert_margin = 0;
  bool box = true;  ///< bound B_∞(x, ε) ∩ [0, 1]^d (false: the whole ball)
};

/// The schedule's values at one step.
struct CertifiedPoint {
  double eps = 0, kappa = 1, beta = 0;
};

struct TrainConfig {
  std::string method =
      "at";  ///< st | at | trades | rt-er | advmoe | jtdmoe (dual-model) | ibp | crown-ibp
  double jtd_gamma = 0.0;  ///< JTDMoE: weight of CE(F_D(x_adv)) in the F_S step (0 = paper)
  /// JTDMoE: the method of the F_R step: rt-er (paper 1) | at | trades | ibp | crown-ibp
  /// (certified training of the robust member, on its ε/κ schedule).
  std::string jtd_robust = "rt-er";
  /// Weight w of the route-margin term w·mean(max(0, −gap)), gap a lower bound of the
  /// clean top-k choice's lead on the ball (train_bounds.h route_gap_lower) at the
  /// method's radius: --eps, or certified training's scheduled ε. 0 = off.
  double route_margin = 0;
  double beta = 6.0;            ///< TRADES / RT-ER regulariser weight (papers' default)
  double balance = 0.3;         ///< weight of the load-balancing loss (0 = off; docs/training.md)
  double collapse_share = 0.9;  ///< warn when one expert takes more of the samples
  /// Health gate: after the last epoch, exit 1 when one expert takes more than this
  /// share of the held-out samples, clean or adversarial (1 = off).
  double max_expert_share = 1.0;
  /// How the router learns: top2 | straight-through (RouterGradient) | none (kept at its
  /// initialisation, as paper 1's code does).
  std::string router_train = "top2";
  int epochs = 10;
  int64_t batch_size = 128;
  std::string optimizer = "adam";  ///< adam | sgd
  double lr = 1e-3;
  double momentum = 0.9;  ///< SGD only
  double weight_decay = 0.0;
  std::string schedule = "cosine";  ///< cosine (per step) | step (per epoch) | constant
  std::vector<int> milestones;      ///< epochs at which `step` multiplies lr by gamma
  double gamma = 0.1;
  uint64_t seed = 0;
  Augment augment;            ///< random crop / flip of training images (none by default)
  PgdConfig attack;           ///< the training attack (at)
  PgdConfig eval_attack;      ///< the per-epoch held-out attack
  int log_every = 50;         ///< progress line every N steps (0 = never)
  std::string out_dir;        ///< checkpoint directory (empty = none)
  bool resume = false;        ///< continue from out_dir's train_state.pt
  bool keep_best = false;     ///< also keep the best-RA epoch in `<out_dir>-best`
  CertifiedConfig certified;  ///< ibp / crown-ibp
  /// Data-parallel runs: BatchNorm with the global batch's statistics (--sync-bn;
  /// default: each rank's own, as PyTorch's DDP). No effect in one process.
  bool sync_bn = false;
  /// Data-parallel training (docs/distributed.md), set by the epoch loop, not options:
  /// the group whose ranks share each global batch (null: one process), and this
  /// rank's share of the batch it is training on (its loss is scaled by it before
  /// the gradients are summed over the group).
  Collective* group = nullptr;
  double rank_share = 1.0;

  nlohmann::json to_json() const;
  void validate() const;  ///< throws ConfigError naming the option
};

/// Statistics of one training step.
struct StepStats {
  torch::Tensor loss;         ///< scalar, differentiable
  int64_t clean_correct = 0;  ///< -1 if not measured
  int64_t adv_correct = -1;   ///< -1 if the method has no adversarial pass
  torch::Tensor usage_clean;  ///< [E] int64 samples whose top expert is i (clean input)
  torch::Tensor usage_adv;    ///< [E] int64 the same on the adversarial input (if any)
  /// Tensors that must be finite (losses, logits, router scores), by name.
  std::vector<std::pair<std::string, torch::Tensor>> checked;
  std::string note;  ///< appended to the progress line (certified training: ε, κ, β)
};

/// One training objective; `step` computes the loss of one batch.
class TrainMethod {
 public:
  virtual ~TrainMethod() = default;
  virtual std::string name() const = 0;
  /// x: [B, C, H, W] in [0, 1], y: [B] -> loss and counts. Leaves `model` in train mode.
  virtual StepStats step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                         const TrainConfig& cfg) = 0;
  /// Called before each step with the run's global step (0-based) and total steps.
  virtual void at_step(int64_t step, int64_t total) {}
  /// The L∞ radius of the route-margin term at the current step (--route-margin).
  virtual double route_eps(const TrainConfig& cfg) const { return cfg.attack.eps; }
};

/// The certified-training schedule at global step `step` of `total` = steps per
/// epoch × cfg.epochs (method ibp or crown-ibp: κ's default end and whether β
/// ramps). CertifiedConfig describes it.
CertifiedPoint certified_schedule(const TrainConfig& cfg, int64_t step, int64_t total);

/// Certified training's robust term for a mixture (soft or top-k > 1 routing): with
/// p_k <= F_y − F_k on the ball (prob_margin [B, K − 1]), F_y >= q = (1 + Σ_k p_k)/K,
/// so −log q bounds the CE of every point of the ball; below q = 0.05 the tangent of
/// −log continues it (finite and decreasing for vacuous bounds). Equals CE(F(x), y) at
/// ε = 0, where the bounds are exact. -> [B]
torch::Tensor mixture_loss(const torch::Tensor& prob_margin, int64_t classes);

/// KL(P || Q) per row from log-probabilities. log_p, log_q: [B, K] -> [B]
torch::Tensor kl_rows(const torch::Tensor& log_p, const torch::Tensor& log_q);

/// Switch-style load-balancing loss E * sum_i share_i * mean_prob_i, where share_i
/// is the fraction of samples whose top expert is i and mean_prob_i the mean router
/// probability of i. Equals 1 for a perfectly balanced router. With a `group`, share_i
/// is the global batch's (its counts summed over the ranks; it carries no gradient),
/// so the rank-share-weighted sum of the ranks' gradients is one process's.
/// logits: [B, E] -> scalar
torch::Tensor load_balance_loss(const torch::Tensor& router_logits, Collective* group = nullptr);

/// RT-ER's regulariser (paper 1): sum over experts i and over the samples n whose
/// second-ranked router expert is i of KL(f_i(x_n) || f_i(x_adv_n^(i))), with
/// x_adv^(i) from PGD against expert i alone. Summed, not averaged. x: [B, C, H, W]
torch::Tensor rter_regulariser(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                               const PgdConfig& attack);

/// Samples per expert by top routing choice. routing.selected: [B, k] -> [E] int64
torch::Tensor expert_usage(const MoeRouting& routing, int64_t experts);

/// JTDMoE step (1): the loss of the robust member F_R under `robust` (F_S takes no
/// part); nullptr: RT-ER, the paper's step.
StepStats jtdmoe_robust_step(DualImpl& dual, const torch::Tensor& x, const torch::Tensor& y,
                             const TrainConfig& cfg, TrainMethod* robust = nullptr);
/// JTDMoE step (2): CE(F_D(x), y) + γ·CE(F_D(x_adv), y) with F_R frozen.
StepStats jtdmoe_standard_step(DualImpl& dual, const torch::Tensor& x, const torch::Tensor& y,
                               const TrainConfig& cfg);

/// AdvMoE's attack (paper 2): PGD maximising KL(F(x) || F(x')) + KL(a(x) || a(x')),
/// the output KL plus the KL of the router scores a = softmax(g), with parameters
/// frozen, in eval mode. Fills s.clean_correct and s.usage_clean. -> x_adv [B, C, H, W]
torch::Tensor advmoe_attack(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                            const TrainConfig& cfg, StepStats& s);
/// AdvMoE step (1): experts/backbone, router frozen. TRADES loss
/// CE(F(x), y) + β·KL(F(x) || F(x_adv)) with x_adv from advmoe_attack.
StepStats advmoe_expert_step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                             const TrainConfig& cfg);
/// AdvMoE step (2): router, experts frozen; the same TRADES loss on a fresh x_adv
/// (plus the optional load-balancing term), whose only gradient path is the router's.
StepStats advmoe_router_step(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                             const TrainConfig& cfg);

/// The training-method registry: every name --method takes, with its help.
struct MethodEntry {
  const char* name;
  const char* help;
  bool certified;   ///< trains against interval bounds of L∞ boxes (not --norm 2)
  bool jtd_member;  ///< may train a dual-model's robust member (--jtd-robust)
  /// The per-batch method; null for those with a loop of their own (advmoe, jtdmoe).
  std::unique_ptr<TrainMethod> (*make)();
};
const std::vector<MethodEntry>& train_method_registry();
/// "name | name | ..." of all methods, or of those that may be a --jtd-robust member.
std::string train_method_names(bool members_only = false);
/// The entry of `name`; ConfigError naming `option` and the known methods otherwise.
const MethodEntry& train_method_find(const std::string& name, const char* option);
/// A per-batch method by name; throws ConfigError naming the known methods.
std::unique_ptr<TrainMethod> train_method_make(const std::string& name);

/// What a finished (or resumed-and-finished) run reports.
struct TrainSummary {
  int start_epoch = 0;  ///< 0, or the epoch a resume continued from
  int epochs_done = 0;
  nlohmann::json history;     ///< one object per epoch (loss, train/held-out SA and RA, ...)
  double images_per_s = 0;    ///< training throughput of this process
  ExpertUsage heldout_usage;  ///< the last epoch's held-out routing (clean and attacked)
};

/// The --max-expert-share gate on a finished run: throws Error(gate_failed) naming the
/// expert and its share when one expert takes more than cfg.max_expert_share of the
/// held-out samples, clean or adversarial. No-op at 1 or without a router.
void train_check_routing_health(const TrainSummary& summary, const TrainConfig& cfg);

/// Trains `model` on `train`, evaluates on `held_out` after every epoch, and (if
/// cfg.out_dir is set) saves an atomic checkpoint after every epoch whose manifest
/// is `manifest_base` plus architecture, training config and metrics.
TrainSummary train_run(MoeImpl& model, const Dataset& train, const Dataset& held_out,
                       const TrainConfig& cfg, const nlohmann::json& manifest_base,
                       torch::Device device);

/// Trains a dual-model with JTDMoE (cfg.method == "jtdmoe"): per batch, an RT-ER
/// step of F_R, then a step of F_S on the dual-model's loss. Checkpoints are
/// dual-model checkpoints.
TrainSummary train_dual_run(DualImpl& dual, const Dataset& train, const Dataset& held_out,
                            const TrainConfig& cfg, const nlohmann::json& manifest_base,
                            torch::Device device);

}  // namespace moecert
