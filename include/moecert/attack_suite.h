// The attack suite (SPEC §3): one projected-step engine (per-sample balls, L∞ and L2,
// the [0,1] box, a per-sample seeded sampler), attacks behind one small interface
// with a registry (one file each in src/attacks/), AutoAttack's standard composition
// run on the points still robust, and MoE-aware runs (route-aware per expert,
// member-aware for dual-models). Plain PGD (attacks.h) stays for training and as
// `--suite pgd`.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moecert/attacks.h"

namespace moecert {

/// The perturbation set of a batch: sample b may move to any point within eps[b] of
/// x[b] in the norm, inside [0,1]^d when `box`.
struct AttackBall {
  torch::Tensor x;    ///< [B, C, H, W] clean inputs
  torch::Tensor eps;  ///< [B] radii (same dtype and device as x)
  Norm norm = Norm::linf;
  bool box = true;

  /// The nearest point of each set to x_adv (the ball's projection, then the box).
  torch::Tensor project(const torch::Tensor& x_adv) const;
  /// ‖x_adv − x‖ per sample. -> [B]
  torch::Tensor distance(const torch::Tensor& x_adv) const;
  /// The balls of the samples `rows` [m].
  AttackBall subset(const torch::Tensor& rows) const;
};

/// Random numbers per sample from its own seed, independent of the other samples of
/// the batch (sharded runs reproduce unsharded ones). `stream` tells apart the draws
/// of one sample (restarts, attacks, steps).
class RowSampler {
 public:
  explicit RowSampler(std::vector<uint64_t> seeds) : seeds_(std::move(seeds)) {}
  /// Uniform in [0, 1) with the shape of `like` [B, ...] (its dtype and device).
  torch::Tensor uniform(const torch::Tensor& like, uint64_t stream) const;
  /// Standard normal with the shape of `like`.
  torch::Tensor normal(const torch::Tensor& like, uint64_t stream) const;
  /// A random point of each ball (L∞: uniform in the cube; L2: uniform direction,
  /// radius uniform in [0, eps]), projected onto the set.
  torch::Tensor start(const AttackBall& ball, uint64_t stream) const;
  RowSampler subset(const torch::Tensor& rows) const;
  int64_t size() const { return static_cast<int64_t>(seeds_.size()); }

