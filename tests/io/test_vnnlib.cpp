// VNN-LIB parsing into cases (input box + linear constraints), every malformed input
// refused with file:line and the offending token, counterexample checks on hand-worked
// points, and the VNN-COMP results-file text byte for byte.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "moecert/error.h"
#include "moecert/vnnlib.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using moecert::DataError;
using moecert::VnnCase;
using moecert::VnnConstraint;
using moecert::VnnProperty;
using moecert::VnnResult;
using Terms = std::vector<std::pair<int64_t, double>>;

namespace {

/// "(declare-const X_0 Real)\n..." for n inputs and m outputs.
std::string declarations(int n, int m) {
  std::string s;
  for (int i = 0; i < n; ++i) s += "(declare-const X_" + std::to_string(i) + " Real)\n";
  for (int j = 0; j < m; ++j) s += "(declare-const Y_" + std::to_string(j) + " Real)\n";
  return s;
}

/// Box asserts lo <= X_i <= hi for every input, one assert per bound.
std::string box(int n, double lo, double hi) {
  std::string s;
  for (int i = 0; i < n; ++i) {
    s += "(assert (<= X_" + std::to_string(i) + " " + std::to_string(hi) + "))\n";
    s += "(assert (>= X_" + std::to_string(i) + " " + std::to_string(lo) + "))\n";
  }
  return s;
}

VnnProperty parse(const std::string& text) { return moecert::vnnlib_parse_text(text, "p.vnnlib"); }

/// The message of the DataError that parsing `text` throws (fails the test if none).
std::string parse_error(const std::string& text) {
  try {
    parse(text);
  } catch (const DataError& e) {
    CHECK(e.exit_code() == 2);
    return e.what();
  }
  FAIL("expected a DataError for:\n" << text);
  return "";
}

/// A file under the temp dir, removed at scope exit.
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name)
      : path((fs::temp_directory_path() /
              ("moecert-vnnlib-" + std::to_string(::getpid()) + "-" + name))
                 .string()) {}
  ~TempFile() {
    std::error_code ec;
    fs::remove(path, ec);
  }
};

bool same_box(const VnnCase& a, const VnnCase& b) {
  return a.box.lower == b.box.lower && a.box.upper == b.box.upper;
}

}  // namespace

TEST_CASE("vnnlib: MNIST-style local robustness property", "[unit][vnnlib]") {
  // 4 "pixels" around an image of class 1 among 3 classes: a counterexample is an input
  // in the box where some other class scores at least as high as class 1.
  const std::string text = "; mnist-style property, label 1\r\n" + declarations(4, 3) +
                           "\n; input box\n"
                           "(assert (<= X_0 0.25))\n(assert (>= X_0 0.0))\n"
                           "(assert (<= X_1 1.0))\n(assert (>= X_1 0.75))\n"
                           "(assert (<= X_2 0.5))\t(assert (>= X_2 0.125))\n"
                           "(assert (<= X_3 0.03125)) (assert (>= X_3 -0.03125))\n"
                           "\n; output: not class 1\n"
                           "(assert (or\n"
                           "    (and (>= Y_0 Y_1))\n"
                           "    (and (>= Y_2 Y_1))\n"
                           "))\n";
  const VnnProperty p = parse(text);
  CHECK(p.num_inputs == 4);
  CHECK(p.num_outputs == 3);
  REQUIRE(p.cases.size() == 2);
  for (const VnnCase& c : p.cases) {
    CHECK(c.box.lower == std::vector<double>{0.0, 0.75, 0.125, -0.03125});
    CHECK(c.box.upper == std::vector<double>{0.25, 1.0, 0.5, 0.03125});
    REQUIRE(c.constraints.size() == 1);
    CHECK(c.constraints[0].x_terms.empty());
    CHECK(c.constraints[0].rhs == 0);
  }
  // Y_0 >= Y_1  <=>  -Y_0 + Y_1 <= 0;  Y_2 >= Y_1  <=>  Y_1 - Y_2 <= 0.
  CHECK(p.cases[0].constraints[0].y_terms == Terms{{0, -1.0}, {1, 1.0}});
  CHECK(p.cases[1].constraints[0].y_terms == Terms{{1, 1.0}, {2, -1.0}});
}

