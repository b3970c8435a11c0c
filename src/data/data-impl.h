// Private helpers shared by the data readers: portable seeded randomness and
// per-channel pixel statistics. Not part of the public API.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "moecert/data.h"

namespace moecert::data_impl {

/// SplitMix64 finaliser: mixes two words into one well-spread seed, so that
/// nearby (seed, epoch) pairs give unrelated streams.
inline uint64_t seed_mix(uint64_t a, uint64_t b) {
  uint64_t z = a + 0x9e3779b97f4a7c15ULL * (b + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The std:: distributions are implementation-defined; these are spelled out so
// that the same seed gives the same data with any standard library.

/// Uniform integer in [0, bound) by rejection (no modulo bias). bound > 0.
inline uint64_t rng_below(std::mt19937_64& rng, uint64_t bound) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  uint64_t x = rng();
  while (x >= limit) x = rng();
  return x % bound;
}

/// Uniform double in [0, 1) from the top 53 bits.
inline double rng_unit(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1p-53; }

/// Standard normal sample (Box-Muller; one of the pair is discarded for simplicity).
double rng_normal(std::mt19937_64& rng);

/// Per-channel mean and std of uint8 images [N, C, H, W] scaled to [0, 1],
/// exact (from a 256-bin histogram, so no float copy of the set is made).
void pixel_stats(const torch::Tensor& images, std::vector<double>& mean, std::vector<double>& std);

/// Raises DataError::mismatch if any label (int64 [N]) is outside [0, num_classes).
void check_labels(const torch::Tensor& labels, int64_t num_classes, const std::string& path);

}  // namespace moecert::data_impl
