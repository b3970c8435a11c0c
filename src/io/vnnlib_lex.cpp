// The VNN-LIB parser's text level (see vnnlib-impl.h): linear terms, the lexer, and the
// names and numbers its atoms spell.
#include <algorithm>
#include <cctype>
#include <limits>
#include <string>
#include <string_view>

#include "moecert/vnnlib.h"
#include "vnnlib-impl.h"

namespace moecert::vnnlib_impl {

using std::string_view;

// --- variables and linear terms ------------------------------------------------------

void normalise(Term& t) {
  auto& v = t.terms;
  std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  size_t out = 0;
  for (size_t i = 0; i < v.size();) {
    double sum = 0;
    const VarId var = v[i].first;
    for (; i < v.size() && v[i].first == var; ++i) sum += v[i].second;
    if (sum != 0) v[out++] = {var, sum};
  }
  v.resize(out);
}

void add_into(Term& acc, const Term& t, double sign) {
  for (const auto& [var, coef] : t.terms) acc.terms.emplace_back(var, sign * coef);
  acc.c += sign * t.c;
}

void scale(Term& t, double k) {
  for (auto& term : t.terms) term.second *= k;
  t.c *= k;
}

// --- lexer ---------------------------------------------------------------------------

namespace {

inline bool is_space(char ch) {
  return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\f' || ch == '\v';
}

}  // namespace

Token Lexer::next() {
  while (pos_ < text_.size()) {
    const char ch = text_[pos_];
    if (ch == '\n') {
      ++line_, ++pos_;
    } else if (ch == ';') {
      const size_t eol = text_.find('\n', pos_);
      pos_ = eol == string_view::npos ? text_.size() : eol;
    } else if (is_space(ch)) {
      ++pos_;
    } else {
      break;
    }
  }
  if (pos_ == text_.size()) return {Tok::end, {}, line_};
  const size_t start = pos_;
  const char ch = text_[pos_];
  if (ch == '(' || ch == ')') {
    ++pos_;
    return {ch == '(' ? Tok::open : Tok::close, text_.substr(start, 1), line_};
  }
  while (pos_ < text_.size()) {
    const char c = text_[pos_];
    if (c == '(' || c == ')' || c == ';' || c == '\n' || is_space(c)) break;
    ++pos_;
  }
  return {Tok::atom, text_.substr(start, pos_ - start), line_};
}

std::string quote(string_view text) {
  if (text.size() > 64) return "'" + std::string(text.substr(0, 64)) + "...'";
  return "'" + std::string(text) + "'";
}

std::string describe(const Token& t) {
  return t.kind == Tok::end ? std::string("the end of the file") : quote(t.text);
}

// --- names and numbers ---------------------------------------------------------------

VarName parse_var_name(string_view s) {
  VarName v;
  if (s.size() < 3 || (s[0] != 'X' && s[0] != 'Y') || s[1] != '_') return v;
  const string_view digits = s.substr(2);
  if (digits.size() > 1 && digits[0] == '0') return v;
  for (char ch : digits) {
    if (ch < '0' || ch > '9') return v;
    v.index = std::min(v.index * 10 + (ch - '0'), vnnlib_max_variables);
  }
  v.ok = true, v.output = s[0] == 'Y';
  return v;
}

namespace {

inline bool is_digit(char ch) { return ch >= '0' && ch <= '9'; }

}  // namespace

bool looks_numeric(string_view s) {
  size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
  return i < s.size() && (is_digit(s[i]) || s[i] == '.');
}

bool is_non_finite_word(string_view s) {
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) s.remove_prefix(1);
  std::string lower(s);
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return lower == "inf" || lower == "infinity" || lower == "nan";
}

bool is_decimal(string_view s) {
  size_t i = 0, mantissa_digits = 0;
  for (; i < s.size() && is_digit(s[i]); ++i) ++mantissa_digits;
  if (i < s.size() && s[i] == '.') {
    for (++i; i < s.size() && is_digit(s[i]); ++i) ++mantissa_digits;
  }
  if (mantissa_digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    const size_t exponent_start = i;
    while (i < s.size() && is_digit(s[i])) ++i;
    if (i == exponent_start) return false;
  }
  return i == s.size();
}

int64_t leading_exponent(string_view s) {
  const size_t e = s.find_first_of("eE");
  int64_t exponent = 0;
  if (e != string_view::npos) {
    size_t i = e + 1;
    const bool negative = s[i] == '-';
    if (s[i] == '-' || s[i] == '+') ++i;
    for (; i < s.size(); ++i) exponent = std::min<int64_t>(exponent * 10 + (s[i] - '0'), 1 << 30);
    if (negative) exponent = -exponent;
  }
  const string_view mantissa = s.substr(0, e);
  const size_t point = std::min(mantissa.find('.'), mantissa.size());
  const size_t first = mantissa.find_first_of("123456789");
  if (first == string_view::npos) return std::numeric_limits<int32_t>::min();  // zero
  const int64_t place = first < point ? static_cast<int64_t>(point - first) - 1
                                      : -static_cast<int64_t>(first - point);
  return place + exponent;
}

}  // namespace moecert::vnnlib_impl
