// One error root for the whole tool. Every leaf carries the process exit code
// that `main` maps it to, and is built by named constructors so that each throw
// site reads as a sentence: `throw DataError::truncated(path, 784, 12)`.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace moecert {

/// Documented process exit codes (README "Exit codes").
enum class ExitCode : int {
  ok = 0,
  gate_failed = 1,  ///< a CI gate evaluated to false
  bad_input = 2,    ///< bad usage, unreadable/corrupt data or checkpoint, wrong shape
  soundness = 3,    ///< a certificate was violated by an attack
  numeric = 4,      ///< NaN/Inf during training or evaluation
  internal = 5,     ///< a bug: an invariant that cannot fail did
  distributed = 6,  ///< a distributed run lost a rank (it exited, stalled past the timeout)
};

/// Root of every error moecert throws on purpose.
class Error : public std::runtime_error {
 public:
  Error(ExitCode code, const std::string& what) : std::runtime_error(what), code_(code) {}
  ExitCode code() const { return code_; }
  int exit_code() const { return static_cast<int>(code_); }

 private:
  ExitCode code_;
};

/// Unreadable, truncated or inconsistent data files.
class DataError : public Error {
 public:
  explicit DataError(const std::string& what) : Error(ExitCode::bad_input, what) {}
  static DataError cannot_open(const std::string& path, const std::string& why);
  static DataError truncated(const std::string& path, int64_t expected_bytes, int64_t got_bytes);
  static DataError bad_magic(const std::string& path, uint32_t expected, uint32_t got);
  static DataError corrupt(const std::string& path, const std::string& why);
  static DataError mismatch(const std::string& path, const std::string& why);
};

/// A tensor whose shape is not what a stage expects.
class ShapeError : public Error {
 public:
  explicit ShapeError(const std::string& what) : Error(ExitCode::bad_input, what) {}
  static ShapeError unexpected(const std::string& where, const std::string& expected,
                               const std::vector<int64_t>& got);
};

/// Missing, corrupt or mismatched checkpoint directories.
class CheckpointError : public Error {
 public:
  explicit CheckpointError(const std::string& what) : Error(ExitCode::bad_input, what) {}
  static CheckpointError missing(const std::string& path);
  static CheckpointError hash_mismatch(const std::string& path, const std::string& expected,
                                       const std::string& got);
  static CheckpointError bad_manifest(const std::string& path, const std::string& field,
                                      const std::string& why);
  static CheckpointError bad_weights(const std::string& path, const std::string& why);
};

/// Invalid option values or combinations.
class ConfigError : public Error {
 public:
  explicit ConfigError(const std::string& what) : Error(ExitCode::bad_input, what) {}
  static ConfigError invalid(const std::string& option, const std::string& value,
                             const std::string& expected);
};

/// NaN or Inf in a loss, logit or score.
class NumericError : public Error {
 public:
  explicit NumericError(const std::string& what) : Error(ExitCode::numeric, what) {}
  static NumericError non_finite(const std::string& tensor, const std::string& where);
};

/// A layer kind that certification has no bound rule for.
class UnsupportedLayerError : public Error {
 public:
  explicit UnsupportedLayerError(const std::string& what) : Error(ExitCode::bad_input, what) {}
};

/// Formats a shape as "[2, 3, 4]".
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace moecert
