// VNN-LIB property parser (the language is in vnnlib.h; the VNN-COMP results writer is
// vnnlib_result.cpp). One pass over the text: a lexer (vnnlib_lex.cpp, with the linear
// terms, names and numbers) yields tokens with their line numbers, and an explicit
// stack of open parentheses (at most vnnlib_max_depth, no recursion) folds each operand
// into its operator as soon as it is complete: arithmetic into a linear term, logic
// into a formula already in disjunctive normal form (DNF). The asserts are multiplied
// out as they arrive, every product bounded before it is built; the clauses left at the
// end become the cases (input box + constraints).
#include "moecert/vnnlib.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string_view>
#include <system_error>

#include "moecert/error.h"
#include "vnnlib-impl.h"

namespace moecert {
namespace {

using namespace vnnlib_impl;
using std::string_view;

constexpr double kInf = std::numeric_limits<double>::infinity();

// --- the parser ----------------------------------------------------------------------

/// Operators inside an assert.
enum class Op { and_, or_, le, ge, add, sub, mul };

/// Whether the operator builds a formula (else a term).
inline bool makes_formula(Op op) {
  return op == Op::and_ || op == Op::or_ || op == Op::le || op == Op::ge;
}
/// Whether its operands are formulas (else terms).
inline bool takes_formulas(Op op) { return op == Op::and_ || op == Op::or_; }

/// Spelling -> operator; strict comparisons are read as non-strict (see vnnlib.h).
constexpr std::pair<const char*, Op> kOps[] = {{"and", Op::and_}, {"or", Op::or_}, {"<=", Op::le},
                                               {"<", Op::le},     {">=", Op::ge},  {">", Op::ge},
                                               {"+", Op::add},    {"-", Op::sub},  {"*", Op::mul}};

bool lookup_op(string_view s, Op& op) {
  for (const auto& [name, value] : kOps) {
    if (s == name) {
      op = value;
      return true;
    }
  }
  return false;
}

/// One open parenthesis inside an assert; operands are folded in as they complete.
struct Frame {
  Op op = Op::and_;
  Token head;         ///< the operator, for messages
  int64_t count = 0;  ///< operands so far
  Term term;          ///< arithmetic: the value so far; comparison: the previous operand
  Dnf dnf;            ///< and/or: the value so far; comparison: one clause of atoms
};

class Parser {
 public:
  Parser(string_view text, const std::string& name) : lex_(text), name_(name) {}
  VnnProperty parse();

 private:
  [[noreturn]] void fail(int64_t line, const std::string& why) const {
    throw DataError(name_ + ":" + std::to_string(line) + ": " + why);
  }
  void command(const Token& open);
  void declare(const Token& open);
  void assertion(const Token& open);
  void skip(const Token& open);
  void expect_close(const Token& open, const char* what);
  Dnf formula(const Token& first);
  Frame open_frame(const Token& open, bool want_formula, size_t depth);
  void give_term(Frame& f, Term t);
  void give_dnf(Frame& f, Dnf d);
  Term close_term(Frame& f);
  Dnf close_dnf(Frame& f);
  Term operand(const Token& t);
  double number(const Token& t);
  Term multiply(Term a, Term b, const Token& head);
  int32_t add_atom(Term lhs, const Term& rhs, const Token& head);
  void and_into(Dnf& acc, Dnf part, int64_t line);
  void or_into(Dnf& acc, Dnf part, int64_t line);
  int64_t check_dense(const std::vector<uint32_t>& lines, char letter, int64_t end_line) const;
  bool make_case(const Clause& clause, int64_t k, std::vector<int64_t>& seen, VnnCase& out) const;

