// Files written elsewhere: the restricted torch.save reader (every tensor of an accepted
// file is loaded too), the ONNX reader and the VNNLIB parser.
#include <torch/torch.h>

#include <string>

#include "fuzz.h"
#include "moecert/error.h"
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
