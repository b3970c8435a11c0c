#include <torch/torch.h>

#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/model_io.h"
#include "moecert/runtime.h"

namespace moecert {

namespace {

ModelSpec spec_from(const nlohmann::json& arch, const std::string& dir, const std::string& field) {
  try {
    return ModelSpec::from_json(arch);
  } catch (const ConfigError& e) {
    throw CheckpointError::bad_manifest(dir + "/" + checkpoint_manifest_file, field, e.what());
  }
}

}  // namespace

std::string model_describe(const ModelSpec& s) {
  if (s.experts == 1) return "dense " + s.expert;
  if (s.kind == "moe-cnn")
    return "MoE-CNN " + s.expert + " with N=" + std::to_string(s.experts) +
           " channel groups of r=" + fmt_fixed(s.scale, 3) + ", " + s.router +
           " router, top-1 routing";
  return "MoE E=" + std::to_string(s.experts) + " " + s.expert + " experts, " + s.router +
         " router, " + (s.routing == Routing::soft ? "soft" : "top-" + std::to_string(s.top_k)) +
         " routing";
}

AttackSubject LoadedModel::subject() {
  return is_dual() ? attack_subject(*dual) : attack_subject(*model);
}

std::string LoadedModel::describe() const {
  if (!is_dual()) return model_describe(model->spec());
  return "dual-model alpha=" + fmt_fixed(dual->alpha(), 3) + " of standard [" +
         model_describe(dual->standard().spec()) + "] and robust [" +
         model_describe(dual->robust().spec()) + "]";
}

void LoadedModel::check_batch(int64_t batch, const std::string& option) const {
  if (is_dual()) {
    dual->standard().spec().check_memory(batch, option);
    dual->robust().spec().check_memory(batch, option);
  } else {
    model->spec().check_memory(batch, option);
  }
}

LoadedModel model_load(const std::string& dir, torch::Device device) {
  LoadedModel out;
  out.dir = dir;
  out.manifest = checkpoint_read_manifest(dir);
  const auto& arch = out.manifest.at("architecture");
  torch::nn::Module* module = nullptr;
  if (out.manifest.value("kind", "moe") == "dual") {
    if (!arch.contains("standard") || !arch.contains("robust"))
      throw CheckpointError::bad_manifest(dir + "/" + checkpoint_manifest_file, "architecture",
                                          "of a dual-model needs 'standard' and 'robust'");
    const auto alpha = out.manifest.value("alpha", -1.0);
    out.dual = Dual(Moe(spec_from(arch["standard"], dir, "architecture.standard")),
                    Moe(spec_from(arch["robust"], dir, "architecture.robust")), alpha);
    module = out.dual.ptr().get();
  } else {
    out.model = Moe(spec_from(arch, dir, "architecture"));
    module = out.model.ptr().get();
  }
  checkpoint_load_weights(dir, *module);
  module->to(device);
  module->eval();
  return out;
}

void dual_save(const std::string& out_dir, LoadedModel& standard, LoadedModel& robust,
               double alpha) {
  if (standard.is_dual() || robust.is_dual())
    throw ConfigError("dual: --standard and --robust must be single-model checkpoints");
  Dual dual(standard.model, robust.model, alpha);
  auto member = [](const LoadedModel& m) {
    nlohmann::json j = {{"path", m.dir},
                        {"weights_sha256", m.manifest.value("weights_sha256", "")}};
    for (const char* key : {"training", "dataset", "metrics"})
      if (m.manifest.contains(key)) j[key] = m.manifest[key];
    return j;
  };
  nlohmann::json manifest = {
      {"kind", "dual"},
      {"alpha", alpha},
      {"architecture",
       {{"standard", standard.model->spec().to_json()},
        {"robust", robust.model->spec().to_json()}}},
      {"members", {{"standard", member(standard)}, {"robust", member(robust)}}}};
  if (standard.manifest.contains("dataset")) manifest["dataset"] = standard.manifest["dataset"];
  checkpoint_save(out_dir, *dual, manifest);
}

}  // namespace moecert
