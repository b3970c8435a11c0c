// The stages of a certification run (private to certify/): what one batch carries
// between them, and the stages themselves.
#pragma once

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "forms.h"
#include "moecert/certify.h"

namespace moecert::run {

/// Radii by form ("thm54_tight"): what the theorems give for one set of constants.
using Radii = std::map<std::string, double>;

/// One member (MoE) of the model: its float64 graphs, global constants and the
/// compiled graphs of bound propagation.
struct Member {
  MoeImpl* model = nullptr;
  LayerGraph router;
  std::vector<LayerGraph> experts;
  MemberConstants global;
  forms::MemberGraphs bp;
};

/// The model being certified and the run's settings.
struct Context {
  const CertifyConfig& cfg;
  std::vector<Member> members;  ///< one, or (standard, robust) for a dual-model
  bool dual = false;
  double alpha = 1.0;
  torch::Device device = torch::kCPU;
  bool uses(Estimator e) const;
};

/// One batch of samples between the stages.
struct Batch {
  torch::Tensor x;                             ///< [B, C, H, W] float64 pixels
  torch::Tensor labels;                        ///< [B] int64 (CPU)
  torch::Tensor correct;                       ///< [B] bool: the float32 model predicts the label
  std::vector<std::vector<MemberEval>> evals;  ///< [sample][member], float64 at x
  std::vector<std::map<RadiusKey, double>> radii;  ///< [sample] {form, estimator} -> radius
  std::vector<nlohmann::json> extra;               ///< [sample] more row fields of the stages
  int64_t size() const { return labels.size(0); }
};

/// Theorems 5.4 / 5.5 with global and local Lipschitz constants (docs §6–§8, §14).
void lipschitz_stage(const Context& ctx, Batch& batch);

/// The bound-propagation forms for every requested method (docs §10–§14).
void bound_stage(const Context& ctx, Batch& batch);

/// The empirical radius of each correct sample (rows of `batch`; `index`: their split
/// indices, which seed the attacks) on the float32 model over the certified domain:
/// the smaller of the FMN minimum-norm attack's radius and a bisection of APGD. Both
/// are distances of points the model misclassifies: upper bounds on the true radius.
std::vector<double> empirical_radii(const Context& ctx, LoadedModel& loaded, const Batch& batch,
                                    const std::vector<int64_t>& index);

/// Branch and bound (docs §22) of every correct sample, ε by ε up the grid, within
/// the sample's budget; a counterexample lowers its `empirical` radius. Writes the
/// radius {form, bab} and the row field "bab".
void bab_stage(const Context& ctx, LoadedModel& loaded, Batch& batch,
               const std::vector<int64_t>& ids, std::vector<double>& empirical, bool progress);

/// The constants of one sample's members as results.json writes them.
nlohmann::json constants_json(bool dual, const std::vector<MemberConstants>& c);

/// The float32 logit error bounds of a member over each sample's ball of radius eps:
/// the largest over experts (and over the router) of max_c err32, and of max_c |ĥ_c|.
struct Fp32Errors {
  torch::Tensor logit, router, hmax;  ///< [B]
};
Fp32Errors member_fp32_errors(const Member& m, const torch::Tensor& x, const torch::Tensor& eps,
                              const CertifyConfig& cfg);

}  // namespace moecert::run
