#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/model_io.h"

#include <torch/torch.h>

namespace moecert {

LoadedModel model_load(const std::string& dir, torch::Device device) {
  LoadedModel out;
  out.dir = dir;
  out.manifest = checkpoint_read_manifest(dir);
  ModelSpec spec;
  try {
    spec = ModelSpec::from_json(out.manifest.at("architecture"));
  } catch (const ConfigError& e) {
    throw CheckpointError::bad_manifest(dir + "/" + checkpoint_manifest_file, "architecture", e.what());
  }
  out.model = Moe(spec);
  checkpoint_load_weights(dir, *out.model);
  out.model->to(device);
  out.model->eval();
  return out;
}

}  // namespace moecert
