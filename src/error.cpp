#include "moecert/error.h"

#include <sstream>

namespace moecert {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

DataError DataError::cannot_open(const std::string& path, const std::string& why) {
  return DataError("data file " + path + ": cannot open (" + why + ")");
}
DataError DataError::truncated(const std::string& path, int64_t expected_bytes, int64_t got_bytes) {
  return DataError("data file " + path + ": truncated, expected " + std::to_string(expected_bytes) +
                   " bytes of payload but the file holds " + std::to_string(got_bytes));
}
DataError DataError::bad_magic(const std::string& path, uint32_t expected, uint32_t got) {
  std::ostringstream out;
  out << "data file " << path << ": bad magic number 0x" << std::hex << got << ", expected 0x"
      << expected;
  return DataError(out.str());
}
DataError DataError::corrupt(const std::string& path, const std::string& why) {
  return DataError("data file " + path + ": corrupt (" + why + ")");
}
DataError DataError::mismatch(const std::string& path, const std::string& why) {
  return DataError("data file " + path + ": " + why);
}

ShapeError ShapeError::unexpected(const std::string& where, const std::string& expected,
                                  const std::vector<int64_t>& got) {
  return ShapeError(where + ": expected shape " + expected + ", got " + shape_str(got));
}

CheckpointError CheckpointError::missing(const std::string& path) {
  return CheckpointError("checkpoint " + path + ": not found");
}
CheckpointError CheckpointError::hash_mismatch(const std::string& path, const std::string& expected,
                                               const std::string& got) {
  return CheckpointError("checkpoint " + path + ": SHA-256 of weights is " + got +
                         " but the manifest records " + expected +
                         " (the weights file is corrupt or was replaced)");
}
CheckpointError CheckpointError::bad_manifest(const std::string& path, const std::string& field,
                                              const std::string& why) {
  return CheckpointError("checkpoint " + path + ": manifest field '" + field + "' " + why);
}
CheckpointError CheckpointError::bad_weights(const std::string& path, const std::string& why) {
  return CheckpointError("checkpoint " + path + ": weights: " + why);
}

ConfigError ConfigError::invalid(const std::string& option, const std::string& value,
                                 const std::string& expected) {
  return ConfigError("option " + option + ": invalid value '" + value + "', expected " + expected);
}

NumericError NumericError::non_finite(const std::string& tensor, const std::string& where) {
  return NumericError("non-finite value (NaN/Inf) in " + tensor + " at " + where);
}

}  // namespace moecert
