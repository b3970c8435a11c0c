// Regression: the Lipschitz forms (Theorems 5.4 / 5.5 with global and local
// constants) keep the values they had before the per-operator rules and the
// float32 allowance (global: equal; local: never smaller, most larger since the
// local constants came from bound propagation of the Jacobian).
// tests/certify/golden/lipschitz_forms.json holds the radii written by the code of commit 2561451
// for fixed models (weights and images from closed formulas, no training, no RNG);
// MOECERT_WRITE_GOLDEN=1 rewrites it.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <fstream>

#include "moecert/certify.h"
#include "moecert/error.h"
#include "moecert/model_io.h"
#include "test_util.h"

using namespace moecert;

namespace {

const std::string kGolden =
    std::string(MOECERT_SOURCE_DIR) + "/tests/certify/golden/lipschitz_forms.json";

/// Sets every parameter of `m` from a closed formula: value k of tensor t is
/// 1.2·sin(0.77·k + 1.3·t) / sqrt(fan-in), so the model is the same on any machine.
void formula_weights(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  int t = 0;
  for (auto& p : m.parameters()) {
    const double fan_in = p.dim() > 1 ? static_cast<double>(p[0].numel()) : 16.0;
    auto k = torch::arange(p.numel(), torch::kFloat64);
    auto v = 1.2 * torch::sin(0.77 * k + 1.3 * t) / std::sqrt(fan_in);
    p.copy_(v.view(p.sizes()).to(p.dtype()));
    ++t;
  }
}

/// n images of shape [C, H, W] from a formula, on the uint8 grid.
Dataset formula_images(int64_t n, int64_t c, int64_t h, int64_t w, int64_t classes) {
  auto k = torch::arange(n * c * h * w, torch::kFloat64);
  auto v = 0.5 + 0.45 * torch::sin(0.31 * k) * torch::cos(0.017 * k);
  Dataset d;
  d.name = "formula";
  d.images = (v * 255).round().to(torch::kUInt8).view({n, c, h, w});
  d.labels = torch::zeros({n}, torch::kLong);
  d.num_classes = classes;
  d.mean = std::vector<double>(static_cast<size_t>(c), 0.5);
  d.std = std::vector<double>(static_cast<size_t>(c), 0.25);
  return d;
}

ModelSpec small_spec(int64_t experts, const std::string& expert, const std::string& router,
                     Routing routing, int64_t top_k) {
  ModelSpec s;
  s.in_channels = 1, s.height = 8, s.width = 8, s.num_classes = 4;
  s.experts = experts, s.expert = expert, s.router = router, s.routing = routing, s.top_k = top_k;
  s.mean = {0.5}, s.std = {0.25};
  return s;
}

Moe formula_moe(const ModelSpec& s) {
  Moe m(s);
  formula_weights(*m);
  m->eval();
  return m;
}

/// Radii of the Lipschitz forms of `loaded` on 8 formula images, labelled by the
/// model's own prediction so that every form certifies something.
nlohmann::json lipschitz_radii(LoadedModel& loaded, Norm p, bool exact) {
  loaded.manifest = nlohmann::json::object();
  const auto& spec = loaded.is_dual() ? loaded.dual->robust().spec() : loaded.model->spec();
  auto data = formula_images(8, spec.in_channels, spec.height, spec.width, spec.num_classes);
  {
    torch::NoGradGuard ng;
    auto x = data.batch_images(torch::arange(8));
    data.labels = (loaded.is_dual() ? loaded.dual->forward(x) : loaded.model->forward(x)).argmax(1);
  }
  CertifyConfig cfg;
  cfg.norm = p;
  cfg.estimators = {Estimator::global, Estimator::local};
  cfg.box = false, cfg.exact_arithmetic = exact;  // the semantics of the golden values
  cfg.eps_grid = EpsGrid({0.01});
  cfg.empirical = false;
  cfg.bisect_steps = 12;
  std::vector<int64_t> idx(8);
  std::iota(idx.begin(), idx.end(), 0);
  auto res = certify_run(loaded, data, idx, cfg, torch::kCPU, false).to_json();
  nlohmann::json out = nlohmann::json::array();
  for (const auto& row : res["rows"]) out.push_back(row["radii"]);
  return out;
}

nlohmann::json all_cases(bool exact) {
  nlohmann::json j;
  const std::vector<std::pair<std::string, ModelSpec>> specs = {
      {"top1_mlp", small_spec(3, "mlp", "linear", Routing::top_k, 1)},
      {"soft_mlp", small_spec(2, "mlp", "mlp", Routing::soft, 1)},
      {"top2_cnn", small_spec(3, "cnn-s", "cnn", Routing::top_k, 2)},
      {"dense_cnn", small_spec(1, "cnn-s", "linear", Routing::top_k, 1)},
  };
  for (const auto& [name, spec] : specs) {
    for (auto p : {Norm::linf, Norm::l2}) {
      LoadedModel loaded;
      loaded.model = formula_moe(spec);
      j[name + "_" + norm_name(p)] = lipschitz_radii(loaded, p, exact);
    }
  }
  LoadedModel dual;
  auto standard = formula_moe(small_spec(2, "mlp", "linear", Routing::top_k, 1));
  auto robust = formula_moe(small_spec(3, "mlp", "linear", Routing::top_k, 1));
  dual.dual = Dual(standard, robust, 0.8);
  j["dual_inf"] = lipschitz_radii(dual, Norm::linf, exact);
  return j;
}

}  // namespace