TEST_CASE("vnnlib: a full-size MNIST property (784 inputs, 10 outputs)", "[unit][vnnlib]") {
  std::string text = declarations(784, 10) + box(784, -0.5, 0.5) + "(assert (or\n";
  for (int k = 0; k < 10; ++k) {
    if (k != 7) text += " (and (>= Y_" + std::to_string(k) + " Y_7))\n";
  }
  const VnnProperty p = parse(text + "))\n");
  CHECK(p.num_inputs == 784);
  CHECK(p.num_outputs == 10);
  REQUIRE(p.cases.size() == 9);
  CHECK(p.cases[8].box.lower == std::vector<double>(784, -0.5));
  CHECK(p.cases[8].box.upper == std::vector<double>(784, 0.5));
  CHECK(p.cases[8].constraints.size() == 1);
  CHECK(p.cases[8].constraints[0].y_terms == Terms{{7, 1.0}, {9, -1.0}});
}

TEST_CASE("vnnlib: ACAS-Xu-style property", "[unit][vnnlib]") {
  // Inputs: one conjunction; outputs: (or (and ...) (and ...)) with a constant bound.
  const std::string text = declarations(5, 5) +
                           "(assert (and (>= X_0 -0.3035311561) (<= X_0 -0.2985528119)\n"
                           "             (>= X_1 -0.0095492966) (<= X_1 0.0095492966)\n"
                           "             (>= X_2 0.4933803236) (<= X_2 0.5)\n"
                           "             (>= X_3 0.3) (<= X_3 0.5)\n"
                           "             (>= X_4 0.3) (<= X_4 0.5)))\n"
                           "(assert (or (and (<= Y_0 Y_1) (<= Y_0 Y_2))\n"
                           "            (and (<= Y_3 Y_4) (<= Y_3 5.5))))\n";
  const VnnProperty p = parse(text);
  REQUIRE(p.cases.size() == 2);
  CHECK(same_box(p.cases[0], p.cases[1]));
  CHECK(p.cases[0].box.lower ==
        std::vector<double>{-0.3035311561, -0.0095492966, 0.4933803236, 0.3, 0.3});
  CHECK(p.cases[0].box.upper == std::vector<double>{-0.2985528119, 0.0095492966, 0.5, 0.5, 0.5});
  const auto& c0 = p.cases[0].constraints;
  REQUIRE(c0.size() == 2);
  CHECK(c0[0].y_terms == Terms{{0, 1.0}, {1, -1.0}});
  CHECK(c0[1].y_terms == Terms{{0, 1.0}, {2, -1.0}});
  const auto& c1 = p.cases[1].constraints;
  REQUIRE(c1.size() == 2);
  CHECK(c1[0].y_terms == Terms{{3, 1.0}, {4, -1.0}});
  CHECK(c1[0].rhs == 0);
  CHECK(c1[1].y_terms == Terms{{3, 1.0}});  // an output bound stays a constraint
  CHECK(c1[1].rhs == 5.5);
}

TEST_CASE("vnnlib: a disjunction of input boxes gives one case per box", "[unit][vnnlib]") {
  // ACAS Xu property 6 style: two boxes times a 2-way output disjunction = 4 cases,
  // the first assert's alternatives varying slowest.
  const std::string text = declarations(2, 3) +
                           "(assert (or\n"
                           "  (and (<= X_0 0.7) (>= X_0 -0.1) (<= X_1 0.5) (>= X_1 0.1))\n"
                           "  (and (<= X_0 0.7) (>= X_0 -0.1) (<= X_1 -0.1) (>= X_1 -0.5))))\n"
                           "(assert (or (<= Y_1 Y_0) (<= Y_2 Y_0)))\n";
  const VnnProperty p = parse(text);
  REQUIRE(p.cases.size() == 4);
  for (int k : {0, 1}) {
    CHECK(p.cases[k].box.lower == std::vector<double>{-0.1, 0.1});
    CHECK(p.cases[k].box.upper == std::vector<double>{0.7, 0.5});
  }
  for (int k : {2, 3}) {
    CHECK(p.cases[k].box.lower == std::vector<double>{-0.1, -0.5});
    CHECK(p.cases[k].box.upper == std::vector<double>{0.7, -0.1});
  }
  CHECK(p.cases[0].constraints[0].y_terms == Terms{{0, -1.0}, {1, 1.0}});
  CHECK(p.cases[1].constraints[0].y_terms == Terms{{0, -1.0}, {2, 1.0}});
  CHECK(p.cases[2].constraints[0].y_terms == Terms{{0, -1.0}, {1, 1.0}});
  CHECK(p.cases[3].constraints[0].y_terms == Terms{{0, -1.0}, {2, 1.0}});
}

