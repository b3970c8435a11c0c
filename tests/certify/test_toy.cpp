// Ground truth (SPEC §4.5): a toy MoE on 2-D inputs, where the exact minimal
// adversarial radius is found by dense search. certified <= exact <= empirical.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/certify.h"
#include "moecert/model_io.h"

using namespace moecert;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

/// Three Gaussian blobs in [0, 1]^2, quantised to the uint8 pixel grid.
Dataset blobs(int64_t n, uint64_t seed) {
  torch::manual_seed(seed);
  auto labels = torch::randint(3, {n}, torch::kLong);
  auto centres = torch::tensor({{0.3, 0.3}, {0.7, 0.35}, {0.5, 0.72}}, f64);
  auto pts = centres.index_select(0, labels) + torch::randn({n, 2}, f64) * 0.08;
  Dataset d;
  d.name = "toy2d";
  d.images = (pts.clamp(0, 1) * 255).round().to(torch::kUInt8).view({n, 1, 1, 2});
  d.labels = labels;
  d.num_classes = 3;
  d.mean = {0.5}, d.std = {0.25};
  return d;
}

/// The toy architectures: E experts (1 = dense) with an MLP or linear router.
struct Toy {
  int64_t experts = 3, top_k = 1;
  Routing routing = Routing::top_k;
  std::string router = "mlp";
  uint64_t seed = 7;
  int steps = 300;
};

Moe train_toy(const Toy& t, const Dataset& train) {
  ModelSpec s;
  s.in_channels = 1, s.height = 1, s.width = 2, s.num_classes = 3;
  s.experts = t.experts, s.expert = "mlp", s.router = t.router, s.routing = t.routing,
  s.top_k = t.top_k;
  s.mean = {0.5}, s.std = {0.25};
  torch::manual_seed(t.seed);
  Moe model(s);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  auto x = train.batch_images(torch::arange(train.size())), y = train.labels;
  for (int step = 0; step < t.steps; ++step) {
    opt.zero_grad();
    torch::nll_loss(model->forward(x), y).backward();
    opt.step();
  }
  model->eval();
  return model;
}

struct Exact {
  double all;  ///< min distance to a differently classified grid point (an upper bound on r*)
  double box;  ///< the same restricted to [0, 1]^2 (what a box-projected attack can reach)
};

/// Dense search around x on a grid of spacing h within radius R.
Exact exact_radius(const std::function<torch::Tensor(const torch::Tensor&)>& forward,
                   const torch::Tensor& x, int64_t pred, Norm p, double h, double R) {
  torch::NoGradGuard ng;
  const auto n = static_cast<int64_t>(2 * R / h) + 1;
  auto axis = torch::linspace(-R, R, n, f64);
  auto dx = axis.view({-1, 1}).expand({n, n}).reshape({-1}),
       dy = axis.view({1, -1}).expand({n, n}).reshape({-1});
  auto px = x[0][0][0][0].item<double>() + dx, py = x[0][0][0][1].item<double>() + dy;
  auto pts = torch::stack({px, py}, 1).view({-1, 1, 1, 2});
  auto cls = forward(pts.to(torch::kFloat32)).argmax(1);  // the float32 model people run
  auto dist = p == Norm::linf ? torch::max(dx.abs(), dy.abs()) : torch::sqrt(dx * dx + dy * dy);
  auto other = cls.ne(pred);
  auto inbox = (px >= 0) & (px <= 1) & (py >= 0) & (py <= 1);
  auto big = torch::full_like(dist, R);
  return {torch::where(other, dist, big).min().item<double>(),
          torch::where(other & inbox, dist, big).min().item<double>()};
}

