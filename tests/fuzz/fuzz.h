// The fuzz harnesses' one entry point, built two ways: with -DMOECERT_LIBFUZZER each
// harness is its own libFuzzer binary (scripts/fuzz.sh, clang with ASan/UBSan); without,
// every harness registers by name in moecert_fuzz_replay, which CTest runs over the
// committed corpus (seeds and every crash found, kept as regression inputs).
//
// A harness returns normally for every input: a moecert::Error is the documented answer
// to bad input and is caught; anything else escaping (another exception, a crash, a
// sanitizer report) is a bug.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>

namespace moecert_fuzz {

using Target = std::function<int(const uint8_t*, size_t)>;
std::map<std::string, Target>& targets();
inline bool register_target(const std::string& name, Target t) {
  targets()[name] = std::move(t);
  return true;
}

/// Seed writers: `moecert_fuzz_replay --write-seeds DIR` writes DIR/<target>/ inputs
/// that only the code can make (a checkpoint of the harness's own model).
using Seeder = std::function<void(const std::string& dir)>;
std::map<std::string, Seeder>& seeders();
inline bool register_seeder(const std::string& name, Seeder s) {
  seeders()[name] = std::move(s);
  return true;
}

/// A directory of its own for the harness's files (removed at exit).
std::string scratch_dir();
/// Writes bytes to a file (truncating).
void write_bytes(const std::string& path, const uint8_t* data, size_t size);

}  // namespace moecert_fuzz

#ifdef MOECERT_LIBFUZZER
#define MOECERT_FUZZ_TARGET(name) \
  extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
#else
#define MOECERT_FUZZ_TARGET(name)                                                          \
  static int fuzz_##name(const uint8_t* data, size_t size);                                \
  static const bool registered_##name = moecert_fuzz::register_target(#name, fuzz_##name); \
  static int fuzz_##name(const uint8_t* data, size_t size)
#endif
