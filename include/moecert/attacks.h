// Empirical attacks (SPEC §3): PGD (L-inf, L2) with random start and restarts,
// FGSM, and the component attacks of paper 1: RA-E (routing frozen at the clean
// choice, experts attacked) and RA-R (router attacked, experts see the clean input).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "moecert/data.h"
#include "moecert/models.h"

namespace moecert {

enum class Norm { linf, l2 };
enum class AttackLoss { ce, margin };

/// "inf" | "2" -> Norm; throws ConfigError.
Norm norm_parse(const std::string& s);
std::string norm_name(Norm n);
/// "ce" | "margin" -> AttackLoss; throws ConfigError.
AttackLoss attack_loss_parse(const std::string& s);

struct PgdConfig {
  Norm norm = Norm::linf;
  double eps = 0.1;
  double step_size = 0.025;  ///< absolute step (L-inf: per pixel; L2: Euclidean length)
  int steps = 20;            ///< 0 with random_start=false is a no-op
  int restarts = 1;          ///< independent random starts; the strongest is kept per sample
  bool random_start = true;
  AttackLoss loss = AttackLoss::ce;
  bool box = true;  ///< project onto [0, 1] too (false: the whole ball, as `certify --no-box`)
  /// Per-sample seeds of the random starts (RowSampler, restart r on stream
  /// start_stream + 2r), one per row of the batch: a sample's start depends on its
  /// seed only, not on the batch it is in (training: on seed, epoch and index, so a
  /// run split over ranks draws what one process draws). Empty: the global generator.
  std::vector<uint64_t> start_seeds;
  uint64_t start_stream = 0;
};

/// A differentiable map x [B, C, H, W] -> log-probabilities [B, K].
using LogProbFn = std::function<torch::Tensor(const torch::Tensor& x)>;

/// PGD: maximises the loss of `f` at (x, y) inside the ε-ball around x and the
/// [0, 1] box (unless cfg.box is false). Per sample, keeps the first restart that misclassifies (or
/// the highest loss). x: [B, C, H, W], y: [B] -> x_adv [B, C, H, W] (detached)
torch::Tensor attack_pgd(const LogProbFn& f, const torch::Tensor& x, const torch::Tensor& y,
                         const PgdConfig& cfg);

/// A per-sample objective for PGD to maximise. log-probs [B, K] -> [B]
using PerSampleLoss = std::function<torch::Tensor(const torch::Tensor& log_probs)>;

/// PGD on an arbitrary objective (e.g. TRADES' KL). With labels `y` (may be
/// undefined) restarts prefer misclassifying points; otherwise the higher loss.
torch::Tensor attack_pgd_objective(const LogProbFn& f, const torch::Tensor& x,
                                   const PerSampleLoss& loss, const PgdConfig& cfg,
                                   const torch::Tensor& y = {});

/// FGSM: one signed-gradient (L-inf) or normalised-gradient (L2) step of size eps.
torch::Tensor attack_fgsm(const LogProbFn& f, const torch::Tensor& x, const torch::Tensor& y,
                          Norm norm, double eps);

/// Marks a module's parameters as not requiring gradients for its lifetime, so
/// that an attack's backward passes skip every weight-gradient kernel.
class FrozenParameters {
 public:
  explicit FrozenParameters(torch::nn::Module& module);
  explicit FrozenParameters(const std::vector<torch::Tensor>& parameters);
  ~FrozenParameters();
  FrozenParameters(const FrozenParameters&) = delete;
  FrozenParameters& operator=(const FrozenParameters&) = delete;