TEST_CASE("vnnlib: linear terms, numbers and strict comparisons", "[unit][vnnlib]") {
  const std::string text = declarations(3, 3) +
                           "(assert (<= 0 X_0 1))\n"       // a chain: two bounds
                           "(assert (<= (* 2 X_1) 1))\n"   // X_1 <= 0.5
                           "(assert (<= (* -2 X_1) 1))\n"  // X_1 >= -0.5
                           "(assert (> X_2 (- 0.5)))\n"    // strict, unary minus
                           "(assert (< (* X_2 4) 1e0))\n"  // X_2 <= 0.25, constant last
                           "(assert (<= (+ (* 2 Y_0) (- Y_1)) 3))\n"
                           "(assert (>= (- Y_0 Y_1 0.5) (* Y_2 -1.5)))\n"
                           "(assert (<= (+ Y_0 Y_0 (- Y_1 Y_1)) .25))\n"
                           "(assert (<= (+ X_0 Y_2) 2.5E+1))\n"
                           "(assert (>= Y_1 -1.5e-1))\n";
  const VnnProperty p = parse(text);
  REQUIRE(p.cases.size() == 1);
  const VnnCase& c = p.cases[0];
  CHECK(c.box.lower == std::vector<double>{0, -0.5, -0.5});
  CHECK(c.box.upper == std::vector<double>{1, 0.5, 0.25});
  REQUIRE(c.constraints.size() == 5);
  // 2·Y_0 - Y_1 <= 3
  CHECK(c.constraints[0].y_terms == Terms{{0, 2.0}, {1, -1.0}});
  CHECK(c.constraints[0].rhs == 3);
  // Y_0 - Y_1 - 0.5 >= -1.5·Y_2  <=>  -Y_0 + Y_1 - 1.5·Y_2 <= -0.5
  CHECK(c.constraints[1].y_terms == Terms{{0, -1.0}, {1, 1.0}, {2, -1.5}});
  CHECK(c.constraints[1].rhs == -0.5);
  // repeated variables add up, cancelling ones vanish: 2·Y_0 <= 0.25
  CHECK(c.constraints[2].y_terms == Terms{{0, 2.0}});
  CHECK(c.constraints[2].rhs == 0.25);
  // a constraint mixing inputs and outputs keeps both parts
  CHECK(c.constraints[3].x_terms == Terms{{0, 1.0}});
  CHECK(c.constraints[3].y_terms == Terms{{2, 1.0}});
  CHECK(c.constraints[3].rhs == 25);
  // Y_1 >= -0.15  <=>  -Y_1 <= 0.15
  CHECK(c.constraints[4].y_terms == Terms{{1, -1.0}});
  CHECK(c.constraints[4].rhs == 0.15);
}

TEST_CASE("vnnlib: declarations in any order, ignored commands, tight bounds win",
          "[unit][vnnlib]") {
  const std::string text =
      "(set-logic QF_LRA)\n"
      "(declare-const Y_1 Real)\n(declare-const X_1 Real)\n"
      "(declare-const Y_0 Real)\n(declare-const X_0 Real)\n"
      "(assert (and (<= X_0 2) (<= X_0 1) (>= X_0 -3) (>= X_0 -1)))\n"
      "(assert (and (<= -1 X_1) (<= X_1 1) (>= Y_0 Y_1) (>= Y_0 Y_1)))\n"  // repeated
      "(check-sat)\n(get-model)\n";
  const VnnProperty p = parse(text);
  CHECK(p.num_inputs == 2);
  CHECK(p.num_outputs == 2);
  REQUIRE(p.cases.size() == 1);
  CHECK(p.cases[0].box.lower == std::vector<double>{-1, -1});
  CHECK(p.cases[0].box.upper == std::vector<double>{1, 1});
  CHECK(p.cases[0].constraints.size() == 2);  // two atoms, written twice each
}

