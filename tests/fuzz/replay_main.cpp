// moecert_fuzz_replay TARGET PATH...: runs a harness on every file under the paths (the
// committed corpus in CI), one input at a time, and names the input that fails.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include "fuzz.h"

int main(int argc, char** argv) {
  auto& targets = moecert_fuzz::targets();
  if (argc == 3 && std::string(argv[1]) == "--write-seeds") {
    for (const auto& [name, seeder] : moecert_fuzz::seeders()) {
      std::filesystem::create_directories(std::string(argv[2]) + "/" + name);
      seeder(std::string(argv[2]) + "/" + name);
    }
    return 0;
  }
  if (argc < 3 || !targets.count(argv[1])) {
    std::cerr << "usage: moecert_fuzz_replay TARGET PATH...; targets:";
    for (const auto& [name, t] : targets) std::cerr << " " << name;
    std::cerr << "\n";
    return 2;
  }
  std::vector<std::filesystem::path> inputs;
  for (int i = 2; i < argc; ++i) {
    if (std::filesystem::is_directory(argv[i])) {
      for (const auto& e : std::filesystem::recursive_directory_iterator(argv[i]))
        if (e.is_regular_file()) inputs.push_back(e.path());
    } else {
      inputs.emplace_back(argv[i]);
    }
  }
  std::sort(inputs.begin(), inputs.end());
  for (const auto& path : inputs) {
    std::ifstream in(path, std::ios::binary);
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                     std::istreambuf_iterator<char>());
    std::cerr << "input " << path.string() << " (" << bytes.size() << " bytes)\n";
    targets[argv[1]](bytes.data(), bytes.size());
  }
  std::cout << argv[1] << ": " << inputs.size() << " inputs replayed, no failure\n";
  return inputs.empty() ? 1 : 0;
}
