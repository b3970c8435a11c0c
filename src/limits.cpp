// Resource limits: the memory budget and the checks every reader and option uses.
#include "moecert/limits.h"

#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "moecert/error.h"

namespace moecert::limits {
namespace {

/// "512M", "2G", "1073741824" -> bytes; 0 when the text is not one.
uint64_t parse_bytes(const std::string& text) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    return 0;
  }
  std::string unit = text.substr(used);
  double scale = 1;
  if (unit.size() == 1) {
    const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(unit[0])));
    const std::string units = "KMGT";
    const auto at = units.find(u);
    if (at == std::string::npos) return 0;
    scale = std::pow(1024.0, static_cast<double>(at + 1));
  } else if (!unit.empty()) {
    return 0;
  }
  if (!(v > 0) || !std::isfinite(v * scale)) return 0;
  return static_cast<uint64_t>(v * scale);
}

/// MemAvailable of /proc/meminfo in bytes, or 0.
uint64_t mem_available() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kib = 0;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

}  // namespace

uint64_t memory_budget() {
  if (const char* env = std::getenv("MOECERT_MEMORY_LIMIT")) {
    if (const uint64_t b = parse_bytes(env)) return b;
    throw ConfigError::invalid("MOECERT_MEMORY_LIMIT", env, "bytes, e.g. 4000000000 or 4G");
  }
  if (const uint64_t b = mem_available()) return b;
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page)
                               : uint64_t{1} << 32;
}

int64_t check_range(const std::string& field, int64_t value, int64_t lo, int64_t hi) {
  if (value >= lo && value <= hi) return value;
  throw ConfigError(field + ": invalid value '" + std::to_string(value) +
                    "', expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                    "]");
}

bool fits(double bytes) { return bytes <= static_cast<double>(memory_budget()); }

void check_memory(const std::string& what, const std::string& field, const std::string& value,
                  double bytes) {
  const double budget = static_cast<double>(memory_budget());
  if (bytes <= budget) return;
  throw ConfigError(what + " needs about " + bytes_text(bytes) + " (" + field + " = " + value +
                    ") but this machine has " + bytes_text(budget) +
                    " available (MOECERT_MEMORY_LIMIT overrides); refused before allocating");
}

std::string bytes_text(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024 && u < 6) bytes /= 1024, ++u;
  char b[32];
  std::snprintf(b, sizeof b, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return b;
}

}  // namespace moecert::limits