  Lexer lex_;
  std::string name_;
  std::vector<uint32_t> x_line_, y_line_;  // declaration line by index; 0: not declared
  int64_t declared_ = 0;
  std::vector<Atom> atoms_;
  Dnf cases_{{Clause{}}, 0};  // the conjunction of the asserts so far (true)
};

VnnProperty Parser::parse() {
  for (Token t = lex_.next(); t.kind != Tok::end; t = lex_.next()) {
    if (t.kind == Tok::close) fail(t.line, "unbalanced parentheses: ')' closes nothing");
    if (t.kind == Tok::atom) fail(t.line, "expected '(' to start a command, got " + quote(t.text));
    command(t);
  }
  const int64_t end_line = lex_.line();
  VnnProperty p;
  p.num_inputs = check_dense(x_line_, 'X', end_line);
  p.num_outputs = check_dense(y_line_, 'Y', end_line);
  const auto& clauses = cases_.clauses;
  if (static_cast<double>(clauses.size()) * static_cast<double>(p.num_inputs) >
      static_cast<double>(vnnlib_max_entries))
    fail(end_line, std::to_string(clauses.size()) + " cases of " + std::to_string(p.num_inputs) +
                       " inputs would need more than " + std::to_string(vnnlib_max_entries) +
                       " box entries; refusing");
  std::vector<int64_t> seen(atoms_.size(), -1);
  for (size_t k = 0; k < clauses.size(); ++k) {
    VnnCase c;
    if (make_case(clauses[k], static_cast<int64_t>(k), seen, c)) p.cases.push_back(std::move(c));
  }
  return p;
}

void Parser::command(const Token& open) {
  const Token head = lex_.next();
  if (head.kind == Tok::end) fail(open.line, "unbalanced parentheses: this '(' is never closed");
  if (head.kind != Tok::atom)
    fail(head.line, "expected a command after '(', got " + describe(head));
  if (head.text == "declare-const") return declare(open);
  if (head.text == "assert") return assertion(open);
  if (head.text == "check-sat" || head.text == "get-model" || head.text == "set-logic")
    return skip(open);
  fail(head.line, "unknown command " + quote(head.text) + " (expected declare-const or assert)");
}

void Parser::expect_close(const Token& open, const char* what) {
  const Token t = lex_.next();
  if (t.kind == Tok::end) fail(open.line, "unbalanced parentheses: this '(' is never closed");
  if (t.kind != Tok::close)
    fail(t.line, std::string("expected ')' to end ") + what + ", got " + describe(t));
}

void Parser::declare(const Token& open) {
  const Token name = lex_.next();
  if (name.kind != Tok::atom) fail(name.line, "declare-const needs a name, got " + describe(name));
  const Token sort = lex_.next();
  if (sort.kind != Tok::atom || sort.text != "Real")
    fail(sort.line, "variable " + quote(name.text) + " is declared with sort " + describe(sort) +
                        "; only Real variables are supported");
  expect_close(open, "declare-const");
  const VarName v = parse_var_name(name.text);
  if (!v.ok)
    fail(name.line, "variable name " + quote(name.text) + " is not X_<index> or Y_<index>");
  if (v.index >= vnnlib_max_variables)
    fail(name.line, "variable " + quote(name.text) + ": more than " +
                        std::to_string(vnnlib_max_variables) + " variables are not supported");
  std::vector<uint32_t>& lines = v.output ? y_line_ : x_line_;
  if (static_cast<int64_t>(lines.size()) <= v.index) lines.resize(v.index + 1, 0);
  if (lines[v.index] != 0)
    fail(name.line, "variable " + quote(name.text) + " is declared twice (first at line " +
                        std::to_string(lines[v.index]) + ")");
  if (++declared_ > vnnlib_max_variables)
    fail(name.line, "variable " + quote(name.text) + ": more than " +
                        std::to_string(vnnlib_max_variables) + " variables are not supported");
  lines[v.index] = static_cast<uint32_t>(name.line);  // < 2^32: the text is <= 256 MiB
}

void Parser::assertion(const Token& open) {
  const Token first = lex_.next();
  if (first.kind == Tok::end) fail(open.line, "unbalanced parentheses: this '(' is never closed");
  if (first.kind == Tok::close) fail(first.line, "assert needs a formula, got ')'");
  and_into(cases_, formula(first), open.line);
  expect_close(open, "assert");
}

void Parser::skip(const Token& open) {
  for (int64_t depth = 1; depth > 0;) {
    const Token t = lex_.next();
    if (t.kind == Tok::end) fail(open.line, "unbalanced parentheses: this '(' is never closed");
    if (t.kind == Tok::open && ++depth > vnnlib_max_depth)
      fail(t.line, "parentheses nested deeper than " + std::to_string(vnnlib_max_depth));
    if (t.kind == Tok::close) --depth;
  }
}

/// Parses the formula starting at `first` (an assert's operand) up to its last ')'.
Dnf Parser::formula(const Token& first) {
  std::vector<Frame> stack;
  for (Token t = first;; t = lex_.next()) {
    const bool want_formula = stack.empty() || takes_formulas(stack.back().op);
    if (t.kind == Tok::open) {
      stack.push_back(open_frame(t, want_formula, stack.size() + 2));  // + assert's and own
    } else if (t.kind == Tok::atom) {
      if (want_formula) fail(t.line, "expected a formula, got " + quote(t.text));
      give_term(stack.back(), operand(t));
    } else if (t.kind == Tok::close) {
      Frame f = std::move(stack.back());
      stack.pop_back();
      if (makes_formula(f.op)) {
        Dnf d = close_dnf(f);
        if (stack.empty()) return d;
        give_dnf(stack.back(), std::move(d));
      } else {
        give_term(stack.back(), close_term(f));
      }
    } else {
      fail(stack.back().head.line, "unbalanced parentheses: the '(' of " +
                                       quote(stack.back().head.text) + " is never closed");
    }
  }
}

Frame Parser::open_frame(const Token& open, bool want_formula, size_t depth) {
  if (static_cast<int64_t>(depth) > vnnlib_max_depth)
    fail(open.line, "parentheses nested deeper than " + std::to_string(vnnlib_max_depth));
  const Token head = lex_.next();
  if (head.kind == Tok::end) fail(open.line, "unbalanced parentheses: this '(' is never closed");
  if (head.kind != Tok::atom)
    fail(head.line, "expected an operator after '(', got " + describe(head));
  Op op;
  if (!lookup_op(head.text, op)) fail(head.line, "unknown operator " + quote(head.text));
  if (makes_formula(op) != want_formula)
    fail(head.line, want_formula ? "expected a formula, got the term operator " + quote(head.text)
                                 : "expected a term, got the formula operator " + quote(head.text));
  Frame f;
  f.op = op, f.head = head;
  if (op == Op::and_ || op == Op::le || op == Op::ge) f.dnf.clauses = {Clause{}};
  return f;
}

void Parser::give_term(Frame& f, Term t) {
  if (f.op == Op::le || f.op == Op::ge) {
    if (f.count > 0) {
      const int32_t id =
          f.op == Op::le ? add_atom(std::move(f.term), t, f.head) : add_atom(t, f.term, f.head);
      f.dnf.clauses[0].push_back(id);
      ++f.dnf.literals;
    }
    f.term = std::move(t);
  } else if (f.count == 0) {
    f.term = std::move(t);
  } else if (f.op == Op::add || f.op == Op::sub) {
    add_into(f.term, t, f.op == Op::add ? 1 : -1);
  } else {
    f.term = multiply(std::move(f.term), std::move(t), f.head);
  }
  ++f.count;
}

void Parser::give_dnf(Frame& f, Dnf d) {
  if (f.op == Op::and_) {
    and_into(f.dnf, std::move(d), f.head.line);
  } else {
    or_into(f.dnf, std::move(d), f.head.line);
  }
  ++f.count;
}

Term Parser::close_term(Frame& f) {
  if (f.count == 0) fail(f.head.line, quote(f.head.text) + " needs at least one operand");
  if (f.op == Op::sub && f.count == 1) scale(f.term, -1);
  return std::move(f.term);
}

Dnf Parser::close_dnf(Frame& f) {
  const int64_t needed = (f.op == Op::le || f.op == Op::ge) ? 2 : 1;
  if (f.count < needed)
    fail(f.head.line, quote(f.head.text) + " needs at least " + std::to_string(needed) +
                          (needed == 1 ? " operand" : " operands"));
  return std::move(f.dnf);
}

/// A number or a declared variable as a term.
Term Parser::operand(const Token& t) {
  Term term;
  if (looks_numeric(t.text)) {
    term.c = number(t);
    return term;
  }
  if (is_non_finite_word(t.text))
    fail(t.line, "number " + quote(t.text) + " is not finite; only finite numbers are allowed");
  const VarName v = parse_var_name(t.text);
  const auto& lines = v.output ? y_line_ : x_line_;
  if (!v.ok || v.index >= static_cast<int64_t>(lines.size()) || lines[v.index] == 0)
    fail(t.line, "unknown variable " + quote(t.text) + " (not declared before use)");
  term.terms.emplace_back(2 * v.index + (v.output ? 1 : 0), 1.0);
  return term;
}

double Parser::number(const Token& t) {
  string_view s = t.text;
  const bool negative = s[0] == '-';
  if (s[0] == '-' || s[0] == '+') s.remove_prefix(1);
  if (!is_decimal(s)) fail(t.line, "malformed number " + quote(t.text));
  double value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec == std::errc::result_out_of_range) {
    if (leading_exponent(s) > 0)
      fail(t.line, "number " + quote(t.text) + " is not finite in double precision");
    value = 0;  // underflow: closer to 0 than the smallest subnormal
  } else if (ec != std::errc() || end != s.data() + s.size() || !std::isfinite(value)) {
    fail(t.line, "malformed number " + quote(t.text));
  }
  return negative ? -value : value;
}

/// a·b where at most one of them mentions a variable.
Term Parser::multiply(Term a, Term b, const Token& head) {
  normalise(a), normalise(b);
  if (!a.terms.empty() && !b.terms.empty())
    fail(head.line, "nonlinear term: " + quote(head.text) + " multiplies " +
                        quote(var_name(a.terms[0].first)) + " by " +
                        quote(var_name(b.terms[0].first)) + " (only linear terms are supported)");
  if (a.terms.empty()) std::swap(a, b);
  scale(a, b.c);
  return a;
}

/// Records lhs <= rhs as Σ coef·var <= constant and returns its index.
int32_t Parser::add_atom(Term lhs, const Term& rhs, const Token& head) {
  add_into(lhs, rhs, -1);
  normalise(lhs);
  bool finite = std::isfinite(lhs.c);
  for (const auto& term : lhs.terms) finite = finite && std::isfinite(term.second);
  if (!finite)
    fail(head.line, "comparison " + quote(head.text) +
                        " has a coefficient that is not finite in double precision");
  if (atoms_.size() >= static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    fail(head.line, "comparison " + quote(head.text) + ": too many comparisons");
  atoms_.push_back(Atom{std::move(lhs.terms), 0.0 - lhs.c, head.line});  // no -0
  return static_cast<int32_t>(atoms_.size() - 1);
}

/// acc := acc ∧ part, multiplied out; refuses before growing past the bounds.
void Parser::and_into(Dnf& acc, Dnf part, int64_t line) {
  const double a_size = static_cast<double>(acc.clauses.size());
  const double b_size = static_cast<double>(part.clauses.size());
  const double cases = a_size * b_size;
  const double literals = static_cast<double>(acc.literals) * b_size + part.literals * a_size;
  if (cases > vnnlib_max_cases)
    fail(line, "the disjunctive normal form grows to " + std::to_string(int64_t(cases)) +
                   " cases here, more than " + std::to_string(vnnlib_max_cases) + "; refusing");
  if (literals > vnnlib_max_entries)
    fail(line, "the disjunctive normal form grows to " + std::to_string(int64_t(literals)) +
                   " constraint references here, more than " + std::to_string(vnnlib_max_entries) +
                   "; refusing");
  acc.literals = static_cast<int64_t>(literals);
  if (part.clauses.size() == 1) {  // the common case: one more conjunct for every clause
    const Clause& b = part.clauses[0];
    for (Clause& c : acc.clauses) c.insert(c.end(), b.begin(), b.end());
    return;
  }
  std::vector<Clause> product;
  product.reserve(static_cast<size_t>(cases));
  for (const Clause& a : acc.clauses) {
    for (const Clause& b : part.clauses) {
      Clause c;
      c.reserve(a.size() + b.size());
      c.insert(c.end(), a.begin(), a.end());
      c.insert(c.end(), b.begin(), b.end());
      product.push_back(std::move(c));
    }
  }
  acc.clauses = std::move(product);
}

/// acc := acc ∨ part.
void Parser::or_into(Dnf& acc, Dnf part, int64_t line) {
  const int64_t cases = static_cast<int64_t>(acc.clauses.size() + part.clauses.size());
  if (cases > vnnlib_max_cases)
    fail(line, "the disjunctive normal form grows to " + std::to_string(cases) +
                   " cases here, more than " + std::to_string(vnnlib_max_cases) + "; refusing");
  if (acc.literals + part.literals > vnnlib_max_entries)
    fail(line, "the disjunctive normal form grows past " + std::to_string(vnnlib_max_entries) +
                   " constraint references here; refusing");
  for (Clause& c : part.clauses) acc.clauses.push_back(std::move(c));
  acc.literals += part.literals;
}

/// The count n of X_0..X_{n-1} (letter 'X') or Y_0..Y_{m-1}; refuses gaps and none.
int64_t Parser::check_dense(const std::vector<uint32_t>& lines, char letter,
                            int64_t end_line) const {
  const std::string kind = letter == 'X' ? "input" : "output";
  if (lines.empty())
    fail(end_line,
         "no " + kind + " variables declared (expected (declare-const " + letter + "_0 Real) ...)");
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i] != 0) continue;
    const std::string last = letter + ("_" + std::to_string(lines.size() - 1));
    const std::string missing = letter + ("_" + std::to_string(i));
    fail(lines.back(), quote(last) + " is declared but " + quote(missing) + " is not: " + kind +
                           " indices must run from 0 without gaps");
  }
  return static_cast<int64_t>(lines.size());
}

