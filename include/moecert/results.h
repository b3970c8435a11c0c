// The results of a certification run (SPEC §5, §6) as one typed value: the ε grid,
// radius keys {form, estimator}, per-sample rows and the aggregates derived from
// them. This header is the only place the results schema lives: `certify` writes
// through it, and `report`, gates, `merge` and `--baseline` read through it. No
// other code parses an ε or a radius key from text.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace moecert {

/// The schema: results.json's "schema" is the prefix and a version; this moecert writes
/// results_schema_version and reads every version from results_schema_oldest on.
inline constexpr const char* results_schema_prefix = "moecert.certify/";
inline constexpr int results_schema_version = 3;
inline constexpr int results_schema_oldest = 1;
/// The prefix and the version, as results.json's "schema" holds them.
std::string results_schema_name(int version);

// --- ε --------------------------------------------------------------------------------

/// The canonical text of an ε: the shortest decimal that reads back as the same
/// double ("0.1", "1e-05", "0.0123456789"). Grid keys in results.json use it.
std::string eps_key(double eps);
/// Parses an ε written by a user or a file: a finite number >= 0, the whole text.
/// Throws ConfigError naming `what` (an option, a gate or a file field).
double eps_parse(const std::string& text, const std::string& what);

/// The radii at which accuracies are reported: sorted ascending, without duplicates,
/// each finite and >= 0. Two ε match only when they are the same double, which two
/// texts of one decimal number always are.
class EpsGrid {
 public:
  EpsGrid() = default;
  /// Sorts and de-duplicates; throws ConfigError (naming `what`) for a negative,
  /// non-finite or empty grid, or one of more than limits::max_grid values.
  explicit EpsGrid(std::vector<double> values, const std::string& what = "eps grid");
  /// "0.1,0.05,0.5": comma-separated ε (ConfigError naming `what` otherwise).
  static EpsGrid parse(const std::string& text, const std::string& what = "--eps-grid");

  const std::vector<double>& values() const { return values_; }
  size_t size() const { return values_.size(); }
  double operator[](size_t i) const { return values_[i]; }
  /// Position of `eps` in the grid, if it is there.
  std::optional<size_t> find(double eps) const;
  /// The grid's values joined as "0.01, 0.02, 0.05".
  std::string text() const;
  /// The sorted union of several grids.
  static EpsGrid merged(const std::vector<EpsGrid>& grids);

 private:
  std::vector<double> values_;
};

// --- radius keys ----------------------------------------------------------------------

/// How the constants or bounds behind a radius are found.
enum class Estimator {
  global,       ///< Lipschitz: products of operator norms
  local,        ///< Lipschitz: interval Jacobian over the ball
  ibp,          ///< bound propagation: intervals
  crown_ibp,    ///< bound propagation: CROWN walk of the specifications on IBP intermediate bounds
  crown,        ///< bound propagation: CROWN (linear relaxation, CROWN intermediate bounds)
  alpha_crown,  ///< bound propagation: α-CROWN (optimised lower ReLU slopes)
  /// complete verification: branch and bound (`certify --bab`); its radius is the largest
  /// ε of the grid it verified
  bab,
};
/// "global", "local", "ibp", "crown-ibp", "crown", "alpha-crown", "bab".
std::string estimator_name(Estimator e);
/// One estimator's name -> Estimator, if it is one.
std::optional<Estimator> estimator_from_name(const std::string& name);
/// A comma-separated list of estimators and groups: lipschitz (= global,local), both
/// (the same, kept from before), bp (= ibp,crown-ibp,crown,alpha-crown), all. Throws ConfigError.
std::vector<Estimator> estimators_parse(const std::string& text);

/// What a radius is the radius of: a bound form (the bound-propagation forms
/// "margin", "candidate", "mixture", "dual"; the theorems' "thm54_paper",
/// "thm54_tight", "thm54_candidate", "thm55_a", "thm55_b", "thm55", "thm55_tight")
/// computed with an estimator. Written "<form>_<estimator>" ("candidate_alpha-crown").
struct RadiusKey {
  std::string form;
  Estimator estimator = Estimator::global;

  std::string text() const;
  /// Splits at the last '_' (estimator names hold none); ConfigError naming `what`
  /// when the text has no known estimator or an empty or malformed form.
  static RadiusKey parse(const std::string& text, const std::string& what);
  /// The form whose radius is the model's main certificate of its estimator (the
  /// bound-propagation forms, and the tight / candidate theorem forms): what reports plot.
  bool is_main_form() const;
  bool operator<(const RadiusKey& o) const;
  bool operator==(const RadiusKey& o) const { return form == o.form && estimator == o.estimator; }
};

// --- rows and aggregates --------------------------------------------------------------