TEST_CASE("vnnlib: empty cases are dropped", "[unit][vnnlib]") {
  const std::string head = declarations(1, 2) + "(assert (and (>= X_0 0) (<= X_0 1)))\n";
  SECTION("a box with lower > upper") {
    const VnnProperty p = parse(head + "(assert (or (and (>= X_0 2) (<= Y_0 0)) (<= Y_1 0)))\n");
    REQUIRE(p.cases.size() == 1);
    CHECK(p.cases[0].constraints[0].y_terms == Terms{{1, 1.0}});
  }
  SECTION("a false constant comparison; a true one is dropped from the case") {
    const VnnProperty p =
        parse(head + "(assert (or (and (<= 1 0) (<= Y_0 0)) (and (<= 0 1) (<= Y_1 0))))\n");
    REQUIRE(p.cases.size() == 1);
    REQUIRE(p.cases[0].constraints.size() == 1);
    CHECK(p.cases[0].constraints[0].y_terms == Terms{{1, 1.0}});
  }
  SECTION("every case empty: no counterexample can exist") {
    const VnnProperty p = parse(head + "(assert (>= X_0 1.5))\n(assert (<= Y_0 0))\n");
    CHECK(p.num_inputs == 1);
    CHECK(p.cases.empty());
  }
  SECTION("a single point is not empty") {
    const VnnProperty p = parse(head + "(assert (<= X_0 0))\n(assert (<= Y_0 0))\n");
    REQUIRE(p.cases.size() == 1);
    CHECK(p.cases[0].box.lower[0] == 0);
    CHECK(p.cases[0].box.upper[0] == 0);
  }
}

TEST_CASE("vnnlib: numbers are read exactly, tiny ones underflow to zero", "[unit][vnnlib]") {
  const VnnProperty p = parse(declarations(1, 1) +
                              "(assert (<= X_0 0.1))\n(assert (>= X_0 -1e-400))\n"
                              "(assert (<= Y_0 +7.))\n");
  REQUIRE(p.cases.size() == 1);
  CHECK(p.cases[0].box.upper[0] == 0.1);
  CHECK(p.cases[0].box.lower[0] == 0);
  CHECK(p.cases[0].constraints[0].rhs == 7);
}

