// Certification benchmark, all cores:
//  1. certification of an E = 4 cnn-s MoE on Fashion-MNIST-shaped inputs, samples/s
//     of certify_run, radius search included, PGD cross-check excluded, for
//     a. the Lipschitz estimators local + global (target >= 10 samples/s with the
//        interval Jacobian; also with CROWN through the Jacobian's graph, the default),
//     b. CROWN alone (target >= 20 samples/s),
//     c. CROWN then α-CROWN: the α-CROWN part's rate is samples / (t_c − t_b)
//        (target >= 2 samples/s);
//  2. `global` constants (p = 2, 32x32 inputs) of an E = 4 ResNet-18 MoE: seconds
//     for the router and all experts (target <= 60 s), and one CROWN-IBP bound pass
//     of a ResNet-18 expert (that it runs, and its cost);
//  3. the cost of one lipschitz_local call on a cnn-s expert (diagnostic);
//  4. Jacobian bounds of that expert (docs §16): the mean per-logit bound of the
//     interval Jacobian and of the relaxed one (interval and CROWN intermediate
//     bounds), the plain and the shift constant, and what each costs.
// With --checkpoint the first part certifies that trained model on the real test set.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "bench_util.h"
#include "moecert/bounds.h"
#include "moecert/certify.h"
#include "moecert/checkpoint.h"
#include "moecert/runtime.h"

