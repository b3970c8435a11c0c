// `moecert dual`, `moecert import` and `moecert info`: making and describing checkpoints.
#include <sys/stat.h>

#include <iostream>

#include "commands.h"
#include "moecert/attacks.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/import.h"
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

void cli_register_import(CLI::App& app, const CommonOptions& common) {
  struct Options {
    ImportOptions opts;
    bool force = false;
  };
  auto o = std::make_shared<Options>();
  std::string presets;
  for (const auto& [name, help] : import_presets()) presets += "\n  " + name + ": " + help;
  auto* cmd = app.add_subcommand(
      "import",
      "write a moecert checkpoint from a PyTorch torch.save file (read without Python), an ONNX "
      "model or an MoE assembled from components");
  auto& i = o->opts;
  cmd->add_option("source", i.source,
                  "torch.save file (.t7, .pth, .pth.tar, .pt; zip format), ONNX model (.onnx) or "
                  "assembly file (.json: router and experts, each ONNX or a state dict)")
      ->required();
  cmd->add_option("--preset", i.preset, "layout of one of the papers' codes:" + presets);
  cmd->add_option("--key-map", i.key_map, "JSON key map for other layouts (docs/import.md)");
  cmd->add_option("--member", i.member, "paper1-dual: the member to import, Smoe or Rmoe");
  cmd->add_option("--out", i.out, "checkpoint directory to write")->required();
  cmd->add_option("--mean", i.mean, "input normalisation of the source's data loader, per channel")
      ->delimiter(',');
  cmd->add_option("--std", i.std, "input normalisation's standard deviations, per channel")
      ->delimiter(',');
  cmd->add_option("--input-shape", i.input_shape, "C,H,W of the images (ONNX: from the file)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--classes", i.classes, "classes (default: from the state dict)");
  cmd->add_option("--experts", i.experts,
                  "experts / channel groups (default: from the state dict)");
  cmd->add_option("--reference", i.reference,
                  "torch.save file {\"inputs\": [B,C,H,W] in [0,1], \"logits\": [B,K], "
                  "\"routes\": [B]} from the source model: the import's self-check (ONNX and "
                  "assemblies: optional, every component is checked against its source)");
  cmd->add_option("--tolerance", i.tolerance, "largest |logit difference| the self-check accepts")
      ->capture_default_str();
  cmd->add_flag("--allow-unchecked", i.allow_unchecked,
                "write without --reference (the manifest records that nothing was compared)");
  cmd->add_flag("--force", o->force, "replace an existing checkpoint in --out");
  cmd->callback([o, &common] {
    // The global --dataset names the data set the model was trained on: recorded, so that
    // certify and attack read its test split.
    o->opts.dataset = common.dataset;
    if (!o->force && path_exists(o->opts.out + "/" + checkpoint_manifest_file))
      throw ConfigError("import: " + o->opts.out +
                        " already holds a checkpoint; pass --force to replace it");
    const auto record = import_checkpoint(o->opts);
    const auto& check = record["check"];
    std::cout << "imported " << record["tensors"].get<int64_t>() << " tensors of " << o->opts.source
              << " (layout " << record["layout"].get<std::string>() << ") -> " << o->opts.out
              << "\n";
    for (const auto& c : check.value("components", nlohmann::json::array()))
      if (c.contains("check"))
        std::cout << "self-check   " << c["component"].get<std::string>() << ": "
                  << c["check"]["samples"].get<int64_t>()
                  << " random inputs against its source, max |difference| "
                  << c["check"]["max_abs_diff"].get<double>() << "\n";
    // torch.save imports: the reference check is the record; graph imports: check.reference.
    const auto& ref =
        check.contains("reference") && check["reference"].is_object() ? check["reference"] : check;
    if (ref.contains("max_abs_logit_diff"))
      std::cout << "self-check   " << ref["samples"].get<int64_t>()
                << " reference inputs: max |logit difference| "
                << ref["max_abs_logit_diff"].get<double>()
                << (ref.contains("routes_agree")
                        ? ", routes agree on " + std::to_string(ref["routes_agree"].get<int64_t>())
                        : std::string())
                << "\n";
    else if (!check.contains("components"))
      std::cout << "self-check   none (--allow-unchecked)\n";
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
