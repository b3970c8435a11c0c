#define CATCH_CONFIG_RUNNER
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/runtime.h"
#include "test_util.h"

int main(int argc, char* argv[]) {
  // The tool's thread and allocator settings (threads: see test_threads); results
  // must not depend on the thread count.
  moecert::runtime_threads(moecert_test::test_threads());
  return Catch::Session().run(argc, argv);
}