TEST_CASE("the Lipschitz forms keep their values (golden radii)",
          "[soundness][certify][regression]") {
  // With exact arithmetic (no float32 allowance) and the whole ball (no pixel box): the
  // semantics the golden values were written with.
  auto now = all_cases(/*exact=*/true);
  if (std::getenv("MOECERT_WRITE_GOLDEN")) {
    std::ofstream(kGolden) << now.dump(1) << "\n";
    WARN("wrote " << kGolden);
    return;
  }
  auto golden = nlohmann::json::parse(moecert_test::read_text(kGolden));
  // The float32 allowance only lowers margins: every radius is at most the exact one.
  auto fp32 = all_cases(/*exact=*/false);
  REQUIRE(golden.size() == now.size());
  int compared = 0, positive = 0, lowered = 0, improved = 0;
  for (const auto& [name, rows] : golden.items()) {
    REQUIRE(now.contains(name));
    REQUIRE(now[name].size() == rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      for (const auto& [form, v] : rows[i].items()) {
        INFO(name << " sample " << i << " form " << form);
        REQUIRE(now[name][i].contains(form));
        const auto& w = now[name][i][form];
        if (v.is_null()) {  // +inf: nothing bounds it
          CHECK(w.is_null());
          continue;
        }
        const double old = v.get<double>(), cur = w.get<double>();
        // A local radius is the end of a bisection, which can move by one of its steps
        // when a probe sits on the edge of the (outward-rounded) interval bounds. Since
        // the local constants are shift constants with CROWN through the Jacobian's
        // graph (docs §5, §16) they are never larger, so no local radius is smaller.
        const bool local = form.size() > 6 && form.compare(form.size() - 6, 6, "_local") == 0;
        if (local) {
          CHECK(cur >= old * (1 - 0.005) - 1e-12);
          improved += cur > old * 1.01;
        } else {
          CHECK(cur <= old * (1 + 1e-9) + 1e-15);
          CHECK(cur >= old * 0.9999 - 1e-12);
        }
        const double f32 =
            fp32[name][i][form].is_null() ? INFINITY : fp32[name][i][form].get<double>();
        CHECK(f32 <= cur * (1 + (local ? 0.005 : 1e-9)) + 1e-15);
        lowered += f32 < cur;
        ++compared;
        positive += old > 0;
      }
    }
  }
  CHECK(compared >= 300);
  CHECK(positive >= 100);
  CHECK(lowered >= 50);   // the allowance is not zero
  CHECK(improved >= 50);  // the tighter local constants show
}

// A batch's stages may run in parts side by side (CertifyConfig::sample_parts), and
// samples may be batched in any way: a sample's result depends on that sample alone,
// so a split leaves every radius bit-identical, and so does another batching but for
// the last digits of the Lipschitz forms (matrix products of other shapes).
TEST_CASE("radii do not depend on how samples are batched or split",
          "[soundness][certify][regression]") {
  for (const auto& spec : {small_spec(3, "cnn-s", "cnn", Routing::top_k, 2),
                           small_spec(3, "mlp", "linear", Routing::top_k, 1)}) {
    LoadedModel loaded;
    loaded.model = formula_moe(spec);
    loaded.manifest = nlohmann::json::object();
    auto data = formula_images(12, spec.in_channels, spec.height, spec.width, spec.num_classes);
    {
      torch::NoGradGuard ng;
      data.labels = loaded.model->forward(data.batch_images(torch::arange(12))).argmax(1);
    }
    CertifyConfig cfg;
    cfg.estimators = {Estimator::local, Estimator::ibp, Estimator::crown};
    cfg.empirical = false;
    std::vector<int64_t> idx(12);
    std::iota(idx.begin(), idx.end(), 0);
    auto radii = [&](int64_t batch, int parts) {
      cfg.batch_size = batch, cfg.sample_parts = parts;
      auto res = certify_run(loaded, data, idx, cfg, torch::kCPU, false).to_json();
      nlohmann::json out = nlohmann::json::array();
      for (const auto& row : res["rows"]) out.push_back(row["radii"]);
      return out;
    };
    const auto whole = radii(12, 1);
    REQUIRE(whole.size() == 12);
    CHECK(whole.dump().find("crown") != std::string::npos);
    CHECK(radii(12, 3) == whole);
    // Other batches: other matrix shapes, for which the BLAS may choose other kernels
    // and blockings (OpenBLAS does, by CPU), so the last digits may move.
    const auto five = radii(5, 2);
    for (size_t i = 0; i < 12; ++i)
      for (auto& [k, v] : whole[i].items()) {
        INFO("sample " << i << " " << k);
        REQUIRE(five[i].contains(k));
        const double a = v.get<double>(), b = five[i][k].get<double>();
        CHECK(std::abs(a - b) <= 1e-12 * std::abs(a));
      }
  }
  CertifyConfig bad;
  bad.sample_parts = -1;
  LoadedModel loaded;
  loaded.model = formula_moe(small_spec(3, "mlp", "linear", Routing::top_k, 1));
  auto data = formula_images(2, 1, 8, 8, 4);
  CHECK_THROWS_AS(certify_run(loaded, data, {0, 1}, bad, torch::kCPU, false), ConfigError);
}
