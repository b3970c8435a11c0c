// A check of a LibTorch archive (weights.pt, train_state.pt) before LibTorch opens it.
//
// LibTorch reads these files with its TorchScript importer: a zip whose code/*.py files are
// TorchScript class definitions, compiled while data.pkl is unpickled. On a hostile file
// that importer can crash the process (fuzzing found a SIGSEGV in its class-constant
// parser), and a zip entry may claim any size. So moecert first reads the zip's central
// directory itself and accepts only what moecert's own archives hold: entries stored or
// deflated (whose size deflate could reach from what the file holds) that lie inside the
// file, and class files that declare attributes and nothing else (no methods, no
// constants). What passes is what LibTorch's `torch::save` of a module writes.
#include <sys/stat.h>
#include <zlib.h>

#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>
#include <vector>

#include "io-impl.h"
#include "moecert/checkpoint.h"

namespace moecert {
namespace {

constexpr uint32_t kEndOfDirectory = 0x06054b50, kEndOfDirectory64 = 0x06064b50;
constexpr uint32_t kLocator64 = 0x07064b50, kDirectoryEntry = 0x02014b50, kLocalHeader = 0x04034b50;
/// Bounds on what a moecert archive holds (a ResNet-18 MoE has a few thousand entries;
/// a class file a few hundred bytes).
constexpr uint64_t kMaxEntries = 1000000, kMaxCodeBytes = 1 << 20;
constexpr uint64_t kMaxDirectoryBytes = uint64_t{256} << 20;

uint64_t le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

class ZipFile {
 public:
  explicit ZipFile(std::string path) : path_(std::move(path)), in_(path_, std::ios::binary) {
    struct stat st {};
    if (!in_ || ::stat(path_.c_str(), &st) != 0) throw CheckpointError::missing(path_);
    size_ = static_cast<uint64_t>(st.st_size);
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw CheckpointError::bad_weights(path_, "not a weights archive moecert writes: " + why);
  }
  uint64_t size() const { return size_; }
  /// `n` bytes at `offset`, or fail.
  std::vector<unsigned char> read(uint64_t offset, uint64_t n) {
    if (offset > size_ || n > size_ - offset) fail("a record lies outside the file");
    std::vector<unsigned char> b(n);
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(reinterpret_cast<char*>(b.data()), static_cast<std::streamsize>(n));
    if (static_cast<uint64_t>(in_.gcount()) != n)
      fail("cannot read " + std::to_string(n) + " bytes");
    return b;
  }

