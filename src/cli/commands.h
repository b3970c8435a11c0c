// Each pipeline stage registers its own `moecert` subcommand.
#pragma once

#include <CLI/CLI.hpp>

namespace moecert {

/// Options every subcommand shares (device, threads, seed, data).
struct CommonOptions {
  std::string device = "auto";
  int threads = 0;         ///< 0 = all cores
  uint64_t seed = 0;
  std::string dataset;     ///< empty: the checkpoint's data set, or fashion-mnist
  std::string data_dir;    ///< empty: the reader's default location
  int64_t samples = 0;     ///< 0 = the whole split
  bool quiet = false;
};

void cli_register_common(CLI::App& app, CommonOptions& common);
void cli_register_train(CLI::App& app, const CommonOptions& common);
void cli_register_attack(CLI::App& app, const CommonOptions& common);
void cli_register_dual(CLI::App& app, const CommonOptions& common);
void cli_register_info(CLI::App& app, const CommonOptions& common);

}  // namespace moecert
