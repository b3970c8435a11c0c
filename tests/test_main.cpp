#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <torch/torch.h>

int main(int argc, char* argv[]) {
  // Tests run on all cores like the tool itself; results must not depend on it.
  torch::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  return Catch::Session().run(argc, argv);
}
