// A bounded reader of zip archives (the container of LibTorch's and PyTorch's files).
//
// LibTorch's own reader (caffe2::serialize::PyTorchStreamReader) allocates the size an
// entry declares before it finds out whether the file holds it, so a hostile file can ask
// for any amount of memory. This reader reads the central directory itself and refuses,
// before anything is allocated, an entry that is neither stored nor deflated, that lies
// outside the file, or that claims more than deflate can expand its bytes to.
#include <sys/stat.h>
#include <zlib.h>

#include "io-impl.h"

namespace moecert::io_impl {
namespace {

constexpr uint32_t kEndOfDirectory = 0x06054b50, kEndOfDirectory64 = 0x06064b50;
constexpr uint32_t kLocator64 = 0x07064b50, kDirectoryEntry = 0x02014b50, kLocalHeader = 0x04034b50;
/// Bounds on a directory (a ResNet-18 MoE's archive has a few thousand entries).
constexpr uint64_t kMaxEntries = 1000000, kMaxDirectoryBytes = uint64_t{256} << 20;
/// Deflate's largest expansion is 1032:1; a claim above it cannot be true.
constexpr uint64_t kMaxDeflateRatio = 1032;

uint64_t le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

ZipReader::ZipReader(std::string path, Fail fail)
    : path_(std::move(path)), fail_(std::move(fail)), in_(path_, std::ios::binary) {
  struct stat st {};
  if (!in_ || ::stat(path_.c_str(), &st) != 0) this->fail("cannot be opened");
  size_ = static_cast<uint64_t>(st.st_size);
  read_directory();
}

void ZipReader::fail(const std::string& why) const {
  fail_(why);
  throw std::logic_error("ZipReader: the failure handler returned");  // unreachable
}

std::vector<unsigned char> ZipReader::read(uint64_t offset, uint64_t n) {
  if (offset > size_ || n > size_ - offset) fail("a record lies outside the file");
  std::vector<unsigned char> b(n);
  in_.seekg(static_cast<std::streamoff>(offset));
  in_.read(reinterpret_cast<char*>(b.data()), static_cast<std::streamsize>(n));
  if (static_cast<uint64_t>(in_.gcount()) != n) fail("cannot read " + std::to_string(n) + " bytes");
  return b;
}

const ZipEntry* ZipReader::find(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

/// The central directory's offset, size and entry count (zip64 where the file says so).
void ZipReader::find_directory(uint64_t& offset, uint64_t& bytes, uint64_t& entries) {
  if (size_ < 22)
    fail("no zip directory at its end (the file has " + std::to_string(size_) + " bytes)");
  const uint64_t tail = std::min<uint64_t>(size_, 22 + 65535);
  const auto end = read(size_ - tail, tail);
  int64_t at = -1;
  for (int64_t i = static_cast<int64_t>(tail) - 22; i >= 0 && at < 0; --i)
    if (le(&end[static_cast<size_t>(i)], 4) == kEndOfDirectory) at = i;
  if (at < 0) fail("no zip directory at its end (truncated, or not a zip file)");
  const unsigned char* e = &end[static_cast<size_t>(at)];
  entries = le(e + 10, 2), bytes = le(e + 12, 4), offset = le(e + 16, 4);
  if (entries == 0xffff || bytes == 0xffffffff || offset == 0xffffffff) {
    if (at < 20 || le(e - 20, 4) != kLocator64) fail("a zip64 directory without its locator");
    const auto z = read(le(e - 20 + 8, 8), 56);
    if (le(z.data(), 4) != kEndOfDirectory64) fail("a broken zip64 directory record");
    entries = le(z.data() + 32, 8), bytes = le(z.data() + 40, 8), offset = le(z.data() + 48, 8);
  }
  if (entries > kMaxEntries || bytes > kMaxDirectoryBytes || entries * 46 > bytes)
    fail("an implausible directory (" + std::to_string(entries) + " entries)");
}

void ZipReader::read_directory() {
  uint64_t offset = 0, bytes = 0, count = 0;
  find_directory(offset, bytes, count);
  const auto dir = read(offset, bytes);
  for (uint64_t k = 0, at = 0; k < count; ++k) {
    if (at + 46 > bytes || le(&dir[at], 4) != kDirectoryEntry) fail("a broken directory entry");
    const unsigned char* d = &dir[at];
    const uint64_t method = le(d + 10, 2), name_len = le(d + 28, 2), extra_len = le(d + 30, 2);
    const uint64_t comment_len = le(d + 32, 2);
    if (at + 46 + name_len + extra_len + comment_len > bytes)
      fail("a directory entry past its end");
    ZipEntry e;
    e.name.assign(reinterpret_cast<const char*>(d + 46), name_len);
    e.packed = le(d + 20, 4), e.size = le(d + 24, 4), e.offset = le(d + 42, 4);
    // zip64: the sizes and the offset that do not fit 32 bits follow in extra field 1.
    for (uint64_t x = 0; x + 4 <= extra_len;) {
      const unsigned char* f = d + 46 + name_len + x;
      const uint64_t id = le(f, 2), len = le(f + 2, 2);
      if (x + 4 + len > extra_len) fail("a broken extra field in '" + e.name + "'");
      uint64_t* wide[] = {&e.size, &e.packed, &e.offset};
      for (uint64_t i = 0, used = 0; id == 1 && i < 3; ++i)
        if (*wide[i] == 0xffffffff && used + 8 <= len) *wide[i] = le(f + 4 + used, 8), used += 8;
      x += 4 + len;
    }
    e.deflated = method == 8;
    if ((method != 0 && method != 8) || (method == 0 && e.packed != e.size) ||
        e.size > kMaxDeflateRatio * e.packed + 64 || e.offset > size_ ||
        e.packed > size_ - e.offset)
      fail("entry '" + e.name + "' has method " + std::to_string(method) + " and sizes " +
           std::to_string(e.packed) + " / " + std::to_string(e.size) +
           " (entries must be stored or deflated, inside the file)");
    entries_.push_back(std::move(e));
    at += 46 + name_len + extra_len + comment_len;
  }
}

std::string ZipReader::data(const ZipEntry& e) {
  const auto h = read(e.offset, 30);
  if (le(h.data(), 4) != kLocalHeader) fail("entry '" + e.name + "' has no local header");
  auto packed = read(e.offset + 30 + le(&h[26], 2) + le(&h[28], 2), e.packed);
  if (!e.deflated) return std::string(packed.begin(), packed.end());
  std::string out(e.size, '\0');
  z_stream s{};
  if (inflateInit2(&s, -MAX_WBITS) != Z_OK) fail("zlib cannot start");  // raw deflate
  s.next_in = packed.data(), s.avail_in = static_cast<uInt>(packed.size());
  s.next_out = reinterpret_cast<Bytef*>(out.data()), s.avail_out = static_cast<uInt>(out.size());
  const int rc = inflate(&s, Z_FINISH);
  const uint64_t got = s.total_out;
  inflateEnd(&s);
  if (rc != Z_STREAM_END || got != e.size)
    fail("entry '" + e.name + "' does not inflate to its size");
  return out;
}

}  // namespace moecert::io_impl
