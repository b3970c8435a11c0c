// Timing helpers shared by the benchmarks.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <functional>

namespace moecert_bench {

using Clock = std::chrono::steady_clock;

/// Seconds per call of `fn` after two warm-up calls, averaged over >= min_seconds
/// and >= 3 calls.
inline double time_per_call(const std::function<void()>& fn, double min_seconds) {
  fn();
  fn();
  int calls = 0;
  const auto start = Clock::now();
  double elapsed = 0;
  do {
    fn();
    ++calls;
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  } while (elapsed < min_seconds || calls < 3);
  return elapsed / calls;
}

/// float32 GEMM throughput of this machine (2048^2 matmul), GFLOP/s.
inline double gemm_peak_gflops(double min_seconds) {
  auto a = torch::randn({2048, 2048}), b = torch::randn({2048, 2048});
  const double s = time_per_call([&] { auto c = torch::mm(a, b); }, min_seconds);
  return 2.0 * 2048.0 * 2048.0 * 2048.0 / s / 1e9;
}

}  // namespace moecert_bench
