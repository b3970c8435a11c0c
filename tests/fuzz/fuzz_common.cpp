// What every harness shares: scratch files, and a budget that keeps one input cheap.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "fuzz.h"

namespace moecert_fuzz {

std::map<std::string, Target>& targets() {
  static std::map<std::string, Target> t;
  return t;
}

std::map<std::string, Seeder>& seeders() {
  static std::map<std::string, Seeder> s;
  return s;
}

namespace {

/// Removes the scratch directory at exit; sets a small memory budget (a model or data
/// set an input asks for must fit 256 MiB, or be refused: one input stays cheap).
struct Scratch {
  std::string dir;
  Scratch() {
    ::setenv("MOECERT_MEMORY_LIMIT", "256M", 0);
    dir = (std::filesystem::temp_directory_path() / ("moecert-fuzz-" + std::to_string(::getpid())))
              .string();
    std::filesystem::create_directories(dir);
  }
  ~Scratch() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

}  // namespace

std::string scratch_dir() {
  static Scratch s;
  return s.dir;
}

void write_bytes(const std::string& path, const uint8_t* data, size_t size) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

}  // namespace moecert_fuzz
