// Each pipeline stage registers its own `moecert` subcommand.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "moecert/data.h"
#include "moecert/defaults.h"
#include "moecert/results.h"

namespace moecert {

/// Options every subcommand shares (device, threads, seed, data).
struct CommonOptions {
  std::string device = "auto";
  int threads = 0;  ///< 0 = all cores
  uint64_t seed = 0;
  std::string dataset;   ///< empty: the checkpoint's data set, or fashion-mnist
  std::string data_dir;  ///< empty: the reader's default location
  int64_t samples = 0;   ///< 0 = the whole split (--samples all)
  std::string subset;    ///< "first" | "random" | "" (the command's default)
  bool quiet = false;
};

/// --samples: "all" -> 0, else a number in [1, limits::max_samples]; ConfigError otherwise.
int64_t samples_parse(const std::string& text);

/// How an evaluation command chose its test images, as results files record it:
/// {"rule": "all" | "first" | "random", "samples": N[, "seed": S]}.
nlohmann::json selection_json(const CommonOptions& c, int64_t images);

/// The data set a command reads: --dataset or `fallback`, --data, the split, the seed.
DataSpec data_spec(const CommonOptions& c, const std::string& fallback, bool train);

struct ExpertUsage;
struct PgdConfig;

/// PGD options shared by `train` (training and held-out attacks) and `attack`.
struct AttackOptions {
  std::string norm = "inf", loss = "ce";
  double eps = defaults::eps, step_size = 0;
  int steps = defaults::eval_steps, restarts = defaults::restarts;
  /// Checked: ConfigError naming the option that is out of range.
  PgdConfig config() const;
};
/// Registers --{prefix}norm, eps, steps, step-size, restarts and loss for `what`.
void add_attack_options(CLI::App* cmd, AttackOptions& a, const std::string& prefix,
                        const std::string& what);
/// "PGD-10 Linf eps=0.1000 step=..." for the run's first line.
std::string describe_attack(const PgdConfig& c);
/// Shares per expert as "0.25/0.31/0.22/0.22".
std::string usage_line(const std::vector<int64_t>& counts);

/// The `expert_usage` object of the attack JSON (docs/formats.md): counts, shares and
/// the largest share. Written by `attack --json` and by `merge` of attack shards.
nlohmann::json expert_usage_json(const ExpertUsage& usage);

/// --shard "i/n" (0 <= i < n) -> (i, n); ConfigError naming --shard otherwise.
std::pair<int64_t, int64_t> shard_parse(const std::string& shard);
/// The rows of shard `shard` ("" = all) of `total` samples: whole blocks of `batch`
/// consecutive rows (blocks i, i + n, ...), so every sample is evaluated in the batch
/// an unsharded run puts it in, and merged shards reproduce that run exactly.
std::vector<int64_t> shard_rows(const std::string& shard, int64_t total, int64_t batch);

void cli_register_common(CLI::App& app, CommonOptions& common);
void cli_register_train(CLI::App& app, const CommonOptions& common);
void cli_register_import(CLI::App& app, const CommonOptions& common);
void cli_register_verify(CLI::App& app, const CommonOptions& common);
void cli_register_attack(CLI::App& app, const CommonOptions& common);
void cli_register_dual(CLI::App& app, const CommonOptions& common);
void cli_register_info(CLI::App& app, const CommonOptions& common);
void cli_register_lipschitz(CLI::App& app, const CommonOptions& common);
void cli_register_certify(CLI::App& app, const CommonOptions& common, int argc, char** argv);
void cli_register_report(CLI::App& app, const CommonOptions& common, int argc, char** argv);
void cli_register_merge(CLI::App& app, const CommonOptions& common);

/// Report / gate options shared by `report` and `certify --report`.
struct ReportOptions {
  std::string out, junit, baseline;
  std::vector<std::string> gates, attacks;
  double max_drop = 0.02;
};
void add_report_options(CLI::App* cmd, ReportOptions& o, bool for_certify);

/// Writes the report (if o.out), the JUnit file (if o.junit), prints every gate;
/// returns the number of failed gates. runs[0] is gated.
int report_and_gate(const std::vector<Results>& runs, const std::vector<std::string>& names,
                    const ReportOptions& o, const std::string& command);

}  // namespace moecert