TEST_CASE("vnnlib: malformed properties are refused naming file, line and token",
          "[unit][vnnlib]") {
  const std::string decl = declarations(2, 2);                              // lines 1-4
  const std::string bounds = "(assert (and (<= 0 X_0 1) (<= 0 X_1 1)))\n";  // line 5

  SECTION("a '(' never closed names the line it opened on") {
    const std::string msg = parse_error(decl + bounds + "(assert (or (<= Y_0 0)\n\n");
    CHECK_THAT(msg, Contains("p.vnnlib:6:") && Contains("never closed"));
  }
  SECTION("a stray ')'") {
    const std::string msg = parse_error(decl + bounds + "(assert (<= Y_0 0)))\n");
    CHECK_THAT(msg, Contains("p.vnnlib:6:") && Contains("')' closes nothing"));
  }
  SECTION("an unknown command") {
    const std::string msg = parse_error(decl + "\n(declare-fun f (Real) Real)\n");
    CHECK_THAT(msg, Contains("p.vnnlib:6:") && Contains("unknown command 'declare-fun'"));
  }
  SECTION("an undeclared variable") {
    const std::string msg = parse_error(decl + bounds + "(assert (<= Z_3 0))\n");
    CHECK_THAT(msg, Contains("p.vnnlib:6: unknown variable 'Z_3'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_2 0))\n"),
               Contains("p.vnnlib:6: unknown variable 'Y_2'"));
  }
  SECTION("a variable used before its declaration") {
    const std::string msg =
        parse_error(decl + bounds + "(assert (<= Y_2 0))\n(declare-const Y_2 Real)\n");
    CHECK_THAT(msg, Contains("p.vnnlib:6: unknown variable 'Y_2'"));
  }
  SECTION("a declaration that is not Real") {
    const std::string msg = parse_error("(declare-const X_0 Real)\n(declare-const Y_0 Int)\n");
    CHECK_THAT(msg, Contains("p.vnnlib:2:") && Contains("'Int'") && Contains("Real"));
  }
  SECTION("a variable name other than X_i / Y_j") {
    CHECK_THAT(parse_error("(declare-const Z_0 Real)\n"),
               Contains("p.vnnlib:1:") && Contains("'Z_0'"));
    CHECK_THAT(parse_error("(declare-const X_01 Real)\n"),
               Contains("p.vnnlib:1:") && Contains("'X_01'"));
  }
  SECTION("a variable declared twice") {
    const std::string msg = parse_error(decl + "(declare-const X_1 Real)\n");
    CHECK_THAT(msg, Contains("p.vnnlib:5:") && Contains("'X_1'") && Contains("line 2"));
  }
  SECTION("a gap in the indices names the missing variable") {
    const std::string msg = parse_error(
        "(declare-const X_0 Real)\n(declare-const X_2 Real)\n(declare-const Y_0 Real)\n"
        "(assert (<= 0 X_0 1))\n(assert (<= 0 X_2 1))\n");
    CHECK_THAT(msg, Contains("p.vnnlib:2:") && Contains("'X_1' is not"));
    CHECK_THAT(parse_error(decl + bounds + "(declare-const Y_3 Real)\n"),
               Contains("p.vnnlib:6:") && Contains("'Y_2' is not"));
  }
  SECTION("no inputs or no outputs") {
    CHECK_THAT(parse_error("(declare-const Y_0 Real)\n\n"),
               Contains("p.vnnlib:3:") && Contains("no input variables"));
    CHECK_THAT(parse_error("(declare-const X_0 Real)\n(assert (<= 0 X_0 1))\n"),
               Contains("no output variables"));
  }
  SECTION("a product of two variables") {
    const std::string msg = parse_error(decl + bounds + "(assert (<= (* X_0 Y_1) 1))\n");
    CHECK_THAT(msg, Contains("p.vnnlib:6:") && Contains("nonlinear") && Contains("'X_0'") &&
                        Contains("'Y_1'"));
  }
  SECTION("non-finite and malformed numbers") {
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0 1e999))\n"),
               Contains("p.vnnlib:6:") && Contains("'1e999'") && Contains("not finite"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0 -1e400))\n"),
               Contains("p.vnnlib:6:") && Contains("'-1e400'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0 inf))\n"),
               Contains("p.vnnlib:6: number 'inf' is not finite"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0 -Infinity))\n"),
               Contains("p.vnnlib:6: number '-Infinity' is not finite"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0 NaN))\n"),
               Contains("p.vnnlib:6: number 'NaN' is not finite"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0 1.2.3))\n"),
               Contains("p.vnnlib:6: malformed number '1.2.3'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0 0x10))\n"),
               Contains("p.vnnlib:6: malformed number '0x10'"));
    // finite numbers whose product overflows
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= (* 1e300 1e300 Y_0) 1))\n"),
               Contains("p.vnnlib:6:") && Contains("not finite"));
  }
  SECTION("an input without a bound names the variable") {
    const std::string msg = parse_error(decl + "(assert (<= 0 X_0 1))\n(assert (<= X_1 1))\n");
    CHECK_THAT(msg, Contains("p.vnnlib:2:") && Contains("'X_1' has no lower bound"));
  }
  SECTION("nesting deeper than the limit") {
    std::string deep = decl + bounds + "(assert\n";
    for (int i = 0; i < 1000; ++i) deep += "(and ";
    deep += "(<= Y_0 0)";
    for (int i = 0; i < 1000; ++i) deep += ")";
    const std::string msg = parse_error(deep + ")\n");
    CHECK_THAT(msg, Contains("p.vnnlib:7:") && Contains("deeper than 1000"));
    // 998 levels of and + the assert + the comparison = 1000: accepted
    std::string ok = decl + bounds + "(assert\n";
    for (int i = 0; i < 998; ++i) ok += "(and ";
    ok += "(<= Y_0 0)";
    for (int i = 0; i < 998; ++i) ok += ")";
    CHECK(parse(ok + ")\n").cases.size() == 1);
    // the same bound holds inside ignored commands
    std::string skipped = "(set-logic ";
    for (int i = 0; i < 1000; ++i) skipped += "(";
    CHECK_THAT(parse_error(skipped), Contains("p.vnnlib:1:") && Contains("deeper than 1000"));
  }
  SECTION("an index beyond the variable limit") {
    CHECK_THAT(parse_error("(declare-const X_10000000 Real)\n"),
               Contains("p.vnnlib:1:") && Contains("'X_10000000'") && Contains("10000000"));
    CHECK_THAT(parse_error("(declare-const Y_99999999999999999999999 Real)\n"),
               Contains("p.vnnlib:1:") && Contains("'Y_99999999999999999999999'"));
  }
  SECTION("a disjunctive normal form that would explode") {
    std::string text = decl + bounds;
    for (int a = 0; a < 6; ++a) {  // 10^6 cases
      text += "(assert (or";
      for (int k = 0; k < 10; ++k) text += " (<= Y_0 " + std::to_string(k) + ")";
      text += "))\n";
    }
    const std::string msg = parse_error(text);
    CHECK_THAT(msg, Contains("p.vnnlib:11:") && Contains("1000000 cases") && Contains("100000"));
  }
  SECTION("formulas and terms in the wrong places") {
    CHECK_THAT(parse_error(decl + bounds + "(assert Y_0)\n"),
               Contains("p.vnnlib:6: expected a formula, got 'Y_0'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (+ Y_0 1))\n"),
               Contains("p.vnnlib:6:") && Contains("'+'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= (and (<= Y_0 1)) 1))\n"),
               Contains("p.vnnlib:6:") && Contains("'and'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (or Y_0 (<= Y_1 0)))\n"),
               Contains("p.vnnlib:6: expected a formula, got 'Y_0'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (not (<= Y_0 1)))\n"),
               Contains("p.vnnlib:6: unknown operator 'not'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0))\n"),
               Contains("p.vnnlib:6:") && Contains("'<='") && Contains("2 operands"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (or))\n"),
               Contains("p.vnnlib:6:") && Contains("'or'"));
    CHECK_THAT(parse_error(decl + bounds + "(assert)\n"), Contains("p.vnnlib:6:"));
    CHECK_THAT(parse_error(decl + bounds + "(assert (<= Y_0 0) (<= Y_1 0))\n"),
               Contains("p.vnnlib:6:") && Contains("expected ')'"));
    CHECK_THAT(parse_error(decl + "\n  stray\n"), Contains("p.vnnlib:6:") && Contains("'stray'"));
  }
}

