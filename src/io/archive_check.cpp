// A check of a LibTorch archive (weights.pt, train_state.pt) before LibTorch opens it.
//
// LibTorch reads these files with its TorchScript importer: a zip whose code/*.py files are
// TorchScript class definitions, compiled while data.pkl is unpickled. On a hostile file
// that importer can crash the process (fuzzing found a SIGSEGV in its class-constant
// parser), and a zip entry may claim any size. So moecert first reads the zip's central
// directory itself (zip.cpp) and accepts only what moecert's own archives hold: entries
// stored or deflated that lie inside the file, and class files that declare attributes and
// nothing else (no methods, no constants). What passes is what LibTorch's `torch::save` of
// a module writes.
#include <cstring>
#include <regex>
#include <sstream>

#include "io-impl.h"
#include "moecert/checkpoint.h"

namespace moecert {
namespace {

/// Bounds on what a moecert archive holds (a class file is a few hundred bytes; a pickle
/// of a ResNet-18 MoE's names a few hundred KiB).
constexpr uint64_t kMaxCodeBytes = 1 << 20, kMaxPickleBytes = uint64_t{256} << 20;

uint64_t le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
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
  io_impl::ZipReader zip(path, [&](const std::string& why) {
    throw CheckpointError::bad_weights(path, "not a weights archive moecert writes: " + why);
  });
  bool pickle = false;
  for (const auto& e : zip.entries()) {
    const auto ends = [&](const char* s) {
      const size_t n = std::strlen(s);
      return e.name.size() >= n && e.name.compare(e.name.size() - n, n, s) == 0;
    };
    pickle = pickle || ends("/data.pkl");
    if (ends("pkl")) {  // data.pkl, constants.pkl and the class files' debug_pkl
      if (e.size > kMaxPickleBytes) zip.fail("pickle '" + e.name + "' is implausibly large");
      if (!pickle_ok(zip.data(e))) zip.fail("pickle '" + e.name + "' is malformed");
      continue;
    }
    if (!ends(".py")) continue;
    if (e.size > kMaxCodeBytes) zip.fail("class file '" + e.name + "' is implausibly large");
    if (!declarations_only(zip.data(e)))
      zip.fail("class file '" + e.name + "' holds more than attribute declarations");
  }
  if (!pickle) zip.fail("no data.pkl");
}

}  // namespace moecert