 private:
  std::string path_;
  std::ifstream in_;
  uint64_t size_ = 0;
};

struct Entry {
  std::string name;
  uint64_t size = 0, packed = 0, offset = 0;  ///< sizes; the local header's offset
  bool deflated = false;
};
/// Deflate's largest expansion is 1032:1; a claim above it cannot be true.
constexpr uint64_t kMaxDeflateRatio = 1032;

/// The central directory's offset, size and entry count (zip64 where the file says so).
void find_directory(ZipFile& zip, uint64_t& offset, uint64_t& bytes, uint64_t& entries) {
  const uint64_t tail = std::min<uint64_t>(zip.size(), 22 + 65535);
  const auto end = zip.read(zip.size() - tail, tail);
  int64_t at = -1;
  for (int64_t i = static_cast<int64_t>(tail) - 22; i >= 0 && at < 0; --i)
    if (le(&end[static_cast<size_t>(i)], 4) == kEndOfDirectory) at = i;
  if (at < 0) zip.fail("no zip directory at its end");
  const unsigned char* e = &end[static_cast<size_t>(at)];
  entries = le(e + 10, 2), bytes = le(e + 12, 4), offset = le(e + 16, 4);
  if (entries == 0xffff || bytes == 0xffffffff || offset == 0xffffffff) {
    if (at < 20 || le(e - 20, 4) != kLocator64) zip.fail("a zip64 directory without its locator");
    const auto z = zip.read(le(e - 20 + 8, 8), 56);
    if (le(z.data(), 4) != kEndOfDirectory64) zip.fail("a broken zip64 directory record");
    entries = le(z.data() + 32, 8), bytes = le(z.data() + 40, 8), offset = le(z.data() + 48, 8);
  }
  if (entries > kMaxEntries || bytes > kMaxDirectoryBytes || entries * 46 > bytes)
    zip.fail("an implausible directory (" + std::to_string(entries) + " entries)");
}

std::vector<Entry> read_directory(ZipFile& zip) {
  uint64_t offset = 0, bytes = 0, count = 0;
  find_directory(zip, offset, bytes, count);
  const auto dir = zip.read(offset, bytes);
  std::vector<Entry> entries;
  for (uint64_t k = 0, at = 0; k < count; ++k) {
    if (at + 46 > bytes || le(&dir[at], 4) != kDirectoryEntry) zip.fail("a broken directory entry");
    const unsigned char* d = &dir[at];
    const uint64_t method = le(d + 10, 2), name_len = le(d + 28, 2), extra_len = le(d + 30, 2);
    const uint64_t comment_len = le(d + 32, 2);
    if (at + 46 + name_len + extra_len + comment_len > bytes)
      zip.fail("a directory entry past its end");
    Entry e;
    e.name.assign(reinterpret_cast<const char*>(d + 46), name_len);
    e.packed = le(d + 20, 4), e.size = le(d + 24, 4), e.offset = le(d + 42, 4);
    // zip64: the sizes and the offset that do not fit 32 bits follow in extra field 1.
    for (uint64_t x = 0; x + 4 <= extra_len;) {
      const unsigned char* f = d + 46 + name_len + x;
      const uint64_t id = le(f, 2), len = le(f + 2, 2);
      if (x + 4 + len > extra_len) zip.fail("a broken extra field in '" + e.name + "'");
      uint64_t* wide[] = {&e.size, &e.packed, &e.offset};
      for (uint64_t i = 0, used = 0; id == 1 && i < 3; ++i)
        if (*wide[i] == 0xffffffff && used + 8 <= len) *wide[i] = le(f + 4 + used, 8), used += 8;
      x += 4 + len;
    }
    e.deflated = method == 8;
    if ((method != 0 && method != 8) || (method == 0 && e.packed != e.size) ||
        e.size > kMaxDeflateRatio * e.packed + 64 || e.offset > zip.size() || e.packed > zip.size())
      zip.fail("entry '" + e.name + "' has method " + std::to_string(method) + " and sizes " +
               std::to_string(e.packed) + " / " + std::to_string(e.size) +
               " (moecert's archives store or deflate entries inside the file)");
    entries.push_back(std::move(e));
    at += 46 + name_len + extra_len + comment_len;
  }
  return entries;
}

/// The data of an entry (inflated when deflated); fails unless it has exactly e.size bytes.
std::string entry_data(ZipFile& zip, const Entry& e) {
  const auto h = zip.read(e.offset, 30);
  if (le(h.data(), 4) != kLocalHeader) zip.fail("entry '" + e.name + "' has no local header");
  auto data = zip.read(e.offset + 30 + le(&h[26], 2) + le(&h[28], 2), e.packed);
  if (!e.deflated) return std::string(data.begin(), data.end());
  std::string out(e.size, '\0');
  z_stream s{};
  if (inflateInit2(&s, -MAX_WBITS) != Z_OK) zip.fail("zlib cannot start");  // raw deflate
  s.next_in = data.data(), s.avail_in = static_cast<uInt>(data.size());
  s.next_out = reinterpret_cast<Bytef*>(out.data()), s.avail_out = static_cast<uInt>(out.size());
  const int rc = inflate(&s, Z_FINISH);
  const uint64_t got = s.total_out;
  inflateEnd(&s);
  if (rc != Z_STREAM_END || got != e.size)
    zip.fail("entry '" + e.name + "' does not inflate to its size");
  return out;
}

/// Whether a pickle (data.pkl, constants.pkl, a class file's debug_pkl) is a well-formed
/// opcode stream whose every length and memo index fits the stream: LibTorch's
/// unpickler allocates what these fields say before it finds out they lie (fuzzing found
/// a 28 GB allocation). Only the opcodes of protocols 0-4 are known; any other is refused.
bool pickle_ok(const std::string& p) {
  const auto* b = reinterpret_cast<const unsigned char*>(p.data());
  const uint64_t n = p.size();
  uint64_t at = 0;
  // Bytes left after `at`; a length or index above it cannot be true.
  auto left = [&] { return n - at; };
  auto arg = [&](int bytes, uint64_t& v) {
    if (left() < static_cast<uint64_t>(bytes)) return false;
    v = le(b + at, bytes), at += static_cast<uint64_t>(bytes);
    return true;
  };
  auto counted = [&](int bytes) {  // a length of `bytes` bytes, then that many bytes
    uint64_t len = 0;
    if (!arg(bytes, len) || len > left()) return false;
    at += len;
    return true;
  };
  auto line = [&] {
    const void* nl = std::memchr(b + at, '\n', left());
    if (!nl) return false;
    at = static_cast<uint64_t>(static_cast<const unsigned char*>(nl) - b) + 1;
    return true;
  };
  while (at < n) {
    const unsigned char op = b[at++];
    uint64_t v = 0;
    switch (op) {
      case '.':
        return at == n;  // STOP ends the stream
      case 0x80:
      case 'K':
      case 'q':
      case 'h':
        if (!arg(1, v)) return false;
        break;
      case 'M':
        if (!arg(2, v)) return false;
        break;
      case 'J':
      case 'r':
      case 'j':
        if (!arg(4, v)) return false;
        break;
      case 'G':
      case 0x95:
        if (!arg(8, v)) return false;
        break;
      case 0x8a:
      case 0x8c:
      case 'U':
      case 'C':  // 1-byte length, then the bytes
        if (!counted(1)) return false;
        break;
      case 0x8b:
      case 'X':
      case 'T':
      case 'B':  // 4-byte length
        if (!counted(4)) return false;
        break;
      case 0x8d:
      case 0x8e:  // 8-byte length
        if (!counted(8)) return false;
        break;
      case 'c':
        if (!line() || !line()) return false;
        break;  // GLOBAL module\nname\n
      case 'p':
      case 'g':
      case 'I':
      case 'L':
      case 'F':
      case 'V':
      case 'S':
      case 'P':
        if (!line()) return false;
        break;
      case '}':
      case ']':
      case ')':
      case '(':
      case 't':
      case 0x85:
      case 0x86:
      case 0x87:
      case 'R':
      case 'b':
      case 's':
      case 'u':
      case 'a':
      case 'e':
      case 0x88:
      case 0x89:
      case 'N':
      case 'Q':
      case '0':
      case '1':
      case '2':
      case 'l':
      case 'd':
      case 0x81:
      case 0x94:
        break;
      default:
        return false;
    }
    // A memo index (BINPUT, LONG_BINPUT, BINGET, LONG_BINGET) sizes the memo table.
    if ((op == 'q' || op == 'r' || op == 'h' || op == 'j') && v > n) return false;
  }
  return false;  // no STOP
}

/// A TorchScript class file as LibTorch writes one for a module's attributes: class
/// headers, attribute declarations and the lists of parameter and buffer names. Anything
/// else (a method, a constant, an import) is refused.
bool declarations_only(const std::string& code) {
  static const std::string type =
      R"((?:[A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\[[A-Za-z0-9_., \[\]]*\])?)";
  static const std::regex line(
      R"(|class [A-Za-z_][A-Za-z0-9_]*\([A-Za-z_][A-Za-z0-9_.]*\):)"
      R"(|  __(?:parameters|buffers|annotations)__ = \[(?:"[A-Za-z0-9_./]*", )*\])"
      R"(|  __annotations__\["[A-Za-z0-9_./]*"\] = )" +
      type + R"(|  [A-Za-z_][A-Za-z0-9_]* : )" + type);
  std::istringstream in(code);
  for (std::string l; std::getline(in, l);)
    if (l.size() > 4096 || !std::regex_match(l, line)) return false;
  return true;
}

}  // namespace

void io_impl::archive_check(const std::string& path) {
  ZipFile zip(path);
  bool pickle = false;
  for (const auto& e : read_directory(zip)) {
    const auto ends = [&](const char* s) {
      const size_t n = std::strlen(s);
      return e.name.size() >= n && e.name.compare(e.name.size() - n, n, s) == 0;
    };
    pickle = pickle || ends("/data.pkl");
    if (ends("pkl")) {  // data.pkl, constants.pkl and the class files' debug_pkl
      if (e.size > kMaxDirectoryBytes) zip.fail("pickle '" + e.name + "' is implausibly large");
      if (!pickle_ok(entry_data(zip, e))) zip.fail("pickle '" + e.name + "' is malformed");
      continue;
    }
    if (!ends(".py")) continue;
    if (e.size > kMaxCodeBytes) zip.fail("class file '" + e.name + "' is implausibly large");
    if (!declarations_only(entry_data(zip, e)))
      zip.fail("class file '" + e.name + "' holds more than attribute declarations");
  }
  if (!pickle) zip.fail("no data.pkl");
}

}  // namespace moecert
