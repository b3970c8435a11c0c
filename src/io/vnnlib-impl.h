// The VNN-LIB parser's text level, private to src/io/: variables and linear terms, the
// lexer, names and numbers (vnnlib_lex.cpp), on which the parser (vnnlib.cpp) builds its
// formulas. Not part of the public API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moecert::vnnlib_impl {

// --- variables and linear terms ------------------------------------------------------

/// A variable as one integer: 2·index for the input X_index, 2·index + 1 for Y_index.
using VarId = int64_t;
inline bool is_output(VarId v) { return (v & 1) != 0; }
inline int64_t var_index(VarId v) { return v >> 1; }
inline std::string var_name(VarId v) {
  return (is_output(v) ? "Y_" : "X_") + std::to_string(var_index(v));
}

/// Σ coef·var + c. `terms` may name a variable twice until normalise() merges them.
struct Term {
  std::vector<std::pair<VarId, double>> terms;
  double c = 0;
};

/// Sorts by variable, adds up repeated variables and drops zero coefficients.
void normalise(Term& t);
void add_into(Term& acc, const Term& t, double sign);
void scale(Term& t, double k);

/// A comparison normalised to Σ coef·var <= rhs (terms as normalise() leaves them).
struct Atom {
  std::vector<std::pair<VarId, double>> terms;
  double rhs = 0;
  int64_t line = 0;
};

/// A formula in DNF: an or of clauses, each an and of atoms (indices into the atoms).
using Clause = std::vector<int32_t>;
struct Dnf {
  std::vector<Clause> clauses;
  int64_t literals = 0;  ///< atom references over all clauses
};

// --- lexer ---------------------------------------------------------------------------

enum class Tok { open, close, atom, end };

struct Token {
  Tok kind = Tok::end;
  std::string_view text;
  int64_t line = 1;
};

/// Splits text into '(', ')' and atoms (maximal runs of other non-space characters),
/// dropping whitespace and ';' comments and counting lines.
class Lexer {
 public:
  explicit Lexer(std::string_view text) : text_(text) {}
  Token next();
  int64_t line() const { return line_; }

 private:
  std::string_view text_;
  size_t pos_ = 0;
  int64_t line_ = 1;
};

/// A token as messages show it: quoted, cut at 64 characters.
std::string quote(std::string_view text);
std::string describe(const Token& t);

// --- names and numbers ---------------------------------------------------------------

/// X_<i> or Y_<i>, i without leading zeros; `index` is capped at vnnlib_max_variables.
struct VarName {
  bool ok = false, output = false;
  int64_t index = 0;
};
VarName parse_var_name(std::string_view s);

/// Whether an atom is meant as a number: a digit or '.' first, after an optional sign.
bool looks_numeric(std::string_view s);
/// Whether an atom spells a non-finite number ("inf", "-Infinity", "NaN", ...).
bool is_non_finite_word(std::string_view s);
/// Whether s (no sign) is digits[.digits] or .digits, then optionally [eE][+-]digits.
bool is_decimal(std::string_view s);
/// Decimal exponent of the first significant digit of a valid unsigned decimal
/// ("123" -> 2, "0.00123" -> -3, "5e7" -> 7); tells overflow from underflow.
int64_t leading_exponent(std::string_view s);

}  // namespace moecert::vnnlib_impl
