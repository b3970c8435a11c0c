// What the end-to-end tests share: a small checkpoint trained by the binary.
#pragma once

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "moecert/results.h"
#include "test_util.h"

namespace moecert_test {

/// A results.json as merged shards and one unsharded run must agree on it: all but
/// timings and provenance (`timing`, `merged_from`, `command`, `config.shard`).
inline nlohmann::json results_comparable(const std::string& path) {
  auto j = moecert::Results::read(path).to_json();
  for (const char* k : {"timing", "merged_from", "command"}) j.erase(k);
  j["config"].erase("shard");
  return j;
}

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
