// VNN-COMP results writer (the format is in vnnlib.h) and the check that a counterexample
// lies in a case; the parser is vnnlib.cpp.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <string>
#include <vector>

#include "moecert/error.h"
#include "moecert/vnnlib.h"

namespace moecert {
namespace {

/// "(X_3 0.25)": one entry of a counterexample, 17 significant digits.
void append_entry(std::string& out, const char* prefix, size_t index, double value) {
  if (!std::isfinite(value))
    throw NumericError::non_finite("counterexample", prefix + std::to_string(index));
  char digits[40];
  const auto [end, ec] =
      std::to_chars(digits, digits + sizeof digits, value, std::chars_format::general, 17);
  out += out.back() == '(' ? "(" : "\n (";
  out += prefix + std::to_string(index) + " ";
  out.append(digits, end);
  out += ')';
}

}  // namespace

bool vnnlib_case_satisfied(const VnnCase& c, const std::vector<double>& x,
                           const std::vector<double>& y, double tol) {
  const size_t n = c.box.lower.size();
  if (x.size() != n)
    throw ShapeError::unexpected("vnnlib_case_satisfied: x", "[" + std::to_string(n) + "]",
                                 {static_cast<int64_t>(x.size())});
  int64_t outputs = 0;
  for (const VnnConstraint& con : c.constraints) {
    for (const auto& term : con.y_terms) outputs = std::max(outputs, term.first + 1);
  }
  if (static_cast<int64_t>(y.size()) < outputs)
    throw ShapeError::unexpected("vnnlib_case_satisfied: y",
                                 "[" + std::to_string(outputs) + " or more]",
                                 {static_cast<int64_t>(y.size())});
  for (size_t i = 0; i < n; ++i) {
    if (!(x[i] >= c.box.lower[i] - tol && x[i] <= c.box.upper[i] + tol)) return false;
  }
  for (const VnnConstraint& con : c.constraints) {
    double lhs = 0;
    for (const auto& [j, a] : con.y_terms) lhs += a * y[j];
    for (const auto& [i, b] : con.x_terms) lhs += b * x[i];
    if (!(lhs <= con.rhs + tol)) return false;
  }
  return true;
}

std::string vnnlib_result_text(VnnResult r, const std::vector<double>& x,
                               const std::vector<double>& y) {
  switch (r) {
    case VnnResult::holds:
      return "unsat\n";
    case VnnResult::unknown:
      return "unknown\n";
    case VnnResult::timeout:
      return "timeout\n";
    case VnnResult::violated:
      break;
  }
  if (x.empty() || y.empty())
    throw Error(ExitCode::internal,
                "vnnlib_result_text: a violated property needs its counterexample (x and y)");
  std::string out = "sat\n(";
  for (size_t i = 0; i < x.size(); ++i) append_entry(out, "X_", i, x[i]);
  for (size_t j = 0; j < y.size(); ++j) append_entry(out, "Y_", j, y[j]);
  return out + ")\n";
}

}  // namespace moecert
