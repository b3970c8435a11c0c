// PGD and FGSM over an arbitrary log-prob map, and the RA / RA-E / RA-R targets.
#include <torch/torch.h>

#include <limits>

#include "moecert/attack_suite.h"
#include "moecert/attacks.h"
#include "moecert/error.h"

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
  return loss == AttackLoss::ce ? loss_ce(log_probs, y) : -class_margin(log_probs, y);
}

/// Ascent direction of the given norm's steepest step. grad: [B, ...]
torch::Tensor ascent_direction(const torch::Tensor& grad, Norm norm) {
  if (norm == Norm::linf) return grad.sign();
  std::vector<int64_t> shape(static_cast<size_t>(grad.dim()), 1);
  shape[0] = grad.size(0);
  return grad / (grad.flatten(1).norm(2, 1).view(shape) + 1e-12);
}

/// A random point of each ball from the global generator (training's PGD).
torch::Tensor random_start(const AttackBall& ball) {
  std::vector<int64_t> shape(static_cast<size_t>(ball.x.dim()), 1);
  shape[0] = ball.x.size(0);
  auto e = ball.eps.view(shape);
  if (ball.norm == Norm::linf) return ball.project(ball.x + (torch::rand_like(ball.x) * 2 - 1) * e);
  auto dir = torch::randn_like(ball.x);
  dir = dir / (dir.flatten(1).norm(2, 1).view(shape) + 1e-12);
  return ball.project(ball.x + dir * torch::rand_like(e) * e);
}

torch::Tensor input_gradient(const LogProbFn& f, const torch::Tensor& x_adv,
                             const PerSampleLoss& loss) {
  auto xa = x_adv.detach().requires_grad_(true);
  auto l = loss(f(xa));
  return torch::autograd::grad({l.sum()}, {xa})[0];
}

}  // namespace

// PGD (Madry et al. 2018) on the engine's sets: random start, `steps` steps of
// `step_size` along the norm's steepest-ascent direction, projection onto the ball ∩
// box after each; restarts keep a misclassifying point, else the higher loss.
torch::Tensor attack_pgd_objective(const LogProbFn& f, const torch::Tensor& x,
                                   const PerSampleLoss& loss, const PgdConfig& cfg,
                                   const torch::Tensor& y) {
  if (cfg.eps < 0) throw ConfigError::invalid("--eps", std::to_string(cfg.eps), ">= 0");
  if (!cfg.start_seeds.empty() && static_cast<int64_t>(cfg.start_seeds.size()) != x.size(0))
    throw ShapeError::unexpected("PGD start seeds", "one per sample", x.sizes().vec());
  const AttackBall ball{x, torch::full({x.size(0)}, cfg.eps, x.options()), cfg.norm, cfg.box};
  torch::Tensor best, best_loss, best_wrong;
  for (int r = 0; r < std::max(1, cfg.restarts); ++r) {
    auto x_adv = !cfg.random_start ? x.clone()
                 : cfg.start_seeds.empty()
                     ? random_start(ball)
                     : RowSampler(cfg.start_seeds).start(ball, cfg.start_stream + 2 * r);
    for (int s = 0; s < cfg.steps; ++s) {
      auto g = input_gradient(f, x_adv, loss);
      x_adv = ball.project(x_adv + cfg.step_size * ascent_direction(g, cfg.norm));
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

torch::Tensor attack_pgd(const LogProbFn& f, const torch::Tensor& x, const torch::Tensor& y,
                         const PgdConfig& cfg) {
  const AttackLoss kind = cfg.loss;
  return attack_pgd_objective(
      f, x, [&y, kind](const torch::Tensor& lp) { return attack_loss(lp, y, kind); }, cfg, y);
}

torch::Tensor attack_fgsm(const LogProbFn& f, const torch::Tensor& x, const torch::Tensor& y,
                          Norm norm, double eps) {
  auto g = input_gradient(f, x, [&y](const torch::Tensor& lp) { return loss_ce(lp, y); });
  const AttackBall ball{x, torch::full({x.size(0)}, eps, x.options()), norm, true};
  return ball.project(x + eps * ascent_direction(g, norm)).detach();
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

std::vector<AwareObjective> route_aware_objectives(MoeImpl& model, const LogProbFn& whole,
                                                   const torch::Tensor& y,
                                                   const std::string& prefix) {
  const auto& spec = model.spec();
  const int64_t E = model.num_experts(), k = spec.top_k;
  std::vector<AwareObjective> out;
  if (E < 2 || spec.routing != Routing::top_k || k >= E) return out;
  for (int64_t j = 0; j < E; ++j) {
    out.push_back(
        {prefix + "route-" + std::to_string(j), [&model, whole, y, j, k](const torch::Tensor& x) {
           auto g = model.router_logits(x);
           auto others = g.index_fill(1, torch::tensor({j}, torch::kLong).to(g.device()),
                                      -std::numeric_limits<float>::infinity());
           auto kth = std::get<0>(others.topk(k, 1)).select(1, k - 1);
           auto route = g.select(1, j) - kth;
           auto lp = whole(x);
           auto zy = lp.gather(1, y.unsqueeze(1)).squeeze(1);
           auto other = std::get<0>(
               lp.scatter(1, y.unsqueeze(1), -std::numeric_limits<float>::infinity()).max(1));
           return torch::where(route.gt(0), other - zy, route - 1e3);
         }});
  }
  return out;
}

AttackSubject attack_subject(MoeImpl& model) {
  AttackSubject s;
  s.module = &model;
  s.has_router = model.num_experts() > 1;
  s.target = [&model](AttackTarget t, const torch::Tensor& x) {
    return attack_target_fn(model, t, x);
  };
  s.aware = [&model](const torch::Tensor& y) {
    return route_aware_objectives(
        model, [&model](const torch::Tensor& x) { return model.forward(x); }, y, "");
  };
  if (s.has_router) {
    s.experts = model.num_experts();
    s.route = [&model](const torch::Tensor& x) { return model.router_logits(x).argmax(/*dim=*/1); };
  }
  return s;
}

RobustnessReport attack_evaluate(MoeImpl& model, const Dataset& data, const PgdConfig& cfg,
                                 bool components, int64_t batch_size, torch::Device device,
                                 bool progress) {
  return attack_evaluate(attack_subject(model), data, cfg, components, batch_size, device,
                         progress);
}

// PGD through the suite's runner (`--suite pgd`): the same per-batch loop, guard and
// bookkeeping as every other suite; each attack on the samples still robust.
RobustnessReport attack_evaluate(const AttackSubject& subject, const Dataset& data,
                                 const PgdConfig& cfg, bool components, int64_t batch_size,
                                 torch::Device device, bool progress) {
  SuiteConfig sc;
  sc.suite = Suite::pgd;
  sc.norm = cfg.norm, sc.eps = cfg.eps, sc.box = cfg.box, sc.pgd = cfg, sc.components = components;
  const auto s = attack_suite(subject, data, sc, batch_size, device, progress);
  RobustnessReport r;
  r.samples = s.samples;
  r.sa = s.sa, r.ra = s.ra;
  r.ra_e = components ? s.ra_e : s.ra;
  r.ra_r = components ? s.ra_r : s.ra;
  r.seconds = s.seconds;
  r.usage = s.usage;
  return r;
}

}  // namespace moecert
