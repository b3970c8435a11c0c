// What the end-to-end tests share: a small checkpoint trained by the binary.
#pragma once

#include <catch2/catch.hpp>
#include <string>

#include "test_util.h"

namespace moecert_test {

/// A small MoE trained on the synthetic set by `moecert train`, once per test process.
inline const std::string& trained_checkpoint() {
  static TempDir dir;
  static std::string ckpt = [] {
    auto r = run_moecert(
        "--dataset synthetic --samples 800 --quiet train --experts 2 --epochs 1 "
        "--val-samples 100 --steps 2 --eval-steps 2 --out " +
        (dir / "ckpt"));
    INFO(r.output);
    REQUIRE(r.code == 0);
    return dir / "ckpt";
  }();
  return ckpt;
}

}  // namespace moecert_test
