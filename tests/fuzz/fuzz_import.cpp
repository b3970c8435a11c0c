// Files written elsewhere: the restricted torch.save reader (every tensor of an accepted
// file is loaded too), the ONNX reader, the VNNLIB parser and assembly files of `import`.
#include <torch/torch.h>

#include <filesystem>
#include <string>

#include "fuzz.h"
#include "moecert/error.h"
#include "moecert/import.h"
#include "moecert/onnx_model.h"
#include "moecert/torch_file.h"
#include "moecert/vnnlib.h"

#if defined(MOECERT_FUZZ_TORCHFILE) || !defined(MOECERT_LIBFUZZER)
MOECERT_FUZZ_TARGET(torchfile) {
  const std::string file = moecert_fuzz::scratch_dir() + "/input.pt";
  moecert_fuzz::write_bytes(file, data, size);
  try {
    moecert::TorchFile f(file);
    for (const auto& [key, ref] : f.tensors()) f.load(ref);
  } catch (const moecert::Error&) {
  }
  return 0;
}
#endif

#if defined(MOECERT_FUZZ_ONNX) || !defined(MOECERT_LIBFUZZER)
MOECERT_FUZZ_TARGET(onnx) {
  const std::string file = moecert_fuzz::scratch_dir() + "/input.onnx";
  moecert_fuzz::write_bytes(file, data, size);
  try {
    moecert::onnx_load(file);
  } catch (const moecert::Error&) {
  }
  return 0;
}
#endif

#if defined(MOECERT_FUZZ_VNNLIB) || !defined(MOECERT_LIBFUZZER)
MOECERT_FUZZ_TARGET(vnnlib) {
  try {
    moecert::vnnlib_parse_text(std::string(reinterpret_cast<const char*>(data), size),
                               "input.vnnlib");
  } catch (const moecert::Error&) {
  }
  return 0;
}
#endif

#if defined(MOECERT_FUZZ_ASSEMBLY) || !defined(MOECERT_LIBFUZZER)
// An assembly file (`moecert import moe.json`) beside two ONNX components of the corpus
// (mlp.onnx: 20 inputs, 5 outputs; bn_net.onnx); a file it accepts is imported whole.
MOECERT_FUZZ_TARGET(assembly) {
  static const std::string dir = [] {
    const std::string d = moecert_fuzz::scratch_dir() + "/assembly";
    std::filesystem::create_directories(d);
    for (const char* f : {"mlp.onnx", "bn_net.onnx"})
      std::filesystem::copy_file(std::string(MOECERT_SOURCE_DIR) + "/tests/fuzz/corpus/onnx/" + f,
                                 d + "/" + f, std::filesystem::copy_options::overwrite_existing);
    return d;
  }();
  moecert_fuzz::write_bytes(dir + "/moe.json", data, size);
  std::filesystem::remove_all(dir + "/out");
  moecert::ImportOptions o;
  o.source = dir + "/moe.json";
  o.out = dir + "/out";
  o.allow_unchecked = true;
  try {
    moecert::import_checkpoint(o);
  } catch (const moecert::Error&) {
  }
  return 0;
}
#endif
