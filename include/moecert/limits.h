// Bounds on every size moecert reads from a manifest, a data header, a results file
// or an option, checked before anything of that size is allocated (docs/cli.md,
// "Limits"). Each bound is far above what the papers' models and data sets need and
// far below what would exhaust a machine; the memory check covers what the bounds
// alone cannot (a large model on a small machine).
#pragma once

#include <cstdint>
#include <string>

namespace moecert::limits {

// --- models (model.json "architecture", train options) ----------------------------
/// Experts E of an MoE, channel groups N of an MoE-CNN: the papers use 2–16.
inline constexpr int64_t max_experts = 256;
/// Output classes: ImageNet-21k has 21,841.
inline constexpr int64_t max_classes = 100000;
/// Input channels: images have 1–4; multispectral data sets up to a few hundred.
inline constexpr int64_t max_channels = 1024;
/// Input height and width in pixels.
inline constexpr int64_t max_side = 8192;

// --- runs (options) --------------------------------------------------------------------
/// Images in one batch (train, attack, certify).
inline constexpr int64_t max_batch = 65536;
/// Images a command reads (--samples); IDX / CIFAR files hold at most this many too.
inline constexpr int64_t max_samples = int64_t{1} << 31;
inline constexpr int64_t max_epochs = 100000;
/// Iterations of one attack or optimisation (PGD, APGD, FMN, α-CROWN, bisections).
inline constexpr int64_t max_steps = 1000000;
inline constexpr int64_t max_restarts = 10000;
/// Square's queries per sample.
inline constexpr int64_t max_queries = 100000000;
/// Values of an ε grid.
inline constexpr int64_t max_grid = 10000;
/// Shards of a sharded run.
inline constexpr int64_t max_shards = 1000000;

/// Bytes this process may allocate: MOECERT_MEMORY_LIMIT (bytes, or with a K/M/G/T
/// suffix) if set, else the machine's available memory (MemAvailable of
/// /proc/meminfo; physical memory where that cannot be read).
uint64_t memory_budget();

/// `value` if lo <= value <= hi, else a ConfigError (exit 2) naming `field`, the value
/// and the allowed range.
int64_t check_range(const std::string& field, int64_t value, int64_t lo, int64_t hi);

/// Whether `bytes` fit memory_budget().
bool fits(double bytes);

/// Refuses, before allocating, work whose estimated size exceeds memory_budget(): a
/// ConfigError (exit 2) naming `what`, the field and value that set the size, the
/// estimate and the budget.
void check_memory(const std::string& what, const std::string& field, const std::string& value,
                  double bytes);

/// "1.5 GiB", "312 MiB", "12 KiB", "100 B".
std::string bytes_text(double bytes);

}  // namespace moecert::limits