using namespace moecert;

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_certify: certification speed"};
  std::string out = "bench_certify.json", checkpoint;
  int threads = 0;
  int64_t samples = 200;
  bool skip_resnet = false, skip_certify = false;
  app.add_option("--out", out, "JSON output file")->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores")->capture_default_str();
  app.add_option("--samples", samples, "samples certified in part 1")->capture_default_str();
  app.add_option("--checkpoint", checkpoint, "a trained E = 4 cnn-s MoE (default: random weights)");
  app.add_flag("--skip-resnet", skip_resnet, "skip part 2");
  app.add_flag("--skip-certify", skip_certify, "skip part 1");
  CLI11_PARSE(app, argc, argv);
  threads = runtime_threads(threads);
  torch::manual_seed(0);
  nlohmann::json j = {{"benchmark", "bench_certify"}, {"threads", threads}};

  // 1. local certification of an E = 4 cnn-s MoE
  LoadedModel loaded;
  Dataset data;
  if (!checkpoint.empty()) {
    loaded = model_load(checkpoint, torch::kCPU);
    DataSpec d;
    d.name = loaded.manifest["dataset"].value("name", "fashion-mnist");
    d.train = false;
    data = data_load(d);
  } else {
    ModelSpec spec;
    loaded.model = Moe(spec);
    loaded.manifest = {{"architecture", spec.to_json()}};
    DataSpec d;
    d.name = "synthetic";
    d.samples = samples;
    d.train = false;
    data = data_load(d);
  }
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < std::min(samples, data.size()); ++i) idx.push_back(i);
  auto run_with = [&](std::vector<Estimator> est, const char* what, const char* key, double target,
                      bool jacobian_crown = true) {
    CertifyConfig cfg;
    cfg.empirical = false;
    cfg.jacobian_crown = jacobian_crown;
    cfg.estimators = std::move(est);
    auto t0 = std::chrono::steady_clock::now();
    auto res = certify_run(loaded, data, idx, cfg, torch::kCPU, false).to_json();
    const double wall = seconds_since(t0);
    const double certify_s = res["timing"]["certify_seconds"].get<double>();
    const double rate = res["timing"]["certify_samples_per_s"].get<double>();
    std::printf("%s certification, E=4 cnn-s MoE (%s): %zu samples in %.1f s = %.1f samples/s",
                what, checkpoint.empty() ? "random weights" : checkpoint.c_str(), idx.size(),
                certify_s, rate);
    if (target > 0) std::printf(" (target >= %.0f)", target);
    std::printf("\n");
    j[key] = {{"samples", idx.size()},    {"seconds", certify_s},
              {"wall_seconds", wall},     {"samples_per_s", rate},
              {"checkpoint", checkpoint}, {"aggregates", res["aggregates"]}};
    return certify_s;
  };
  if (!skip_certify) {
    run_with({Estimator::global, Estimator::local}, "local+global (--jacobian interval)",
             "local_certify", 10, false);
    run_with({Estimator::global, Estimator::local}, "local+global (--jacobian crown)",
             "local_crown_certify", 0);
    const double t_crown = run_with({Estimator::crown}, "CROWN", "crown_certify", 20);
    const double t_both = run_with({Estimator::crown, Estimator::alpha_crown},
                                   "CROWN + alpha-CROWN", "alpha_crown_certify", 0);
    const double alpha_rate =
        t_both > t_crown ? static_cast<double>(idx.size()) / (t_both - t_crown) : 0.0;
    std::printf("alpha-CROWN part: %zu samples in %.1f s = %.1f samples/s (target >= 2)\n",
                idx.size(), t_both - t_crown, alpha_rate);
    j["alpha_crown_part"] = {
        {"samples", idx.size()}, {"seconds", t_both - t_crown}, {"samples_per_s", alpha_rate}};
  }

  // 3. one lipschitz_local call
  {
    auto& m = *loaded.model;
    m.to(torch::kFloat64);
    auto g = m.component_graph(0);
    auto x =
        data.batch_images(torch::arange(std::min<int64_t>(100, data.size()))).to(torch::kFloat64);
    auto eps = torch::full({x.size(0)}, 0.005, torch::kFloat64);
    const double s =
        moecert_bench::time_per_call([&] { lipschitz_local(g, Norm::linf, x, eps); }, 1.0);
    std::printf("lipschitz_local, one cnn-s expert, %lld samples: %.3f s (%.0f samples/s)\n",
                static_cast<long long>(x.size(0)), s, x.size(0) / s);
    j["local_call"] = {{"samples", x.size(0)}, {"seconds", s}};
  }

  // 4. Jacobian bounds of the most used expert (expert 0 with random weights).
  {
    auto& m = *loaded.model;
    m.to(torch::kFloat64);
    auto x =
        data.batch_images(torch::arange(std::min<int64_t>(100, data.size()))).to(torch::kFloat64);
    int64_t expert = 0;
    if (m.router()) {
      torch::NoGradGuard ng;
      auto pick = std::get<1>(graph_forward(m.component_graph(-1), x).max(1));
      expert = std::get<1>(torch::bincount(pick).max(0)).item<int64_t>();
    }
    auto graph = m.component_graph(expert);
    const BoundGraph g(graph, {x.size(1), x.size(2), x.size(3)});
    const int64_t K = g.output_shape()[0];
    auto C = torch::eye(K, torch::kFloat64).unsqueeze(0).expand({x.size(0), K, K}).contiguous();
    for (double e : {0.005, 0.02, 0.05}) {
      auto eps = torch::full({x.size(0)}, e, torch::kFloat64);
      BoundOptions opt;
      opt.method = BoundMethod::ibp;
      torch::Tensor interval, r_ibp, r_crown, plain, shift;
      auto pass = bound_forward(g, {x, eps, Norm::linf, true}, opt);
      const double t_int =
          moecert_bench::time_per_call([&] { interval = bound_jacobian_norms(pass, C); }, 0.5);
      const double t_ibp = moecert_bench::time_per_call(
          [&] { r_ibp = bound_jacobian_relaxed(pass, C, BoundMethod::ibp); }, 0.5);
      const double t_crown = moecert_bench::time_per_call(
          [&] { r_crown = bound_jacobian_relaxed(pass, C, BoundMethod::crown); }, 0.5);
      plain = lipschitz_local(graph, Norm::linf, x, eps, true);
      const double t_shift = moecert_bench::time_per_call(
          [&] { shift = lipschitz_local_shift(graph, Norm::linf, x, eps, true); }, 0.5);
      auto mean = [](const torch::Tensor& t) { return t.mean().item<double>(); };
      std::printf(
          "Jacobian bounds, expert %lld, %lld samples, L-inf eps = %.3g: mean per-logit bound "
          "interval %.3g "
          "(%.3f s), relaxed/IBP %.3g (%.3f s), relaxed/CROWN %.3g (%.3f s); mean local constant "
          "%.3g, "
          "shift constant %.3g (%.3f s)\n",
          static_cast<long long>(expert), static_cast<long long>(x.size(0)), e, mean(interval),
          t_int, mean(r_ibp), t_ibp, mean(r_crown), t_crown, mean(plain), mean(shift), t_shift);
      j["jacobian"].push_back({{"eps", e},
                               {"expert", expert},
                               {"interval", mean(interval)},
                               {"interval_s", t_int},
                               {"relaxed_ibp", mean(r_ibp)},
                               {"relaxed_ibp_s", t_ibp},
                               {"relaxed_crown", mean(r_crown)},
                               {"relaxed_crown_s", t_crown},
                               {"local", mean(plain)},
                               {"shift", mean(shift)},
                               {"shift_s", t_shift}});
    }
  }

  // 2. global constants of an E = 4 ResNet-18 MoE, p = 2, 32x32
  if (!skip_resnet) {
    ModelSpec spec;
    spec.expert = "resnet18", spec.in_channels = 3, spec.height = 32, spec.width = 32;
    spec.mean = {0.5, 0.5, 0.5}, spec.std = {0.25, 0.25, 0.25};
    Moe moe(spec);
    moe->eval();
    auto t1 = std::chrono::steady_clock::now();
    std::vector<double> consts;
    consts.push_back(lipschitz_global(moe->component_graph(-1), Norm::l2, {3, 32, 32}).value);
    for (int64_t i = 0; i < 4; ++i)
      consts.push_back(lipschitz_global(moe->component_graph(i), Norm::l2, {3, 32, 32}).value);
    const double s = seconds_since(t1);
    std::printf("global constants (p=2) of an E=4 ResNet-18 MoE + router: %.1f s (target <= 60)\n",
                s);
    j["resnet18_global_p2"] = {{"seconds", s}, {"constants", consts}};
    // One bound pass of expert 0's path at L-inf eps = 1/255 around one random image,
    // bounding the 9 margins of class 0: IBP intermediate bounds, then a CROWN walk of
    // the margins (CROWN-IBP). Full CROWN (CROWN bounds on every unstable unit of every
    // layer) did not finish within 10 minutes on 2 cores at 32x32.
    BoundGraph g(moe->component_graph(0), {3, 32, 32});
    BoundOptions opt;
    opt.method = BoundMethod::ibp;
    auto x = torch::rand({1, 3, 32, 32}, torch::kFloat64);
    auto t2 = std::chrono::steady_clock::now();
    auto pass =
        bound_forward(g, {x, torch::full({1}, 1.0 / 255, torch::kFloat64), Norm::linf, true}, opt);
    pass.opt.method = BoundMethod::crown;
    auto C = (torch::nn::functional::one_hot(torch::zeros({1}, torch::kLong), 10)
                  .to(torch::kFloat64)
                  .unsqueeze(1) -
              torch::eye(10, torch::kFloat64).unsqueeze(0))
                 .narrow(1, 1, 9)
                 .contiguous();
    auto low = bound_specs(pass, C).lower;
    const double sc = seconds_since(t2);
    std::printf(
        "one CROWN-IBP pass of a ResNet-18 expert, 1 sample, eps = 1/255: %.1f s (min margin bound "
        "%.3g)\n",
        sc, low.min().item<double>());
    j["resnet18_crown_ibp_pass"] = {{"seconds", sc},
                                    {"min_margin_lower", low.min().item<double>()}};
  }
  write_file_atomic(out, j.dump(2) + "\n");
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
