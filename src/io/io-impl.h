// Private helpers of the checkpoint code: a streaming SHA-256, POSIX file
// primitives that report errno as CheckpointError, and the directory commit.
// Not part of the public API (tests include it to reach the rename fallback).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

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

/// One entry of a zip directory.
struct ZipEntry {
  std::string name;
  uint64_t size = 0, packed = 0, offset = 0;  ///< sizes; the local header's offset
  bool deflated = false;
};

/// A zip archive whose directory has been read and bounded (zip.cpp): every entry is
/// stored or deflated, lies inside the file and claims no more than deflate can expand
/// its bytes to, so data(e) allocates at most e.size bytes, itself bounded by the file.
class ZipReader {
 public:
  /// Called with the reason when the file is not such an archive; must throw.
  using Fail = std::function<void(const std::string& why)>;
  ZipReader(std::string path, Fail fail);
  const std::vector<ZipEntry>& entries() const { return entries_; }
  /// The entry called `name`, or nullptr.
  const ZipEntry* find(const std::string& name) const;
  /// Entry e's bytes (inflated when deflated); fails unless they are exactly e.size bytes.
  std::string data(const ZipEntry& e);
  [[noreturn]] void fail(const std::string& why) const;

 private:
  std::vector<unsigned char> read(uint64_t offset, uint64_t n);
  void find_directory(uint64_t& offset, uint64_t& bytes, uint64_t& entries);
  void read_directory();

  std::string path_;
  Fail fail_;
  std::ifstream in_;
  uint64_t size_ = 0;
  std::vector<ZipEntry> entries_;
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
