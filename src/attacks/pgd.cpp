// PGD and FGSM over an arbitrary log-prob map, and the RA / RA-E / RA-R targets.
#include "moecert/attacks.h"
#include "moecert/defaults.h"
#include "moecert/error.h"
#include "moecert/runtime.h"

#include <torch/torch.h>

namespace moecert {

Norm norm_parse(const std::string& s) {
  if (s == "inf" || s == "linf") return Norm::linf;
  if (s == "2" || s == "l2") return Norm::l2;
  throw ConfigError::invalid("--norm", s, "inf | 2");
}

std::string norm_name(Norm n) { return n == Norm::linf ? "inf" : "2"; }

AttackLoss attack_loss_parse(const std::string& s) {
  if (s == "ce") return AttackLoss::ce;
  if (s == "margin") return AttackLoss::margin;
  throw ConfigError::invalid("--loss", s, "ce | margin");
}

namespace {

/// Per-sample loss to maximise. log_probs: [B, K], y: [B] -> [B]
torch::Tensor attack_loss(const torch::Tensor& log_probs, const torch::Tensor& y, AttackLoss loss) {
  auto true_lp = log_probs.gather(1, y.unsqueeze(1)).squeeze(1);
  if (loss == AttackLoss::ce) return -true_lp;
  // Margin (CW on log-probabilities): best other class minus the true class.
  auto others = log_probs.scatter(1, y.unsqueeze(1), -std::numeric_limits<float>::infinity());
  return std::get<0>(others.max(/*dim=*/1)) - true_lp;
}

/// Euclidean norm per sample, kept broadcastable. [B, ...] -> [B, 1, 1, 1]
torch::Tensor l2_per_sample(const torch::Tensor& t) {
  std::vector<int64_t> shape(static_cast<size_t>(t.dim()), 1);
  shape[0] = t.size(0);
  return t.flatten(1).norm(2, /*dim=*/1).view(shape);
}

/// Projects x_adv onto the ε-ball around x and (with `box`) onto [0, 1].
torch::Tensor project(const torch::Tensor& x_adv, const torch::Tensor& x, Norm norm, double eps, bool box) {
  auto delta = x_adv - x;
  if (norm == Norm::linf) {
    delta = delta.clamp(-eps, eps);
  } else {
    auto n = l2_per_sample(delta);
    delta = delta * torch::clamp_max(eps / (n + 1e-12), 1.0);
  }
  return box ? (x + delta).clamp(0.0, 1.0) : x + delta;
}

torch::Tensor random_start(const torch::Tensor& x, Norm norm, double eps) {
  if (norm == Norm::linf) return x + torch::empty_like(x).uniform_(-eps, eps);
  auto dir = torch::randn_like(x);
  dir = dir / (l2_per_sample(dir) + 1e-12);
  auto radius = torch::rand({x.size(0)}, x.options()).view({-1, 1, 1, 1}) * eps;
  return x + dir * radius;
}

/// Ascent direction of the given norm's steepest step. grad: [B, ...]
torch::Tensor ascent_direction(const torch::Tensor& grad, Norm norm) {
  if (norm == Norm::linf) return grad.sign();
  return grad / (l2_per_sample(grad) + 1e-12);
}

/// Per-sample radius versions: eps [B, 1, 1, 1].
torch::Tensor project_each(const torch::Tensor& x_adv, const torch::Tensor& x, Norm norm,
                           const torch::Tensor& eps, bool box) {
  auto delta = x_adv - x;
  if (norm == Norm::linf) {
    delta = torch::max(torch::min(delta, eps), -eps);
  } else {
    auto n = l2_per_sample(delta);
    delta = delta * torch::clamp_max(eps / (n + 1e-12), 1.0);
  }
  return box ? (x + delta).clamp(0.0, 1.0) : x + delta;
}

torch::Tensor random_start_each(const torch::Tensor& x, Norm norm, const torch::Tensor& eps) {
  if (norm == Norm::linf) return x + (torch::rand_like(x) * 2 - 1) * eps;
  auto dir = torch::randn_like(x);
  dir = dir / (l2_per_sample(dir) + 1e-12);
  return x + dir * torch::rand_like(eps) * eps;
}

torch::Tensor input_gradient(const LogProbFn& f, const torch::Tensor& x_adv,
                             const PerSampleLoss& loss) {
  auto xa = x_adv.detach().requires_grad_(true);
  auto l = loss(f(xa));
  return torch::autograd::grad({l.sum()}, {xa})[0];
}

}  // namespace

torch::Tensor attack_pgd_objective(const LogProbFn& f, const torch::Tensor& x,
                                   const PerSampleLoss& loss, const PgdConfig& cfg,
                                   const torch::Tensor& y) {
  if (cfg.eps < 0) throw ConfigError::invalid("--eps", std::to_string(cfg.eps), ">= 0");
  torch::Tensor best, best_loss, best_wrong;
  for (int r = 0; r < std::max(1, cfg.restarts); ++r) {
    auto x_adv = cfg.random_start ? project(random_start(x, cfg.norm, cfg.eps), x, cfg.norm, cfg.eps, cfg.box)
                                  : x.clone();
    for (int s = 0; s < cfg.steps; ++s) {
      auto g = input_gradient(f, x_adv, loss);
      x_adv = project(x_adv + cfg.step_size * ascent_direction(g, cfg.norm), x, cfg.norm, cfg.eps, cfg.box);
    }
    if (cfg.restarts <= 1) return x_adv.detach();
    torch::Tensor lp;
    {
      torch::NoGradGuard no_grad;
      lp = f(x_adv);
    }
    auto l = loss(lp).detach();
    auto wrong = y.defined() ? lp.argmax(1).ne(y) : torch::zeros_like(l, torch::kBool);
    if (!best.defined()) {
      best = x_adv, best_loss = l, best_wrong = wrong;
      continue;
    }
    // Prefer a misclassifying point; among equals, the higher loss.
    auto take = (wrong & ~best_wrong) | ((wrong == best_wrong) & (l > best_loss));
    best = torch::where(take.view({-1, 1, 1, 1}), x_adv, best);
    best_loss = torch::where(take, l, best_loss);
    best_wrong = best_wrong | wrong;
  }
  return best.detach();
}

torch::Tensor attack_pgd_each(const LogProbFn& f, const torch::Tensor& x, const torch::Tensor& y,
                              const torch::Tensor& eps, const PgdConfig& cfg,
                              const std::vector<uint64_t>& row_seeds) {
  if (eps.dim() != 1 || eps.size(0) != x.size(0))
    throw ShapeError::unexpected("attack_pgd_each eps", "[B]", eps.sizes().vec());
  auto e = eps.to(x.options()).view({-1, 1, 1, 1});
  auto step = e * (cfg.steps > 0 ? defaults::step_scale / cfg.steps : 1.0);
  const AttackLoss kind = cfg.loss;
  PerSampleLoss loss = [&y, kind](const torch::Tensor& lp) { return attack_loss(lp, y, kind); };
  if (!row_seeds.empty() && static_cast<int64_t>(row_seeds.size()) != x.size(0))
    throw ShapeError::unexpected("attack_pgd_each row seeds", "one per sample", {static_cast<int64_t>(row_seeds.size())});
  torch::Tensor best, found;
  for (int r = 0; r < std::max(1, cfg.restarts); ++r) {
    torch::Tensor start;
    if (cfg.random_start && !row_seeds.empty()) {
      // Each row's start depends only on its own seed (and the restart), not on
      // which other rows share the batch: sharded runs reproduce unsharded ones.
      std::vector<torch::Tensor> rows;
      for (int64_t b = 0; b < x.size(0); ++b) {
        auto gen = at::make_generator<at::CPUGeneratorImpl>(row_seeds[static_cast<size_t>(b)] * 1000003ULL +
                                                            static_cast<uint64_t>(r));
        auto opts = x.options().device(torch::kCPU);
        auto xb = x[b].unsqueeze(0).cpu();
        auto eb = e[b].unsqueeze(0).cpu();
        torch::Tensor noise;
        if (cfg.norm == Norm::linf) {
          noise = (torch::rand(xb.sizes(), gen, opts) * 2 - 1) * eb;
        } else {
          auto dir = torch::randn(xb.sizes(), gen, opts);
          dir = dir / (l2_per_sample(dir) + 1e-12);
          noise = dir * torch::rand({1, 1, 1, 1}, gen, opts) * eb;
        }
        rows.push_back(xb + noise);
      }
      start = torch::cat(rows, 0).to(x.device());
    }
    auto x_adv = cfg.random_start
                     ? project_each(start.defined() ? start : random_start_each(x, cfg.norm, e), x, cfg.norm, e, cfg.box)
                     : x.clone();
    for (int s = 0; s < cfg.steps; ++s) {
      auto g = input_gradient(f, x_adv, loss);
      x_adv = project_each(x_adv + step * ascent_direction(g, cfg.norm), x, cfg.norm, e, cfg.box);
    }
    torch::Tensor wrong;
    {
      torch::NoGradGuard no_grad;
      wrong = f(x_adv).argmax(1).ne(y);
    }
    if (!best.defined()) {
      best = x_adv, found = wrong;
      continue;
    }
    auto take = wrong & ~found;  // keep the first restart that misclassifies
    best = torch::where(take.view({-1, 1, 1, 1}), x_adv, best);
    found = found | wrong;
  }
  return best.detach();
}

torch::Tensor attack_pgd(const LogProbFn& f, const torch::Tensor& x, const torch::Tensor& y,
                         const PgdConfig& cfg) {
  const AttackLoss kind = cfg.loss;
  return attack_pgd_objective(
      f, x, [&y, kind](const torch::Tensor& lp) { return attack_loss(lp, y, kind); }, cfg, y);
}

torch::Tensor attack_fgsm(const LogProbFn& f, const torch::Tensor& x, const torch::Tensor& y,
                          Norm norm, double eps) {
  auto g = input_gradient(f, x, [&y](const torch::Tensor& lp) {
    return attack_loss(lp, y, AttackLoss::ce);
  });
  return project(x + eps * ascent_direction(g, norm), x, norm, eps, /*box=*/true).detach();
}

FrozenParameters::FrozenParameters(torch::nn::Module& module)
    : FrozenParameters(module.parameters()) {}

FrozenParameters::FrozenParameters(const std::vector<torch::Tensor>& parameters) {
  for (auto p : parameters)
    if (p.requires_grad()) frozen_.push_back(p), p.requires_grad_(false);
}

FrozenParameters::~FrozenParameters() {
  for (auto& p : frozen_) p.requires_grad_(true);
}

LogProbFn attack_target_fn(MoeImpl& model, AttackTarget target, const torch::Tensor& x_clean) {
  switch (target) {
    case AttackTarget::whole:
      return [&model](const torch::Tensor& x) { return model.forward(x); };
    case AttackTarget::experts: {
      MoeRouting clean;
      {
        torch::NoGradGuard no_grad;
        clean = model.route(x_clean);
      }
      return [&model, clean](const torch::Tensor& x) {
        return model.forward_parts(x, x, &clean).log_probs;
      };
    }
    case AttackTarget::router:
      return [&model, x_clean](const torch::Tensor& x) {
        return model.forward_parts(x, x_clean, nullptr).log_probs;
      };
  }
  throw Error(ExitCode::internal, "attack_target_fn: unknown target");
}

int64_t attack_count_correct(const torch::Tensor& log_probs, const torch::Tensor& y) {
  return log_probs.argmax(/*dim=*/1).eq(y).sum().item<int64_t>();
}

AttackSubject attack_subject(MoeImpl& model) {
  AttackSubject s;
  s.module = &model;
  s.has_router = model.num_experts() > 1;
  s.target = [&model](AttackTarget t, const torch::Tensor& x) {
    return attack_target_fn(model, t, x);
  };
  return s;
}

RobustnessReport attack_evaluate(MoeImpl& model, const Dataset& data, const PgdConfig& cfg,
                                 bool components, int64_t batch_size, torch::Device device,
                                 bool progress) {
  return attack_evaluate(attack_subject(model), data, cfg, components, batch_size, device,
                         progress);
}

RobustnessReport attack_evaluate(const AttackSubject& subject, const Dataset& data,
                                 const PgdConfig& cfg, bool components, int64_t batch_size,
                                 torch::Device device, bool progress) {
  auto& model = *subject.module;
  const bool was_training = model.is_training();
  model.eval();
  const bool split = components && subject.has_router;
  Progress meter("attack", data.size(), progress);
  int64_t sa = 0, ra = 0, ra_e = 0, ra_r = 0;
  for (int64_t start = 0; start < data.size(); start += batch_size) {
    const int64_t n = std::min(batch_size, data.size() - start);
    auto idx = torch::arange(start, start + n, torch::kLong);
    auto x = data.batch_images(idx).to(device);
    auto y = data.batch_labels(idx).to(device);
    auto count = [&](AttackTarget t) {
      FrozenParameters frozen(model);
      auto f = subject.target(t, x);
      auto x_adv = attack_pgd(f, x, y, cfg);
      torch::NoGradGuard no_grad;
      return attack_count_correct(f(x_adv), y);
    };
    {
      torch::NoGradGuard no_grad;
      sa += attack_count_correct(subject.target(AttackTarget::whole, x)(x), y);
    }
    const int64_t whole = count(AttackTarget::whole);
    ra += whole;
    ra_e += split ? count(AttackTarget::experts) : whole;
    ra_r += split ? count(AttackTarget::router) : whole;
    meter.advance(n, "RA " + fmt_fixed(static_cast<double>(ra) / static_cast<double>(start + n), 3));
  }
  if (was_training) model.train();
  RobustnessReport r;
  const double N = static_cast<double>(std::max<int64_t>(1, data.size()));
  r.samples = data.size();
  r.sa = static_cast<double>(sa) / N;
  r.ra = static_cast<double>(ra) / N;
  r.ra_e = static_cast<double>(ra_e) / N;
  r.ra_r = static_cast<double>(ra_r) / N;
  r.seconds = meter.elapsed();
  return r;
}

}  // namespace moecert
