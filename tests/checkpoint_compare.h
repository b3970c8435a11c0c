// Comparing two checkpoints' weights (data-parallel runs against one process).
#pragma once

#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <string>

#include "moecert/model_io.h"

namespace moecert_test {

/// Largest |a − b| over all parameters of two checkpoints (single or dual-model),
/// relative to the largest |a| of each tensor; `by_norm`: largest ‖a − b‖₂ / ‖a‖₂.
inline double max_relative_difference(const std::string& a_dir, const std::string& b_dir,
                                      bool by_norm = false) {
  auto a = moecert::model_load(a_dir, torch::kCPU), b = moecert::model_load(b_dir, torch::kCPU);
  auto params = [](moecert::LoadedModel& m) {
    return m.is_dual() ? m.dual->named_parameters() : m.model->named_parameters();
  };
  const auto pa = params(a), pb = params(b);
  REQUIRE(pa.size() == pb.size());
  double worst = 0;
  for (const auto& item : pa) {
    const auto& x = item.value();
    const auto* y = pb.find(item.key());
    REQUIRE(y != nullptr);
    REQUIRE(x.sizes() == y->sizes());
    const auto d = (x - *y).to(torch::kDouble);
    const double scale = std::max(
        by_norm ? x.to(torch::kDouble).norm().item<double>() : x.abs().max().item<double>(), 1e-12);
    worst = std::max(worst, (by_norm ? d.norm() : d.abs().max()).item<double>() / scale);
  }
  return worst;
}

}  // namespace moecert_test