/// certified <= exact <= empirical for every sample and form of a loaded toy model.
void check_ground_truth(LoadedModel& loaded, const Dataset& test, Norm p, bool box,
                        const std::function<torch::Tensor(const torch::Tensor&)>& forward) {
  CertifyConfig cfg;
  cfg.norm = p;
  cfg.box = box;
  cfg.estimators = estimators_parse("all");
  cfg.alpha_steps = 10;
  cfg.eps_grid = EpsGrid({0.01, 0.05});
  cfg.attack.norm = p, cfg.attack.steps = 30, cfg.attack.restarts = 2;
  cfg.empirical_max = 1.0, cfg.empirical_tol = 1e-4;
  cfg.bisect_steps = 14;
  std::vector<int64_t> idx(static_cast<size_t>(test.size()));
  std::iota(idx.begin(), idx.end(), 0);
  auto res = certify_run(loaded, test, idx, cfg, torch::kCPU, false).to_json();
  CHECK(res["aggregates"]["violation_count"] == 0);
  // The grid search gives an upper bound on the exact radius; it can miss the exact
  // boundary point by about a grid step, so "exact <= empirical" allows 2h.
  const double h = 0.0025, R = 0.4;
  int certified = 0, bp_beats_lipschitz = 0, compared = 0;
  for (const auto& row : res["rows"]) {
    if (!row["correct"].get<bool>()) continue;
    const int64_t i = row["index"];
    auto x = test.batch_images(torch::tensor({i})).to(torch::kFloat64);
    auto exact = exact_radius(forward, x, row["pred"], p, h, R);
    INFO("sample " << i << " exact " << exact.all << " " << row.dump());
    const double truth = box ? exact.box : exact.all;  // the domain that was certified
    double best = 0, best_lipschitz = 0, best_bp = 0;
    for (const auto& [form, v] : row["radii"].items()) {
      const double r = v.get<double>();
      INFO("form " << form);
      if (truth < R) CHECK(r <= truth + 1e-12);  // certified <= exact
      best = std::max(best, r);
      const bool lipschitz =
          form.find("_global") != std::string::npos || form.find("_local") != std::string::npos;
      (lipschitz ? best_lipschitz : best_bp) = std::max(lipschitz ? best_lipschitz : best_bp, r);
    }
    CHECK(row["headline"]["radius"].get<double>() == best);
    certified += best > 0;
    ++compared;
    bp_beats_lipschitz += best_bp >= best_lipschitz;
    // exact <= empirical (the attack's upper bound), up to the grid and bisection resolution.
    const auto& emp = row["empirical_radius"];
    const double reachable = box ? exact.box : exact.all;
    if (reachable < R) {
      REQUIRE(!emp.is_null());
      CHECK(reachable <= emp.get<double>() + 2 * h + 1e-4);
    }
  }
  CHECK(certified >= 10);                          // the certificates are non-trivial on this toy
  CHECK(bp_beats_lipschitz * 10 >= compared * 9);  // bound propagation is the tighter family
}

void check_toy(const Toy& t, Norm p, bool box) {
  auto train = blobs(600, 1), test = blobs(30, 2);
  auto model = train_toy(t, train);
  LoadedModel loaded;
  loaded.model = model;
  loaded.manifest = {{"architecture", model->spec().to_json()}};
  check_ground_truth(loaded, test, p, box,
                     [&](const torch::Tensor& x) { return model->forward(x); });
}

}  // namespace

TEST_CASE("toy 2-D MoE, top-1 (candidate form): certified <= exact <= empirical (L-inf, box)",
          "[soundness][certify]") {
  check_toy({}, Norm::linf, true);
}

TEST_CASE("toy 2-D MoE, soft routing (mixture form): certified <= exact <= empirical (L2, box)",
          "[soundness][certify]") {
  Toy t;
  t.routing = Routing::soft, t.router = "linear";
  check_toy(t, Norm::l2, true);
}

TEST_CASE("toy 2-D MoE, top-2 (mixture form): certified <= exact <= empirical (L-inf, whole ball)",
          "[soundness][certify]") {
  Toy t;
  t.top_k = 2;
  check_toy(t, Norm::linf, false);
}

TEST_CASE("toy 2-D dense model (margin form): certified <= exact <= empirical (L2, whole ball)",
          "[soundness][certify]") {
  Toy t;
  t.experts = 1;
  check_toy(t, Norm::l2, false);
}

TEST_CASE("toy 2-D dual-model (dual form): certified <= exact <= empirical (L-inf, box)",
          "[soundness][certify]") {
  auto train = blobs(600, 1), test = blobs(30, 2);
  Toy weak;
  weak.seed = 3, weak.steps = 60;  // a less fitted standard member
  auto standard = train_toy(weak, train), robust = train_toy({}, train);
  LoadedModel loaded;
  loaded.dual = Dual(standard, robust, 0.8);
  loaded.dual->eval();
  loaded.manifest = nlohmann::json::object();
  check_ground_truth(loaded, test, Norm::linf, true,
                     [&](const torch::Tensor& x) { return loaded.dual->forward(x); });
}
