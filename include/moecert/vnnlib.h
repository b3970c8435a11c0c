// VNN-LIB properties (the VNN-COMP format, https://www.vnnlib.org) and VNN-COMP result
// files. A property is an SMT-LIB-like script over input variables X_0..X_{n-1} and
// output variables Y_0..Y_{m-1}; the conjunction of its asserts describes the
// counterexamples: the property is violated iff some input in the input region gives
// outputs that satisfy the output constraints. The parser normalises the script into
// disjunctive normal form: a list of cases, each an input box plus a conjunction of
// linear constraints, so that a verifier proves the property by refuting every case.
//
// Accepted language (anything else is a DataError naming file:line and the token):
//   ; comment to end of line
//   (declare-const X_<i> Real)   (declare-const Y_<j> Real)   in any order, before use;
//                                the indices must be dense 0..n-1 and 0..m-1
//   (assert F)                   F ::= (and F+) | (or F+) | (<= t t+) | (>= t t+)
//                                    | (< t t+) | (> t t+)     (chains: (<= a b c))
//                                t ::= X_i | Y_j | number | (+ t+) | (- t) | (- t t+)
//                                    | (* t+)  with at most one non-constant factor
//   (check-sat) (get-model) (set-logic ...)   ignored
// Numbers: 3, -0.5, .25, 1e-3, 2.5E+4 (decimal only; inf, nan and hex are refused).
// Strict comparisons (<, >) are read as non-strict (<=, >=). That enlarges each case to
// its closure, so a proof that no case has a counterexample stays sound; a
// counterexample found on the boundary satisfies the strict form only up to a tolerance
// (VNN-COMP checks counterexamples with a tolerance of 1e-4).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moecert {

/// Largest property file read (bytes).
inline constexpr int64_t vnnlib_max_bytes = int64_t{256} << 20;
/// Most variables (inputs and outputs together) a property may declare.
inline constexpr int64_t vnnlib_max_variables = 10000000;
/// Deepest parenthesis nesting, the command's own parenthesis included.
inline constexpr int64_t vnnlib_max_depth = 1000;
/// Most cases (disjuncts) of the normal form, at every step of its expansion.
inline constexpr int64_t vnnlib_max_cases = 100000;
/// Most constraint references of the normal form (summed over its cases), and most
/// box entries of the result (inputs times cases): bounds the memory the expansion takes.
inline constexpr int64_t vnnlib_max_entries = 50000000;

/// Σ_j a_j·Y_j + Σ_i b_i·X_i <= rhs (most properties have no x_terms). Terms are
/// (index, coefficient) pairs sorted by index, with no zero coefficients.
struct VnnConstraint {
  std::vector<std::pair<int64_t, double>> y_terms, x_terms;
  double rhs = 0;
};

/// One input box: lower/upper per input variable, both finite, lower <= upper.
struct VnnBox {
  std::vector<double> lower, upper;
};

/// One disjunct of the property: an input box and a conjunction of constraints
/// (on outputs, possibly mixing inputs) that together describe counterexamples.
/// Asserts on a single input variable (e.g. (<= X_3 0.5), (>= (* 2 X_0) 1)) become box
/// bounds, the tightest of them winning; all other asserts stay constraints.
struct VnnCase {
  VnnBox box;
  std::vector<VnnConstraint> constraints;
};

/// A parsed property: the counterexamples are the union of the cases, which come in the
/// order of the expansion (the alternatives of an earlier assert vary slowest, those of
/// an (or ...) in the order written). A constraint repeated within a case is kept once.
/// Cases whose box is empty (some lower > upper) or that contain a false constant
/// comparison such as (<= 1 0) are dropped, so `cases` may be empty: then no
/// counterexample exists and the property holds for every network.
struct VnnProperty {
  int64_t num_inputs = 0, num_outputs = 0;
  std::vector<VnnCase> cases;
};

/// Reads and parses a .vnnlib file. Throws DataError (exit 2) if it cannot be read, is
/// larger than vnnlib_max_bytes, or is not a property as described above; the message
/// names the file, the line and the offending token ("p.vnnlib:12: unknown variable
/// 'Z_3'"). Every input variable must be bounded above and below in every case.
VnnProperty vnnlib_parse(const std::string& path);

/// Parses property text; `name` stands for the file in error messages.
VnnProperty vnnlib_parse_text(const std::string& text, const std::string& name);

/// Whether inputs x and outputs y satisfy case c (x in its box and every constraint
/// holds), each comparison relaxed by `tol` >= 0: a counterexample check. NaN never
/// satisfies. Throws ShapeError if x does not have one value per input or y is too
/// short for an output the case names.
bool vnnlib_case_satisfied(const VnnCase& c, const std::vector<double>& x,
                           const std::vector<double>& y, double tol = 0);

/// Outcome of verifying one property.
enum class VnnResult {
  holds,     ///< no counterexample exists: "unsat"
  violated,  ///< a counterexample was found: "sat" and the counterexample
  unknown,   ///< gave up (incomplete method): "unknown"
  timeout,   ///< ran out of time: "timeout"
};

/// The VNN-COMP (2022 onwards) results-file text: "unsat\n", "unknown\n", "timeout\n",
/// or for a violation "sat\n" followed by the counterexample as the competition's
/// scoring scripts read it:
///   ((X_0 0.5)
///    (X_1 -1)
///    (Y_0 2.25))
/// inputs then outputs, each in index order, one per line, one space between name and
/// value, values with 17 significant digits (round-trip exact). For `violated`, x and y
/// must be non-empty (else Error, exit 5: a bug) and finite (else NumericError, exit
/// 4); for the other results they are ignored.
std::string vnnlib_result_text(VnnResult r, const std::vector<double>& x = {},
                               const std::vector<double>& y = {});

}  // namespace moecert