 private:
  std::vector<uint64_t> seeds_;
};

/// A per-sample objective to maximise: x [B, C, H, W] -> [B] (differentiable).
using Objective = std::function<torch::Tensor(const torch::Tensor& x)>;
/// The model that decides success: x -> log-probabilities [B, K] (evaluated without
/// gradients).
using Judge = LogProbFn;

/// Per-sample losses on log-probabilities lp = log F: [B, K], y: [B] (t: [B] target
/// classes) -> [B]. Cross-entropy −log F_y (its gradient keeps a top-1 router's
/// straight-through term, a common shift of log F that the others cancel).
torch::Tensor loss_ce(const torch::Tensor& lp, const torch::Tensor& y);
/// Difference of logits ratio (Croce & Hein 2020): −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3).
torch::Tensor loss_dlr(const torch::Tensor& lp, const torch::Tensor& y);
/// Targeted DLR: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2).
torch::Tensor loss_dlr_targeted(const torch::Tensor& lp, const torch::Tensor& y,
                                const torch::Tensor& t);
/// The margin z_y − max_{i≠y} z_i (> 0: classified as y). -> [B]
torch::Tensor class_margin(const torch::Tensor& lp, const torch::Tensor& y);

/// What one attack run found: per sample the best point (the first point the judge
/// misclassifies, else the highest objective) and whether the judge misclassifies it.
struct AttackFound {
  torch::Tensor x_adv;    ///< [B, C, H, W] (detached)
  torch::Tensor success;  ///< [B] bool
};

/// APGD (Croce & Hein, ICML 2020): projected steps with momentum 0.75, step size 2ε
/// halved at checkpoints 0.22, 0.41, 0.57, … of the budget when the objective stalls,
/// restarts from the best point. Maximises `objective`; stops a sample once `judge`
/// misclassifies it. Starts at `start` ([B, C, H, W], projected onto the ball) when
/// given, else at the sampler's random points.
AttackFound attack_apgd(const Objective& objective, const Judge& judge, const AttackBall& ball,
                        const torch::Tensor& y, const RowSampler& sampler, int steps,
                        uint64_t stream, const torch::Tensor& start = {});

/// Square (Andriushchenko et al., ECCV 2020): random search, no gradients. Random
/// square patches of shrinking size, accepted when they lower the judge's margin.
/// L∞ (vertical stripes start, ±ε patches) and L2 (the paper's windows of
/// opposite-sign mass). `queries` judge evaluations per sample at most. Each query
/// judges only the samples still robust: through `on_rows(rows)` where given (a judge
/// with per-sample state, e.g. a frozen routing, restricted to those rows), else
/// through `judge`, which must then take any subset of the batch.
AttackFound attack_square(const Judge& judge, const AttackBall& ball, const torch::Tensor& y,
                          const RowSampler& sampler, int queries, uint64_t stream,
                          const std::function<Judge(const torch::Tensor& rows)>& on_rows = {});

/// A minimum-norm attack: FMN (Pintor et al., NeurIPS 2021). Steps on the class
/// margin of `f` inside a ball whose radius shrinks while the point is adversarial and
/// grows (towards the linearised boundary) while it is not; the smallest adversarial
/// perturbation seen is kept. Returns per sample the point and its distance (+inf
/// where none was found), within [0,1]^d when `box`.
struct MinNormFound {
  torch::Tensor x_adv;   ///< [B, C, H, W]
  torch::Tensor radius;  ///< [B] float64: ‖x_adv − x‖, +inf if not adversarial
};
MinNormFound attack_min_norm(const LogProbFn& f, const Judge& judge, const torch::Tensor& x,
                             const torch::Tensor& y, Norm norm, bool box, int steps);

/// The suites of `moecert attack --suite`.
enum class Suite { standard, fast, pgd };
Suite suite_parse(const std::string& s);  ///< "standard" | "fast" | "pgd"; ConfigError otherwise
std::string suite_name(Suite s);

struct SuiteConfig {
  Suite suite = Suite::standard;
  Norm norm = Norm::linf;
  double eps = 0.1;
  bool box = true;
  int apgd_steps = 100;       ///< per APGD run (AutoAttack: 100)
  int targets = 9;            ///< APGD-T target classes (the highest others; AutoAttack: 9)
  int square_queries = 5000;  ///< Square (AutoAttack: 5000)
  int min_norm_steps = 100;   ///< FMN
  bool aware = true;          ///< MoE-aware runs (route-aware, members) in `standard`
  /// RA-E and RA-R too: the fast suite (PGD with `pgd`) against the component targets.
  bool components = false;
  PgdConfig pgd;  ///< `--suite pgd`
  uint64_t seed = 0;
};

/// Per-sample outcome of a suite.
struct SuiteRow {
  bool clean_correct = false;
  bool robust = false;    ///< no attack found a misclassified point within eps
  std::string broken_by;  ///< the run that broke it ("" if robust or misclassified clean: "clean")
  double norm = 0;        ///< ‖x_adv − x‖ of the point found (0 when not broken)
};

struct SuiteResult {
  std::vector<SuiteRow> rows;
  torch::Tensor x_adv;  ///< [N, C, H, W] float32 on the CPU: the adversarial points (x where none)
  std::vector<std::string> runs;    ///< the runs in the order they were tried
  std::vector<int64_t> broken;      ///< per run, samples it broke
  std::vector<double> run_seconds;  ///< per run
  double sa = 0, ra = 0, seconds = 0;
  double ra_e = -1, ra_r = -1;  ///< with SuiteConfig::components (else -1)
  int64_t samples = 0;
  /// Routing on the clean inputs and at the first run's points (every attacked
  /// sample's point, broken or not; the clean input for misclassified samples).
  ExpertUsage usage;
};

/// Runs the suite on a data set in batches (eval mode, frozen parameters, restored
/// afterwards): each run attacks only the samples still robust. Sample i's random
/// numbers come from (seed, i). Progress on stderr when `progress`.
SuiteResult attack_suite(const AttackSubject& subject, const Dataset& data, const SuiteConfig& cfg,
                         int64_t batch_size, torch::Device device, bool progress);

/// Writes the adversarial examples as a PyTorch-loadable file (torch.load): a dict
/// {"x_adv": [N, C, H, W] float32, "label": [N] int64, "robust": [N] bool,
/// "index": [N] int64}. Written atomically.
void save_adversarial(const std::string& path, const SuiteResult& r, const torch::Tensor& labels,
                      const torch::Tensor& index);

}  // namespace moecert
