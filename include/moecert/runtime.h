// Process-wide runtime concerns: device choice, thread count, progress lines on
// stderr, and which BLAS library is serving LibTorch.
#pragma once

#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <string>

namespace moecert {

/// "auto" | "cpu" | "cuda" | "cuda:N" -> device; "cuda" without CUDA is a ConfigError.
torch::Device runtime_device(const std::string& name);

/// Sets LibTorch's intra-op threads (0 = all cores) and returns the count in use;
/// also keeps freed memory blocks up to 32 MiB in the process heap (see runtime.cpp).
int runtime_threads(int requested);

/// Seeds LibTorch's global generators (CPU and, when present, CUDA).
void runtime_seed(uint64_t seed);

/// Path of the shared library that provides `sgemm_` (the active BLAS), or "unknown".
std::string runtime_blas_library();

/// Fixed-point number as text: fmt_fixed(0.12345, 3) == "0.123".
std::string fmt_fixed(double value, int digits);
/// Seconds as "1h02m", "3m12s" or "42s".
std::string fmt_duration(double seconds);

/// Progress of a long loop on stderr: count, throughput and ETA, at most once a
/// second (and at the end).
class Progress {
 public:
  Progress(std::string what, int64_t total, bool enabled);
  /// Records `n` more items done; `extra` is appended to the line.
  void advance(int64_t n, const std::string& extra = "");
  double elapsed() const;

 private:
  std::string what_;
  int64_t total_, done_ = 0;
  bool enabled_;
  std::chrono::steady_clock::time_point start_, last_print_;
};

}  // namespace moecert