TEST_CASE("vnnlib: files are read, missing and oversized ones refused", "[unit][vnnlib]") {
  const std::string text =
      declarations(1, 2) + "(assert (<= 0 X_0 1))\n(assert (or (<= Y_0 0) (<= Y_1 0)))\n";
  TempFile file("prop.vnnlib");
  std::ofstream(file.path) << text;
  const VnnProperty p = moecert::vnnlib_parse(file.path);
  CHECK(p.cases.size() == 2);
  CHECK(p.cases[1].constraints[0].y_terms == Terms{{1, 1.0}});

  std::ofstream(file.path) << declarations(1, 1) << "(assert (<= Y_9 0))\n";
  CHECK_THROWS_MATCHES(
      moecert::vnnlib_parse(file.path), DataError,
      Catch::Matchers::Message(file.path + ":3: unknown variable 'Y_9' (not declared "
                                           "before use)"));

  TempFile missing("missing.vnnlib");
  CHECK_THROWS_AS(moecert::vnnlib_parse(missing.path), DataError);

  TempFile big("big.vnnlib");
  std::ofstream(big.path).close();
  fs::resize_file(big.path, moecert::vnnlib_max_bytes + 1);  // sparse: nothing is written
  CHECK_THROWS_WITH(moecert::vnnlib_parse(big.path),
                    Contains(big.path) && Contains("268435457 bytes"));
}

