// CIFAR-10 binary batches: the input is test_batch.bin.
#include "fuzz.h"
#include "moecert/data.h"
#include "moecert/error.h"

MOECERT_FUZZ_TARGET(cifar) {
  const std::string dir = moecert_fuzz::scratch_dir();
  moecert_fuzz::write_bytes(dir + "/test_batch.bin", data, size);
  try {
    moecert::data_load_cifar10(dir, /*train=*/false);
  } catch (const moecert::Error&) {
  }
  return 0;
}