 private:
  std::vector<torch::Tensor> frozen_;
};

/// What a component attack perturbs.
enum class AttackTarget {
  whole,    ///< RA: the whole model sees x_adv
  experts,  ///< RA-E: routing frozen at the clean input's choice, experts see x_adv
  router,   ///< RA-R: router sees x_adv, experts see the clean input
};

/// The log-prob map that an attack of kind `target` differentiates, for a batch
/// whose clean input is `x_clean` [B, C, H, W].
LogProbFn attack_target_fn(MoeImpl& model, AttackTarget target, const torch::Tensor& x_clean);

/// A named per-sample objective to maximise at x [B, ...] -> [B], built for a batch's
/// labels, whose high values mean a misclassified point (MoE-aware attack runs).
struct AwareObjective {
  std::string name;
  std::function<torch::Tensor(const torch::Tensor& x)> f;
};

/// What a robustness evaluation attacks: the module (for eval mode and frozen
/// parameters), the log-prob map of each component attack, whether it routes, and
/// the MoE-aware objectives for labels y (route-aware per expert of a top-k router;
/// per member of a dual-model; none for a dense model).
struct AttackSubject {
  torch::nn::Module* module = nullptr;
  std::function<LogProbFn(AttackTarget, const torch::Tensor& x_clean)> target;
  bool has_router = false;
  std::function<std::vector<AwareObjective>(const torch::Tensor& y)> aware;
  /// The routing whose health is reported: x -> [B] int64 index of each sample's
  /// top-ranked expert (a dual-model: its robust member's). Empty without a router.
  std::function<torch::Tensor(const torch::Tensor& x)> route;
  int64_t experts = 1;  ///< number of experts `route` chooses from
};

/// Route-aware objectives of a MoE with top-k routing (k < E), one per expert j:
/// while j is not among the selected, raise its router logit over the k-th largest
/// other (g_j − g_(k), minus a constant 1e3 that ranks every routed point above every
/// unrouted one); once it is, lower the class margin of `whole` (the model under
/// attack, which then routes through j). Empty for other routings.
std::vector<AwareObjective> route_aware_objectives(MoeImpl& model, const LogProbFn& whole,
                                                   const torch::Tensor& y,
                                                   const std::string& prefix);

/// The attack subject of a single MoE (or dense model).
AttackSubject attack_subject(MoeImpl& model);

/// Accuracy of `f` on (x, y): fraction of argmax == y. x: [B, ...], y: [B]
int64_t attack_count_correct(const torch::Tensor& log_probs, const torch::Tensor& y);

/// Samples per expert (by top-ranked router expert) on clean inputs and at the
/// attack's points; empty vectors for a model without a router.
struct ExpertUsage {
  std::vector<int64_t> clean, adversarial;
  /// Largest share of one expert over both; 0 when empty.
  double max_share() const;
  /// Index of the expert with the largest share and which set it is in ("clean" or
  /// "adversarial"); {-1, ""} when empty.
  std::pair<int64_t, std::string> argmax_share() const;
  /// Shares as fractions, per set.
  static std::vector<double> shares(const std::vector<int64_t>& counts);
  /// Shares as text, "0.25/0.31/0.22/0.22".
  static std::string text(const std::vector<double>& shares);
  /// The routing health gate: "" when no expert takes more than `limit` (or limit >= 1
  /// or no router), else "routing health: expert i takes X% of the <where> <set>
  /// samples, more than --max-expert-share L%".
  std::string share_violation(double limit, const std::string& where) const;
  /// The dead-expert gate: "" when every expert takes at least `floor` of both sets (or
  /// floor <= 0 or no router), else "routing health: expert i takes X% of the <where>
  /// <set> samples, less than --min-expert-share F%" for the first expert below it.
  std::string floor_violation(double floor, const std::string& where) const;
};

/// Robust accuracies on a data set.
struct RobustnessReport {
  double sa = 0, ra = 0, ra_e = 0, ra_r = 0;  ///< fractions in [0, 1]
  int64_t samples = 0;
  double seconds = 0;
  ExpertUsage usage;
};

/// Evaluates SA and RA (and RA-E, RA-R if `components` and the subject routes;
/// for a dense model they equal RA by definition) on `data` in batches, in eval
/// mode. Progress on stderr when `progress`.
RobustnessReport attack_evaluate(const AttackSubject& subject, const Dataset& data,
                                 const PgdConfig& cfg, bool components, int64_t batch_size,
                                 torch::Device device, bool progress);
/// The same for a single MoE.
RobustnessReport attack_evaluate(MoeImpl& model, const Dataset& data, const PgdConfig& cfg,
                                 bool components, int64_t batch_size, torch::Device device,
                                 bool progress);

}  // namespace moecert