/// One certified sample. A radius of +inf is an unbounded certificate (null in JSON).
struct ResultRow {
  int64_t index = 0;  ///< the image's index in the data set's test split
  int64_t label = 0;
  int64_t pred = -1;  ///< the float32 model's prediction (-1: not recorded)
  bool correct = false;
  std::map<RadiusKey, double> radii;
  /// The best sound radius of any form and its key (files without it: the largest radius).
  std::optional<RadiusKey> headline_key;
  double headline = 0;
  /// The attacks' radius: absent without a cross-check; +inf when no attack succeeded
  /// up to the run's --empirical-max.
  std::optional<double> empirical;
  /// Each routed member's router weights at x (one vector for a single MoE).
  std::vector<std::vector<double>> router_weights;
  bool dual_weights = false;  ///< router_weights written per member (a dual-model)
  nlohmann::json extra = nlohmann::json::object();  ///< other fields, kept as read
};

/// An attack that succeeded inside a certified radius.
struct Violation {
  int64_t index = 0;
  RadiusKey key;
  double certified = 0, empirical = 0;
};

/// What a run's rows add up to, per ε of the grid (vectors are aligned with it).
/// Always derived from the rows (results_aggregate), never read from a file.
struct Aggregates {
  int64_t samples = 0;
  double clean_accuracy = 0;
  std::map<RadiusKey, std::vector<double>> certified;  ///< per key: fraction with radius >= ε
  std::map<RadiusKey, double> median_radius;           ///< +inf: the median is unbounded
  std::vector<double> headline_certified;              ///< per ε, the headline radius
  double headline_median = 0;
  std::map<RadiusKey, int64_t> headline_forms;   ///< how many samples each key headlines
  std::optional<std::vector<double>> empirical;  ///< per ε: fraction the attacks left robust
  /// Per ε, with the cross-check, each sample's verdict: verified (the headline radius
  /// reaches ε: headline_certified), falsified (not verified, and an attack found an
  /// adversarial example within ε), unknown (neither), misclassified (1 − clean
  /// accuracy); the four fractions sum to 1.
  std::optional<std::vector<double>> falsified, unknown;
  double median_empirical = 0;
  double median_tightness = 0;  ///< headline / empirical radius; NaN when no sample has both
  int64_t tightness_samples = 0;
  std::vector<Violation> violations;
  std::vector<int64_t>
      expert_usage;  ///< per expert, samples whose top weight it has (empty: no router)
};

/// The data set the rows come from and how they were chosen.
struct ResultsData {
  std::string name, split = "test";
  int64_t size = 0;  ///< images in the split
};

/// The settings of the run that the readers use; `raw` holds all of them as written.
struct ResultsConfig {
  EpsGrid grid;
  std::vector<Estimator> estimators;
  std::string norm = "inf";
  bool box = true;        ///< the ball ∩ [0, 1]^d (false: the whole ball)
  bool empirical = true;  ///< the attacks' cross-check ran
  std::string shard;      ///< "i/n" of a sharded run, empty otherwise
  nlohmann::json raw = nlohmann::json::object();
};

/// A whole results.json.
struct Results {
  int schema = results_schema_version;  ///< the version read (files are written at the current)
  std::string moecert_version, checkpoint, model, kind = "moe", command;
  nlohmann::json fingerprint =
      nlohmann::json::object();  ///< weights_sha256, architecture, training
  std::optional<double> alpha;   ///< a dual-model's α
  ResultsData data;
  ResultsConfig config;
  nlohmann::json constants_global, constants_lower;
  nlohmann::json timing = nlohmann::json::object();
  std::vector<ResultRow> rows;
  Aggregates aggregates;
  int64_t merged_from = 0;                          ///< shards merged into it (0: none)
  nlohmann::json extra = nlohmann::json::object();  ///< unknown top-level fields, kept

  /// Recomputes the aggregates from the rows.
  void aggregate();
  /// results.json at the current schema.
  nlohmann::json to_json() const;
  /// Reads schema 1, 2 or 3 and aggregates. ConfigError naming `source` and the field
  /// at fault; a schema it cannot read names the version found and the versions read.
  static Results from_json(const nlohmann::json& j, const std::string& source);
  /// Reads a results.json file (ConfigError naming the file).
  static Results read(const std::string& path);
  /// Writes it atomically (build beside, fsync, rename).
  void write(const std::string& path) const;

  /// Certified accuracy at ε of `key`, or of the headline without one; nullopt when
  /// the run has no such ε or key.
  std::optional<double> certified_at(double eps, const std::optional<RadiusKey>& key = {}) const;
  /// Empirical accuracy at ε; nullopt without a cross-check or without that ε.
  std::optional<double> empirical_at(double eps) const;
  /// The verdicts' fractions at ε (falsified: attacked, not certified; unknown:
  /// neither); nullopt without a cross-check or without that ε.
  std::optional<double> falsified_at(double eps) const;
  std::optional<double> unknown_at(double eps) const;
  /// Every key of the run, main forms first, then by estimator (tightest first).
  std::vector<RadiusKey> keys() const;
};

/// Combines shard results (`certify --shard i/n`) into one: rows in index order,
/// aggregates recomputed. Throws ConfigError naming the disagreement when the shards
/// come from different checkpoints, settings or schema versions, or overlap.
Results results_merge(const std::vector<Results>& shards);

}  // namespace moecert
