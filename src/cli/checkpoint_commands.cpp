// `moecert dual` and `moecert info`: making and describing checkpoints.
#include <sys/stat.h>

#include <iostream>

#include "commands.h"
#include "moecert/attacks.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/model_io.h"
#include "moecert/runtime.h"

namespace moecert {
namespace {

bool path_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

}  // namespace

void cli_register_dual(CLI::App& app, const CommonOptions& common) {
  struct Options {
    std::string standard, robust, out;
    double alpha = 0.8;
    bool force = false;
  };
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand(
      "dual", "combine a standard and a robust checkpoint into a dual-model (1-a) F_S + a F_R");
  cmd->add_option("--standard", o->standard, "checkpoint of the standard model F_S")->required();
  cmd->add_option("--robust", o->robust, "checkpoint of the robust model F_R")->required();
  cmd->add_option("--alpha", o->alpha, "weight of the robust model, in [0, 1]")
      ->capture_default_str();
  cmd->add_option("--out", o->out, "dual-model checkpoint directory")->required();
  cmd->add_flag("--force", o->force, "replace an existing checkpoint in --out");
  cmd->callback([o] {
    if (!o->force && path_exists(o->out + "/" + checkpoint_manifest_file))
      throw ConfigError("dual: " + o->out +
                        " already holds a checkpoint; pass --force to replace it");
    auto standard = model_load(o->standard, torch::kCPU);
    auto robust = model_load(o->robust, torch::kCPU);
    dual_save(o->out, standard, robust, o->alpha);
    std::cout << "dual-model alpha=" << o->alpha << " of " << o->standard << " and " << o->robust
              << " -> " << o->out << "\n";
  });
}

void cli_register_info(CLI::App& app, const CommonOptions& common) {
  auto dir = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("info", "describe a checkpoint (architecture, training, metrics)");
  cmd->add_option("checkpoint", *dir, "checkpoint directory")->required();
  cmd->callback([dir] {
    auto loaded = model_load(*dir, torch::kCPU);
    const auto& m = loaded.manifest;
    std::cout << "checkpoint   " << *dir << "\nmodel        " << loaded.describe()
              << "\nparameters   "
              << (loaded.is_dual() ? module_parameter_count(*loaded.dual)
                                   : module_parameter_count(*loaded.model))
              << "\nweights      sha256 " << m.value("weights_sha256", "?")
              << "\nversion      moecert " << m.value("moecert_version", "?") << " (format "
              << m.value("format_version", 0) << ")\n";
    if (m.contains("members"))
      for (const char* role : {"standard", "robust"})
        std::cout
            << role << (role[0] == 's' ? "     " : "       ")
            << m["members"][role].value("path", "?") << " ("
            << m["members"][role].value("training", nlohmann::json::object()).value("method", "?")
            << ")\n";
    if (m.contains("training")) std::cout << "training     " << m["training"].dump() << "\n";
    if (m.contains("dataset")) std::cout << "dataset      " << m["dataset"].dump() << "\n";
    if (m.contains("metrics") && m["metrics"].contains("history"))
      for (const auto& row : m["metrics"]["history"])
        std::cout << "epoch " << row.value("epoch", 0) << "      held-out SA "
                  << fmt_fixed(row.value("heldout_sa", 0.0), 4) << "  RA "
                  << fmt_fixed(row.value("heldout_ra", 0.0), 4) << "  train loss "
                  << fmt_fixed(row.value("train_loss", 0.0), 4)
                  << (row.contains("heldout_expert_usage_clean")
                          ? "  experts " +
                                ExpertUsage::text(
                                    row["heldout_expert_usage_clean"].get<std::vector<double>>()) +
                                " (attacked " +
                                ExpertUsage::text(
                                    row["heldout_expert_usage_adv"].get<std::vector<double>>()) +
                                ")"
                      : row.contains("expert_usage_clean")
                          ? "  experts (training batches) " +
                                ExpertUsage::text(
                                    row["expert_usage_clean"].get<std::vector<double>>())
                          : std::string())
                  << "\n";
  });
}

}  // namespace moecert