/// Builds case k from its clause; false when it is empty (some lower > upper, or a false
/// constant comparison). `seen` marks the atoms already taken into case k.
bool Parser::make_case(const Clause& clause, int64_t k, std::vector<int64_t>& seen,
                       VnnCase& out) const {
  const size_t n = x_line_.size();
  out.box.lower.assign(n, -kInf);
  out.box.upper.assign(n, kInf);
  for (const int32_t id : clause) {
    if (seen[id] == k) continue;
    seen[id] = k;
    const Atom& a = atoms_[id];
    if (a.terms.empty()) {  // a constant comparison 0 <= rhs
      if (!(0 <= a.rhs)) return false;
      continue;
    }
    if (a.terms.size() == 1 && !is_output(a.terms[0].first)) {  // a bound of one input
      const auto [var, coef] = a.terms[0];
      const double bound = a.rhs / coef + 0.0;  // + 0.0: no -0
      if (!std::isfinite(bound))
        fail(a.line, "the bound on " + quote(var_name(var)) + " is not finite in double precision");
      double& side = coef > 0 ? out.box.upper[var_index(var)] : out.box.lower[var_index(var)];
      side = coef > 0 ? std::min(side, bound) : std::max(side, bound);
      continue;
    }
    VnnConstraint con;
    for (const auto& [var, coef] : a.terms)
      (is_output(var) ? con.y_terms : con.x_terms).emplace_back(var_index(var), coef);
    con.rhs = a.rhs;
    out.constraints.push_back(std::move(con));
  }
  for (size_t i = 0; i < n; ++i) {
    if (out.box.lower[i] > out.box.upper[i]) return false;
  }
  for (size_t i = 0; i < n; ++i) {
    const bool low = std::isfinite(out.box.lower[i]), high = std::isfinite(out.box.upper[i]);
    if (low && high) continue;
    fail(x_line_[i], "input " + quote("X_" + std::to_string(i)) + " has no " +
                         (low ? "upper" : "lower") + " bound in case " + std::to_string(k + 1) +
                         " of " + std::to_string(cases_.clauses.size()) +
                         "; every input needs finite bounds");
  }
  return true;
}

}  // namespace

VnnProperty vnnlib_parse_text(const std::string& text, const std::string& name) {
  if (static_cast<int64_t>(text.size()) > vnnlib_max_bytes)
    throw DataError(name + ": " + std::to_string(text.size()) + " bytes, more than the " +
                    std::to_string(vnnlib_max_bytes) + " bytes (256 MiB) a property may have");
  return Parser(text, name).parse();
}

VnnProperty vnnlib_parse(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw DataError::cannot_open(
        path, std::filesystem::exists(path, ec) ? "not a regular file" : "no such file");
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) throw DataError::cannot_open(path, ec.message());
  if (size > static_cast<uintmax_t>(vnnlib_max_bytes))
    throw DataError(path + ": " + std::to_string(size) + " bytes, more than the " +
                    std::to_string(vnnlib_max_bytes) + " bytes (256 MiB) a property may have");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError::cannot_open(path, std::strerror(errno));
  std::string text(size, '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  if (static_cast<uintmax_t>(in.gcount()) != size)
    throw DataError::truncated(path, static_cast<int64_t>(size), in.gcount());
  return vnnlib_parse_text(text, path);
}

}  // namespace moecert