TEST_CASE("vnnlib_case_satisfied on hand-checked points", "[unit][vnnlib]") {
  // Box [0,1] x [-1,1]; counterexample iff Y_0 >= Y_1 (-Y_0 + Y_1 <= 0) and
  // 2·Y_1 + X_0 <= 1.
  VnnCase c;
  c.box.lower = {0, -1};
  c.box.upper = {1, 1};
  VnnConstraint a;
  a.y_terms = {{0, -1}, {1, 1}};
  VnnConstraint b;
  b.y_terms = {{1, 2}};
  b.x_terms = {{0, 1}};
  b.rhs = 1;
  c.constraints = {a, b};

  CHECK(moecert::vnnlib_case_satisfied(c, {0.5, 0}, {1, 0.25}));          // 0.5+0.5 <= 1
  CHECK(moecert::vnnlib_case_satisfied(c, {0, 1}, {3, 3}) == false);      // 6 > 1
  CHECK(moecert::vnnlib_case_satisfied(c, {0.5, 0}, {0, 0.1}) == false);  // Y_0 < Y_1
  CHECK(moecert::vnnlib_case_satisfied(c, {1.5, 0}, {1, 0}) == false);    // X_0 outside
  CHECK(moecert::vnnlib_case_satisfied(c, {1, -1}, {0, 0}));              // box corner
  // the tolerance relaxes the box and every constraint
  CHECK(moecert::vnnlib_case_satisfied(c, {1.05, 0}, {1, 0}) == false);
  CHECK(moecert::vnnlib_case_satisfied(c, {1.05, 0}, {1, 0}, 0.1));
  CHECK(moecert::vnnlib_case_satisfied(c, {0.5, 0}, {0, 0.05}, 0.1));
  // NaN is never a counterexample
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(moecert::vnnlib_case_satisfied(c, {nan, 0}, {1, 0}, 1) == false);
  CHECK(moecert::vnnlib_case_satisfied(c, {0.5, 0}, {nan, 0}, 1) == false);
  // wrong sizes are a ShapeError
  CHECK_THROWS_AS(moecert::vnnlib_case_satisfied(c, {0.5}, {1, 0}), moecert::ShapeError);
  CHECK_THROWS_AS(moecert::vnnlib_case_satisfied(c, {0.5, 0}, {1}), moecert::ShapeError);

  // and on a parsed property: class 1 must not lose to class 0 or 2
  const VnnProperty p = parse(declarations(1, 3) +
                              "(assert (<= 0 X_0 1))\n"
                              "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 Y_1))))\n");
  REQUIRE(p.cases.size() == 2);
  CHECK(moecert::vnnlib_case_satisfied(p.cases[0], {0.5}, {2, 1, 0}));
  CHECK(moecert::vnnlib_case_satisfied(p.cases[1], {0.5}, {2, 1, 0}) == false);
  CHECK(moecert::vnnlib_case_satisfied(p.cases[1], {0.5}, {0, 1, 1}));  // a tie counts
}

TEST_CASE("vnnlib_result_text: the VNN-COMP results file", "[unit][vnnlib]") {
  CHECK(moecert::vnnlib_result_text(VnnResult::holds) == "unsat\n");
  CHECK(moecert::vnnlib_result_text(VnnResult::unknown) == "unknown\n");
  CHECK(moecert::vnnlib_result_text(VnnResult::timeout) == "timeout\n");
  CHECK(moecert::vnnlib_result_text(VnnResult::holds, {1}, {2}) == "unsat\n");  // ignored
  CHECK(moecert::vnnlib_result_text(VnnResult::violated, {0.5, -1}, {2.25}) ==
        "sat\n((X_0 0.5)\n (X_1 -1)\n (Y_0 2.25))\n");
  CHECK(moecert::vnnlib_result_text(VnnResult::violated, {0.1}, {-1e-300, 1e20}) ==
        "sat\n((X_0 0.10000000000000001)\n (Y_0 -1e-300)\n (Y_1 1e+20))\n");

  // 17 significant digits read back to the same double
  const double v = 1.0 / 3.0;
  const std::string text = moecert::vnnlib_result_text(VnnResult::violated, {v}, {v});
  CHECK(text == "sat\n((X_0 0.33333333333333331)\n (Y_0 0.33333333333333331))\n");
  CHECK(std::strtod("0.33333333333333331", nullptr) == v);

  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(moecert::vnnlib_result_text(VnnResult::violated, {nan}, {0}),
                  moecert::NumericError);
  CHECK_THROWS_AS(moecert::vnnlib_result_text(VnnResult::violated, {0}, {HUGE_VAL}),
                  moecert::NumericError);
  CHECK_THROWS_AS(moecert::vnnlib_result_text(VnnResult::violated), moecert::Error);
}
