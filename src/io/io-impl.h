// Private helpers of the checkpoint code: a streaming SHA-256, POSIX file
// primitives that report errno as CheckpointError, and the directory commit.
// Not part of the public API (tests include it to reach the rename fallback).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "moecert/error.h"

namespace moecert::io_impl {

/// Incremental FIPS 180-4 SHA-256: update() any number of times, then hex_digest() once.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  /// Pads, finishes and returns the digest as 64 lowercase hex digits.
  std::string hex_digest();

 private:
  void compress(const uint8_t* block);  // one 64-byte block

  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_{};
  size_t buffered_ = 0;  // bytes waiting in buffer_
  uint64_t total_bytes_ = 0;
};

/// Checks a LibTorch archive (weights.pt, train_state.pt) before LibTorch opens it
/// (archive_check.cpp): a zip of stored or deflated entries that lie inside the file,
/// whose class files declare attributes only and whose pickles are well-formed opcode
/// streams. Throws CheckpointError::bad_weights naming the file.
void archive_check(const std::string& path);

/// A CheckpointError "cannot <action> <path>: <strerror(err)>".
CheckpointError os_error(const std::string& action, const std::string& path, int err);

/// Flushes a file (or directory) to stable storage; throws os_error on failure.
void fsync_path(const std::string& path, bool is_directory);

/// Creates `path` (which must not exist), writes all of `bytes` and fsyncs it.
void write_file_synced(const std::string& path, const std::string& bytes);

/// Directory holding `path` ("." for a bare name); `path` has no trailing slash.
std::string parent_dir(const std::string& path);

/// Replaces directory `dir` by the complete directory `tmp` so that at every
/// instant either the old or the new checkpoint is reachable (see checkpoint.cpp).
/// `allow_exchange=false` forces the two-rename fallback (used by tests).
void commit_directory(const std::string& tmp, const std::string& dir, bool allow_exchange = true);

}  // namespace moecert::io_impl
