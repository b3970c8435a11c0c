#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>

#include "moecert/certify.h"

using namespace moecert;

namespace {

std::vector<double> softmax(std::vector<double> z) {
  double m = *std::max_element(z.begin(), z.end()), s = 0;
  for (auto& v : z) s += (v = std::exp(v - m));
  for (auto& v : z) v /= s;
  return z;
}

MemberEval two_experts(Routing routing) {
  MemberEval m;
  m.g = {1.0, 0.0};
  m.h = {{3.0, 0.0, -1.0}, {2.0, 1.0, 0.0}};
  m.routing = routing;
  m.top_k = 1;
  return m;
}

}  // namespace

TEST_CASE("Theorem 5.4 radii match hand-computed values (soft routing)", "[unit][certify]") {
  auto m = two_experts(Routing::soft);
  MemberConstants c{2.0, {4.0, 6.0}};
  auto a = softmax(m.g);
  auto f0 = softmax(m.h[0]), f1 = softmax(m.h[1]);
  std::vector<double> F(3);
  for (int k = 0; k < 3; ++k) F[k] = a[0] * f0[k] + a[1] * f1[k];
  const double margin = F[0] - std::max(F[1], F[2]);
  auto r = radii_single(m, c, 0);
  // tight: margin / (L_g + Σ a_i L_hi); paper: margin / Σ_i (L_g + L_hi)
  CHECK(r.tight == Approx(margin / (2.0 + a[0] * 4.0 + a[1] * 6.0)).epsilon(1e-8));
  CHECK(r.paper == Approx(margin / ((2.0 + 4.0) + (2.0 + 6.0))).epsilon(1e-8));
  CHECK(r.tight >= r.paper);
  CHECK(std::isnan(r.candidate));
  // Rounded down: never above the exact value.
  CHECK(r.tight <= margin / (2.0 + a[0] * 4.0 + a[1] * 6.0));
  // A wrong label certifies nothing.
  CHECK(radii_single(m, c, 2).tight == 0.0);
}

TEST_CASE("top-1 radii: routing stability and candidate experts", "[unit][certify]") {
  auto m = two_experts(Routing::top_k);
  MemberConstants c{2.0, {4.0, 6.0}};
  auto r = radii_single(m, c, 0);
  const double stability = (1.0 - 0.0) / (2 * 2.0);
  auto f0 = softmax(m.h[0]);
  const double own = f0[0] - f0[1];  // expert 0 alone, probability margin
  CHECK(r.tight == Approx(std::min(stability, own / 4.0)).epsilon(1e-8));
  // candidate: min over experts of max(own radius, reach); expert 1 classifies 0 too.
  auto f1 = softmax(m.h[1]);
  const double r0 = std::max(own / 4.0, 3.0 / (2 * 4.0)),
               r1 = std::max((f1[0] - f1[1]) / 6.0, 1.0 / (2 * 6.0));
  CHECK(r.candidate == Approx(std::min(r0, std::max(r1, stability))).epsilon(1e-8));
  CHECK(r.candidate >= r.tight);
  // If the runner-up expert misclassifies, the candidate radius stops at its reach.
  m.h[1] = {0.0, 2.0, 0.0};
  CHECK(radii_single(m, c, 0).candidate == Approx(std::min(r0, stability)).epsilon(1e-8));
}

TEST_CASE("dense margin radius", "[unit][certify]") {
  MemberEval m;
  m.h = {{2.0, 0.5, -1.0}};
  MemberConstants c{0.0, {3.0}};
  auto r = radii_single(m, c, 0);
  CHECK(r.margin == Approx(1.5 / 6.0).epsilon(1e-8));
  auto f = softmax(m.h[0]);
  CHECK(r.tight == Approx((f[0] - f[1]) / 3.0).epsilon(1e-8));
}

TEST_CASE("Theorem 5.5: eps_b does not depend on F_S, tight >= max(eps_a, eps_b)",
          "[unit][certify]") {
  auto robust = two_experts(Routing::soft);
  MemberConstants cr{1.0, {1.5, 2.0}};
  MemberEval standard;
  standard.h = {{0.5, 0.2, 0.1}};
  MemberConstants cs{0.0, {50.0}};
  torch::manual_seed(5);
  double eps_b = -1;
  int compared = 0;
  for (int t = 0; t < 20; ++t) {
    for (auto& v : standard.h[0]) v = torch::randn({1}).item<double>() * 3;
    cs.experts[0] = 1.0 + 100.0 * torch::rand({1}).item<double>();
    auto d = radii_dual(standard, cs, robust, cr, 0.9, 0);
    CHECK(d.tight >= d.thm55);
    CHECK(d.thm55 == std::max(d.eps_a, d.eps_b));
    if (d.thm55 == 0) continue;  // F_D misclassifies this x: nothing certified
    if (eps_b < 0) eps_b = d.eps_b;
    CHECK(d.eps_b == eps_b);
    ++compared;
  }
  CHECK(compared >= 5);
  CHECK(eps_b > 0);
  // By hand: eps_b = min_k (m_R^k - (1-α)/α) / K_R.
  auto a = softmax(robust.g);
  auto f0 = softmax(robust.h[0]), f1 = softmax(robust.h[1]);
  double mr = 1e9;
  for (int k = 1; k < 3; ++k) mr = std::min(mr, a[0] * (f0[0] - f0[k]) + a[1] * (f1[0] - f1[k]));
  const double KR = 1.0 + a[0] * 1.5 + a[1] * 2.0;
  CHECK(eps_b == Approx((mr - 0.1 / 0.9) / KR).epsilon(1e-7));
}
