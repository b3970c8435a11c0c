#include "moecert/runtime.h"

#include <dlfcn.h>

#include "moecert/error.h"
#ifdef MOECERT_TCMALLOC
#include <gperftools/malloc_extension.h>
#endif
#include <malloc.h>
#include <torch/torch.h>

#include <cstdio>
#include <iostream>
#include <sstream>
#include <thread>

namespace moecert {

namespace {
/// float32 means float32: TensorFloat-32 (10-bit mantissa) convolutions and matrix
/// products would void the float32 error bounds of the certificates (docs §12).
torch::Device full_float32(torch::Device d) {
  if (d.is_cuda()) {
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
  }
  return d;
}
}  // namespace

torch::Device runtime_device(const std::string& name) {
  if (name == "auto")
    return full_float32(torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::kCPU);
  if (name == "cpu") return torch::kCPU;
  if (name.rfind("cuda", 0) == 0) {
    if (!torch::cuda::is_available())
      throw ConfigError::invalid("--device", name,
                                 "auto | cpu (this build or machine has no CUDA)");
    try {
      return full_float32(torch::Device(name));
    } catch (const c10::Error&) {
      throw ConfigError::invalid("--device", name, "cuda or cuda:N");
    }
  }
  throw ConfigError::invalid("--device", name, "auto | cpu | cuda | cuda:N");
}

int runtime_threads(int requested) {
  if (requested < 0) throw ConfigError::invalid("--threads", std::to_string(requested), ">= 0");
    // Bound propagation allocates and frees blocks of many MiB in every step; an allocator
    // that returns them to the system faults fresh zero pages in again each time (a third
    // of certify's time on these VMs, measured with perf). With tcmalloc (CMakeLists.txt):
    // never release; with glibc: keep blocks up to 32 MiB in the heap.
#ifdef MOECERT_TCMALLOC
  MallocExtension::instance()->SetMemoryReleaseRate(0);
#else
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int n = requested > 0 ? requested : cores;
  if (n > cores) {
    // More threads than cores only contend (and 100,000 of them would take minutes to
    // start): cap, and say so.
    std::cerr << "moecert: warning: --threads " << requested << " is more than the " << cores
              << " hardware threads; using " << cores << std::endl;
    n = cores;
  }
  torch::set_num_threads(n);
  return n;
}

void runtime_seed(uint64_t seed) { torch::manual_seed(seed); }

std::string runtime_blas_library() {
  // LibTorch calls the Fortran BLAS symbol; whichever library resolves it is the
  // one doing our GEMMs (reference BLAS is ~17x slower than OpenBLAS here).
  void* sym = dlsym(RTLD_DEFAULT, "sgemm_");
  Dl_info info{};
  if (!sym || !dladdr(sym, &info) || !info.dli_fname) return "unknown";
  char resolved[4096];
  if (realpath(info.dli_fname, resolved)) return resolved;
  return info.dli_fname;
}

std::string fmt_fixed(double value, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, value);
  return buf;
}

std::string fmt_duration(double seconds) {
  const auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", (long)(s / 3600), (long)(s % 3600 / 60));
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", (long)(s / 60), (long)(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%lds", (long)s);
  return buf;
}

Progress::Progress(std::string what, int64_t total, bool enabled)
    : what_(std::move(what)),
      total_(total),
      enabled_(enabled),
      start_(std::chrono::steady_clock::now()),
      last_print_(start_) {}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::advance(int64_t n, const std::string& extra) {
  done_ += n;
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (done_ < total_ && now - last_print_ < std::chrono::seconds(1)) return;
  last_print_ = now;
  const double t = elapsed();
  const double rate = t > 0 ? static_cast<double>(done_) / t : 0.0;
  const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : 0.0;
  std::ostringstream line;
  line << what_ << " " << done_ << "/" << total_ << "  " << fmt_fixed(rate, 0) << " img/s  eta "
       << fmt_duration(eta);
  if (!extra.empty()) line << "  " << extra;
  std::cerr << line.str() << std::endl;
}

}  // namespace moecert
