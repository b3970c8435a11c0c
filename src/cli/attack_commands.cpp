// `moecert attack`: the attack suite on a checkpoint, sharded when asked, and the
// shard helpers `certify` and `merge` share.
#include <torch/torch.h>

#include <iostream>

#include "commands.h"
#include "moecert/attack_suite.h"
#include "moecert/attacks.h"
#include "moecert/checkpoint.h"
#include "moecert/defaults.h"
#include "moecert/error.h"
#include "moecert/limits.h"
#include "moecert/model_io.h"
#include "moecert/runtime.h"

namespace moecert {

/// "i/n" (0 <= i < n) -> (i, n).
std::pair<int64_t, int64_t> shard_parse(const std::string& s) {
  const auto slash = s.find('/');
  try {
    if (slash == std::string::npos) throw std::invalid_argument(s);
    size_t a = 0, b = 0;
    const int64_t i = std::stoll(s.substr(0, slash), &a), n = std::stoll(s.substr(slash + 1), &b);
    if (a != slash || b != s.size() - slash - 1 || n < 1 || i < 0 || i >= n ||
        n > limits::max_shards)
      throw std::invalid_argument(s);
    return {i, n};
  } catch (const std::exception&) {
    throw ConfigError::invalid(
        "--shard", s,
        "i/n with 0 <= i < n <= " + std::to_string(limits::max_shards) + ", e.g. 0/4");
  }
}

nlohmann::json expert_usage_json(const ExpertUsage& usage) {
  return {{"clean", usage.clean},
          {"adversarial", usage.adversarial},
          {"clean_share", ExpertUsage::shares(usage.clean)},
          {"adversarial_share", ExpertUsage::shares(usage.adversarial)},
          {"max_share", usage.max_share()}};
}

std::vector<int64_t> shard_rows(const std::string& shard, int64_t total, int64_t batch) {
  const auto [si, sn] = shard.empty() ? std::pair<int64_t, int64_t>{0, 1} : shard_parse(shard);
  std::vector<int64_t> rows;
  for (int64_t block = si; block * batch < total; block += sn)
    for (int64_t i = block * batch; i < std::min(total, (block + 1) * batch); ++i)
      rows.push_back(i);
  return rows;
}

void cli_register_attack(CLI::App& app, const CommonOptions& common) {
  struct Options {
    std::string checkpoint, json, suite = "standard", save_adv, shard;
    AttackOptions attack;
    int64_t batch_size = 256;
    int apgd_steps = 100, square_queries = 5000, targets = 9, min_norm_steps = 100;
    double max_expert_share = 1.0, min_expert_share = 0.0;
    bool no_components = false, alpha_sweep = false, no_aware = false, no_box = false;
  };
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand("attack", "measure SA, RA, RA-E and RA-R of a checkpoint");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint directory (single or dual-model)")
      ->required();
  cmd->add_option("--suite", o->suite,
                  "standard (APGD-CE, APGD-T, FMN, MoE-aware runs, Square) | fast (APGD-CE, "
                  "APGD-T) | pgd (PGD "
                  "with --steps/--restarts/--loss)")
      ->capture_default_str();
  add_attack_options(cmd, o->attack, "", "attack");
  cmd->add_option("--apgd-steps", o->apgd_steps, "iterations of each APGD run")
      ->capture_default_str();
  cmd->add_option("--targets", o->targets, "APGD-T target classes")->capture_default_str();
  cmd->add_option("--square-queries", o->square_queries, "Square's queries per sample")
      ->capture_default_str();
  cmd->add_option("--min-norm-steps", o->min_norm_steps, "FMN iterations")->capture_default_str();
  cmd->add_flag("--no-aware", o->no_aware, "standard suite without the MoE-aware runs");
  cmd->add_flag("--no-box", o->no_box, "attack the whole ball, not its intersection with [0,1]^d");
  cmd->add_option("--batch-size", o->batch_size)->capture_default_str();
  cmd->add_option("--json", o->json,
                  "also write the numbers and per-sample results to this JSON file");
  cmd->add_option(
      "--save-adv", o->save_adv,
      "write the adversarial examples to this file (torch.load: x_adv, label, index, robust)");
  cmd->add_flag("--no-components", o->no_components, "skip RA-E and RA-R");
  cmd->add_option("--shard", o->shard,
                  "i/n: only blocks of --batch-size samples whose number mod n is i (0-based); "
                  "`moecert merge` joins the shards' --json files");
  cmd->add_option(
         "--max-expert-share", o->max_expert_share,
         "routing health gate: exit 1 when one expert takes more than this share of the clean or "
         "attacked test samples (1 = off)")
      ->capture_default_str();
  cmd->add_option(
         "--min-expert-share", o->min_expert_share,
         "routing health gate: exit 1 when an expert takes less than this share of the clean or "
         "attacked test samples (a dead expert; 0 = off)")
      ->capture_default_str();
  cmd->add_flag("--alpha-sweep", o->alpha_sweep,
                "dual-model: SA and RA (PGD) for alpha = 0.5, 0.6, ..., 1.0");
  cmd->callback([&common, o] {
    runtime_threads(common.threads);
    const auto device = runtime_device(common.device);
    runtime_seed(common.seed);
    const PgdConfig pgd = o->attack.config();
    SuiteConfig cfg;
    cfg.suite = suite_parse(o->suite);
    cfg.norm = pgd.norm, cfg.eps = pgd.eps, cfg.box = !o->no_box, cfg.pgd = pgd,
    cfg.pgd.box = cfg.box;
    cfg.apgd_steps = o->apgd_steps, cfg.targets = o->targets,
    cfg.square_queries = o->square_queries;
    cfg.min_norm_steps = o->min_norm_steps;
    limits::check_range("--min-norm-steps", o->min_norm_steps, 1, limits::max_steps);
    limits::check_range("--apgd-steps", o->apgd_steps, 1, limits::max_steps);
    limits::check_range("--square-queries", o->square_queries, 0, limits::max_queries);
    limits::check_range("--targets", o->targets, 1, limits::max_classes);
    cfg.aware = !o->no_aware, cfg.components = !o->no_components, cfg.seed = common.seed;
    limits::check_range("--batch-size", o->batch_size, 1, limits::max_batch);
    if (!(o->max_expert_share > 0 && o->max_expert_share <= 1))
      throw ConfigError::invalid("--max-expert-share", std::to_string(o->max_expert_share),
                                 "in (0, 1]");
    if (!(o->min_expert_share >= 0 && o->min_expert_share < 1))
      throw ConfigError::invalid("--min-expert-share", std::to_string(o->min_expert_share),
                                 "in [0, 1)");
    auto loaded = model_load(o->checkpoint, device);
    loaded.check_batch(o->batch_size, "--batch-size");
    if (o->alpha_sweep && !loaded.is_dual())
      throw ConfigError("attack --alpha-sweep needs a dual-model checkpoint (see `moecert dual`)");
    const auto ds_name =
        loaded.manifest.value("dataset", nlohmann::json::object()).value("name", "fashion-mnist");
    Dataset test = data_load(data_spec(common, ds_name, /*train=*/false));
    const int64_t selected = test.size();
    if (!o->shard.empty()) {
      if (o->alpha_sweep)
        throw ConfigError("attack --alpha-sweep runs whole: it cannot be combined with --shard");
      const auto rows = shard_rows(o->shard, selected, o->batch_size);
      test = test.select(torch::tensor(rows, torch::kLong));
    }
    const std::string what = cfg.suite == Suite::pgd
                                 ? describe_attack(pgd)
                                 : "the " + suite_name(cfg.suite) + " suite, eps " +
                                       fmt_fixed(cfg.eps, 4) + " (L" + norm_name(cfg.norm) + ")";
    std::cerr << "attack " << o->checkpoint << " (" << loaded.describe() << ") with " << what
              << " on " << test.size() << " " << test.name << " test images"
              << (o->shard.empty() ? "" : " (shard " + o->shard + ")") << std::endl;
    auto r = attack_suite(loaded.subject(), test, cfg, o->batch_size, device, !common.quiet);
    std::cout << "SA    " << fmt_fixed(r.sa, 4) << "\nRA    " << fmt_fixed(r.ra, 4) << "\n";
    if (cfg.components)
      std::cout << "RA-E  " << fmt_fixed(r.ra_e, 4) << "\nRA-R  " << fmt_fixed(r.ra_r, 4) << "\n";
    std::cout << "(" << r.samples << " samples, " << what << ", " << fmt_fixed(r.seconds, 1)
              << " s)\n";
    if (!r.runs.empty()) std::cout << "broken by:";
    for (size_t i = 0; i < r.runs.size(); ++i)
      std::cout << " " << r.runs[i] << " " << r.broken[i] << " (" << fmt_fixed(r.run_seconds[i], 1)
                << " s)" << (i + 1 < r.runs.size() ? "," : "\n");
    if (!r.usage.clean.empty())
      std::cout << "experts: clean " << usage_line(r.usage.clean) << ", attacked "
                << usage_line(r.usage.adversarial)
                << (loaded.is_dual() ? " (robust member's router)" : "") << "\n";
    nlohmann::json j = {{"eps", cfg.eps},
                        {"norm", norm_name(cfg.norm)},
                        {"suite", suite_name(cfg.suite)},
                        {"box", cfg.box},
                        {"samples", test.size()},
                        {"selection", selection_json(common, selected)},
                        {"checkpoint", o->checkpoint},
                        {"dataset", test.name},
                        {"moecert_version", MOECERT_VERSION},
                        {"seed", common.seed}};
    if (cfg.suite == Suite::pgd)
      j["steps"] = pgd.steps, j["step_size"] = pgd.step_size, j["restarts"] = pgd.restarts;
    else
      j["apgd_steps"] = cfg.apgd_steps, j["targets"] = cfg.targets,
      j["square_queries"] = cfg.square_queries, j["min_norm_steps"] = cfg.min_norm_steps,
      j["aware"] = cfg.aware;
    j["sa"] = r.sa, j["ra"] = r.ra, j["seconds"] = r.seconds;
    if (cfg.components) j["ra_e"] = r.ra_e, j["ra_r"] = r.ra_r;
    if (!r.usage.clean.empty()) j["expert_usage"] = expert_usage_json(r.usage);
    j["runs"] = nlohmann::json::array();
    for (size_t i = 0; i < r.runs.size(); ++i)
      j["runs"].push_back(
          {{"name", r.runs[i]}, {"broken", r.broken[i]}, {"seconds", r.run_seconds[i]}});
    j["rows"] = nlohmann::json::array();
    auto labels = test.labels.cpu();
    for (size_t i = 0; i < r.rows.size(); ++i) {
      const auto& row = r.rows[i];
      j["rows"].push_back(
          {{"index", test.source_index(static_cast<int64_t>(i))},
           {"label", labels[static_cast<int64_t>(i)].item<int64_t>()},
           {"clean_correct", row.clean_correct},
           {"robust", row.robust},
           {"broken_by", row.broken_by.empty() ? nlohmann::json() : nlohmann::json(row.broken_by)},
           {"norm", row.norm}});
    }
    if (loaded.is_dual()) j["alpha"] = loaded.dual->alpha();
    if (!o->shard.empty()) j["shard"] = o->shard;
    if (o->alpha_sweep) {
      const double saved_alpha = loaded.dual->alpha();
      j["alpha_sweep"] = nlohmann::json::array();
      std::cout << "\nalpha    SA      RA (" << describe_attack(pgd) << ")\n";
      for (int step = 5; step <= 10; ++step) {
        loaded.dual->set_alpha(step / 10.0);
        auto s = attack_evaluate(loaded.subject(), test, pgd, false, o->batch_size, device, false);
        std::cout << fmt_fixed(step / 10.0, 1) << "    " << fmt_fixed(s.sa, 4) << "  "
                  << fmt_fixed(s.ra, 4) << "\n";
        j["alpha_sweep"].push_back({{"alpha", step / 10.0}, {"sa", s.sa}, {"ra", s.ra}});
      }
      loaded.dual->set_alpha(saved_alpha);
    }
    if (!o->save_adv.empty()) save_adversarial(o->save_adv, r, test.labels, test.index);
    if (!o->json.empty()) write_file_atomic(o->json, j.dump(2) + "\n");
    for (const auto& violation : {r.usage.share_violation(o->max_expert_share, "test"),
                                  r.usage.floor_violation(o->min_expert_share, "test")})
      if (!violation.empty()) throw Error(ExitCode::gate_failed, violation);
  });
}

}  // namespace moecert
