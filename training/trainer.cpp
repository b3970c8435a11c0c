// The epoch loop: schedule, progress on stderr, held-out evaluation, atomic
// checkpoints, and exact resume (optimizer, epoch, RNG and history restored; the
// data order depends only on (seed, epoch), so a resumed run sees the same batches).
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <optional>
#include <sstream>

#include "learner.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/limits.h"
#include "moecert/runtime.h"
#include "moecert/training.h"

namespace moecert {

nlohmann::json TrainConfig::to_json() const {
  auto attack_json = [](const PgdConfig& a) {
    return nlohmann::json{{"norm", norm_name(a.norm)},
                          {"eps", a.eps},
                          {"step_size", a.step_size},
                          {"steps", a.steps},
                          {"restarts", a.restarts}};
  };
  return {{"method", method},
          {"epochs", epochs},
          {"batch_size", batch_size},
          {"beta", beta},
          {"balance", balance},
          {"collapse_share", collapse_share},
          {"optimizer", optimizer},
          {"lr", lr},
          {"momentum", momentum},
          {"weight_decay", weight_decay},
          {"schedule", schedule},
          {"milestones", milestones},
          {"gamma", gamma},
          {"seed", seed},
          {"augment", {{"crop_pad", augment.crop_pad}, {"flip", augment.flip}}},
          {"jtd_gamma", jtd_gamma},
          {"jtd_robust", jtd_robust},
          {"route_margin", route_margin},
          {"sync_bn", sync_bn},
          {"router_train", router_train},
          {"max_expert_share", max_expert_share},
          {"certified",
           {{"eps", certified.eps},
            {"warmup", certified.warmup},
            {"ramp", certified.ramp},
            {"kappa_start", certified.kappa_start},
            {"kappa_end", certified.kappa_end},
            {"cert_margin", certified.cert_margin},
            {"box", certified.box}}},
          {"attack", attack_json(attack)},
          {"eval_attack", attack_json(eval_attack)}};
}

void TrainConfig::validate() const {
  // advmoe and jtdmoe alternate two updates per batch: they are learners, not methods.
  train_method_find(method, "--method");
  if (jtd_gamma < 0) throw ConfigError::invalid("--jtd-gamma", std::to_string(jtd_gamma), ">= 0");
  limits::check_range("--epochs", epochs, 1, limits::max_epochs);
  limits::check_range("--batch-size", batch_size, 1, limits::max_batch);
  limits::check_range("--log-every", log_every, 0, limits::max_steps);
  limits::check_range("--crop-pad", augment.crop_pad, 0, 64);
  if (optimizer != "adam" && optimizer != "sgd")
    throw ConfigError::invalid("--optimizer", optimizer, "adam | sgd");
  if (schedule != "cosine" && schedule != "step" && schedule != "constant")
    throw ConfigError::invalid("--schedule", schedule, "cosine | step | constant");
  if (!(lr > 0)) throw ConfigError::invalid("--lr", std::to_string(lr), "> 0");
  if (weight_decay < 0)
    throw ConfigError::invalid("--weight-decay", std::to_string(weight_decay), ">= 0");
  if (resume && out_dir.empty())
    throw ConfigError("--resume needs --out (the checkpoint to continue)");
  if (keep_best && out_dir.empty()) throw ConfigError("--keep-best needs --out");
  if (beta < 0) throw ConfigError::invalid("--beta", std::to_string(beta), ">= 0");
  if (balance < 0) throw ConfigError::invalid("--balance", std::to_string(balance), ">= 0");
  if (!(collapse_share > 0 && collapse_share <= 1))
    throw ConfigError::invalid("--collapse-share", std::to_string(collapse_share), "in (0, 1]");
  if (!(max_expert_share > 0 && max_expert_share <= 1))
    throw ConfigError::invalid("--max-expert-share", std::to_string(max_expert_share), "in (0, 1]");
  if (router_train != "none") router_gradient_parse(router_train);
  const auto& z = certified;
  if (train_method_find(method, "--method").certified && attack.norm != Norm::linf)
    throw ConfigError("--method " + method +
                      ": certified training bounds L-inf boxes; --norm 2 is not supported");
  // A ramp may end after the run (a run to be resumed with more --epochs).
  if (!(std::isfinite(z.warmup) && std::isfinite(z.ramp) && z.warmup <= 1e6 && z.ramp <= 1e6))
    throw ConfigError::invalid("--eps-warmup/--eps-ramp",
                               std::to_string(z.warmup) + ", " + std::to_string(z.ramp),
                               "finite numbers of epochs (< 0: the defaults)");
  if (!(std::isfinite(z.eps) && z.eps <= 1))
    throw ConfigError::invalid("--train-eps", std::to_string(z.eps), "<= 1 (< 0: --eps)");
  if (!(z.kappa_start >= 0 && z.kappa_start <= 1))
    throw ConfigError::invalid("--kappa-start", std::to_string(z.kappa_start), "in [0, 1]");
  if (z.kappa_end > 1)
    throw ConfigError::invalid("--kappa-end", std::to_string(z.kappa_end),
                               "in [0, 1] (or < 0: the method's default)");
  if (!(z.cert_margin >= 0 && z.cert_margin <= 100))
    throw ConfigError::invalid("--cert-margin", std::to_string(z.cert_margin),
                               "in [0, 100] logits");
  if (!(route_margin >= 0 && std::isfinite(route_margin)))
    throw ConfigError::invalid("--route-margin", std::to_string(route_margin), ">= 0");
  if (route_margin > 0) {
    if (attack.norm != Norm::linf)
      throw ConfigError(
          "--route-margin bounds the router over an L-inf box; --norm 2 is not supported");
    if (method == "advmoe")
      throw ConfigError(
          "--route-margin: advmoe's alternating router step does not take it (st | at | trades | "
          "rt-er | ibp | crown-ibp | jtdmoe's robust member do)");
    if (router_train == "none")
      throw ConfigError(
          "--route-margin with --router-train none: the router is frozen, the term cannot move it");
  }
  if (method == "jtdmoe") {
    const auto& robust = train_method_find(jtd_robust, "--jtd-robust");
    if (!robust.jtd_member)
      throw ConfigError::invalid("--jtd-robust", jtd_robust, train_method_names(true));
    if (robust.certified && attack.norm != Norm::linf)
      throw ConfigError("--jtd-robust " + jtd_robust +
                        ": certified training bounds L-inf boxes; --norm 2 is not supported");
  }
  if (router_train == "none" && method == "advmoe")
    throw ConfigError(
        "--router-train none: advmoe alternates expert and router updates; it cannot keep "
        "its router fixed");
}

namespace {

/// Learning rate at global step `t` of `total` (cosine) or at `epoch` (step).
double scheduled_lr(const TrainConfig& c, int epoch, int64_t t, int64_t total) {
  if (c.schedule == "cosine")
    return c.lr * 0.5 *
           (1.0 + std::cos(M_PI * static_cast<double>(t) / static_cast<double>(total)));
  if (c.schedule == "step") {
    double lr = c.lr;
    for (int m : c.milestones)
      if (epoch >= m) lr *= c.gamma;
    return lr;
  }
  return c.lr;
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& group : opt.param_groups()) group.options().set_lr(lr);
}

/// Training state written beside the weights for --resume.
/// Optimizer i is stored as "optimizer" (i = 0) or "optimizer_<i>".
std::string optimizer_key(size_t i) {
  return i == 0 ? "optimizer" : "optimizer_" + std::to_string(i);
}

void write_state(torch::serialize::OutputArchive& ar,
                 const std::vector<torch::optim::Optimizer*>& opts, int epoch,
                 const nlohmann::json& history) {
  for (size_t i = 0; i < opts.size(); ++i) {
    torch::serialize::OutputArchive opt_ar;
    opts[i]->save(opt_ar);
    ar.write(optimizer_key(i), opt_ar);
  }
  ar.write("epoch", c10::IValue(static_cast<int64_t>(epoch)));
  ar.write("history", c10::IValue(history.dump()));
  ar.write("rng_cpu", at::detail::getDefaultCPUGenerator().get_state());
}

/// Restores what write_state saved; returns the number of epochs already done.
int read_state(torch::serialize::InputArchive& ar,
               const std::vector<torch::optim::Optimizer*>& opts, nlohmann::json& history,
               const std::string& dir) {
  try {
    for (size_t i = 0; i < opts.size(); ++i) {
      torch::serialize::InputArchive opt_ar;
      ar.read(optimizer_key(i), opt_ar);
      opts[i]->load(opt_ar);
    }
    c10::IValue epoch, hist;
    ar.read("epoch", epoch);
    ar.read("history", hist);
    torch::Tensor rng;
    ar.read("rng_cpu", rng);
    at::Generator gen = at::detail::getDefaultCPUGenerator();  // a handle to the global one
    gen.set_state(rng);
    history = nlohmann::json::parse(hist.toStringRef());
    checkpoint_check_history(dir + "/" + checkpoint_state_file, "history", history);
    return static_cast<int>(epoch.toInt());
  } catch (const c10::Error& e) {
    throw CheckpointError::bad_weights(dir + "/" + checkpoint_state_file,
                                       std::string(e.what_without_backtrace()).substr(0, 200));
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError::bad_weights(dir + "/" + checkpoint_state_file,
                                       std::string("its history is not valid JSON: ") + e.what());
  }
}

/// Throws naming every non-finite tensor of the step (the router's scores first
/// when they are the cause, so the message points at the root, not the loss).
void check_finite(const StepStats& st, int epoch, int64_t step) {
  std::string bad;
  for (const auto& [name, t] : st.checked)
    if (!torch::isfinite(t).all().item<bool>()) bad += (bad.empty() ? "" : ", ") + name;
  if (!bad.empty())
    throw NumericError::non_finite(bad, "epoch " + std::to_string(epoch + 1) + ", step " +
                                            std::to_string(step + 1) +
                                            " (the last checkpoint is left as it was)");
}

/// Share of samples per expert as fractions. counts: [E] int64
std::vector<double> usage_shares(const torch::Tensor& counts) {
  auto c = counts.to(torch::kLong).contiguous().cpu();
  return ExpertUsage::shares(
      std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()));
}

/// Warns on stderr when one expert takes more than `limit` of the samples.
void warn_collapse(const std::vector<double>& shares, double limit, const std::string& what,
                   int epoch) {
  for (size_t i = 0; i < shares.size() && shares.size() > 1; ++i)
    if (shares[i] > limit)
      std::cerr << "warning: routing collapse in epoch " << epoch + 1 << ": expert " << i
                << " takes " << fmt_fixed(100 * shares[i], 1) << "% of the " << what
                << " samples (limit " << fmt_fixed(100 * limit, 0)
                << "%); the MoE is acting as one small dense model (see docs/training.md \"Router "
                   "gradient\")."
                << std::endl;
}

}  // namespace

void train_check_routing_health(const TrainSummary& summary, const TrainConfig& cfg) {
  const auto violation = summary.heldout_usage.share_violation(cfg.max_expert_share, "held-out");
  if (violation.empty()) return;
  throw Error(
      ExitCode::gate_failed,
      violation + (cfg.out_dir.empty() ? std::string()
                                       : " (the checkpoint in " + cfg.out_dir + " is written)"));
}

namespace {

double best_heldout_ra(const nlohmann::json& history) {
  double best = -1;
  for (const auto& row : history) best = std::max(best, row.value("heldout_ra", -1.0));
  return best;
}

/// SplitMix64's finaliser: a well-mixed 64-bit value of `z`.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// Seeds of the training attack's random starts for the rows `idx` of epoch `epoch`:
/// a function of (seed, epoch, row) only, so any split of a batch over ranks, and a
/// resumed run, draws the starts one uninterrupted process draws.
std::vector<uint64_t> start_seeds(uint64_t seed, int epoch, const torch::Tensor& idx) {
  auto rows = idx.to(torch::kLong).contiguous().cpu();
  const auto* r = rows.data_ptr<int64_t>();
  std::vector<uint64_t> out(static_cast<size_t>(rows.numel()));
  const uint64_t base = mix64(seed ^ mix64(static_cast<uint64_t>(epoch) + 0x9e3779b97f4a7c15ULL));
  for (size_t i = 0; i < out.size(); ++i) out[i] = mix64(base + static_cast<uint64_t>(r[i]));
  return out;
}

/// This rank's part [lo, hi) of a global batch of `b` rows: contiguous, sizes
/// differing by at most one.
std::pair<int64_t, int64_t> rank_rows(int64_t b, int rank, int world) {
  return {b * rank / world, b * (rank + 1) / world};
}

/// A data-parallel run needs every rank to get a sample of every batch.
void check_rank_batches(int64_t n, int64_t batch, int world) {
  const int64_t last = n % batch;
  if (batch < world || (last > 0 && last < world))
    throw ConfigError("--batch-size " + std::to_string(batch) + " over " + std::to_string(world) +
                      " ranks: a batch of " + std::to_string(batch < world ? batch : last) +
                      " samples (of " + std::to_string(n) +
                      ") leaves a rank without any; choose a batch size whose every batch, "
                      "the last included, has at least WORLD_SIZE samples");
}

/// Held-out evaluation; data-parallel: rank r evaluates rows r, r + W, ... and the
/// counts are summed over the group.
RobustnessReport evaluate_heldout(Learner& learner, const Dataset& held_out, const TrainConfig& cfg,
                                  torch::Device device, Collective* group) {
  if (!group || held_out.size() < group->size())
    return attack_evaluate(learner.subject(), held_out, cfg.eval_attack, /*components=*/false,
                           cfg.batch_size, device, /*progress=*/false);
  auto rows = torch::arange(group->rank(), held_out.size(), group->size(), torch::kLong);
  auto eval = attack_evaluate(learner.subject(), held_out.select(rows), cfg.eval_attack,
                              /*components=*/false, cfg.batch_size, device, /*progress=*/false);
  const auto n = static_cast<double>(eval.samples);
  std::vector<double> packed{eval.sa * n, eval.ra * n, n};
  for (auto c : eval.usage.clean) packed.push_back(static_cast<double>(c));
  for (auto c : eval.usage.adversarial) packed.push_back(static_cast<double>(c));
  std::vector<torch::Tensor> t{torch::tensor(packed, torch::kDouble).to(device)};
  group->all_reduce_sum(t);
  auto sum = t[0].cpu();
  const auto* v = sum.data_ptr<double>();
  eval.samples = static_cast<int64_t>(std::llround(v[2]));
  eval.sa = v[0] / v[2], eval.ra = v[1] / v[2];
  size_t k = 3;
  for (auto& c : eval.usage.clean) c = std::llround(v[k++]);
  for (auto& c : eval.usage.adversarial) c = std::llround(v[k++]);
  return eval;
}

}  // namespace

TrainSummary train_loop(Learner& learner, const Dataset& train, const Dataset& held_out,
                        const TrainConfig& cfg, const nlohmann::json& manifest_base,
                        torch::Device device) {
  auto& model = learner.module();
  const auto opts = learner.optimizers();
  Collective* group = cfg.group;  // a group of one too: every collective runs
  const int world = group ? group->size() : 1, rank = group ? group->rank() : 0;
  const bool lead = rank == 0;  // prints and writes checkpoints
  TrainSummary summary;
  summary.history = nlohmann::json::array();
  if (cfg.resume) {
    // Every rank reads the checkpoint (a shared file system): weights, optimizer
    // state and history are then the same on all, whatever world size wrote it.
    auto state = checkpoint_load_state(cfg.out_dir);
    if (!state) throw CheckpointError::missing(cfg.out_dir + "/" + checkpoint_state_file);
    checkpoint_load_weights(cfg.out_dir, model);
    summary.start_epoch = read_state(*state, opts, summary.history, cfg.out_dir);
    if (lead)
      std::cerr << "resuming " << cfg.out_dir << " after epoch " << summary.start_epoch << "\n";
  }
  const int64_t N = train.size();
  if (group) {
    check_rank_batches(N, cfg.batch_size, world);
    distributed_broadcast_module(model, *group);  // rank 0's weights everywhere
  }
  const int64_t steps_per_epoch = (N + cfg.batch_size - 1) / cfg.batch_size;
  const int64_t total_steps = steps_per_epoch * cfg.epochs;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t images_this_run = 0, steps_this_run = 0;

  for (int epoch = summary.start_epoch; epoch < cfg.epochs; ++epoch) {
    auto order = data_epoch_order(N, cfg.seed, epoch);
    const auto epoch_t0 = std::chrono::steady_clock::now();
    double loss_sum = 0;
    int64_t seen = 0, clean_ok = 0, adv_ok = 0, adv_seen = 0, win_seen = 0, win_clean = 0,
            win_adv = 0;
    double win_loss = 0;
    torch::Tensor usage_clean = torch::zeros({learner.num_experts()}, torch::kLong);
    torch::Tensor usage_adv = torch::zeros({learner.num_experts()}, torch::kLong);
    for (int64_t s = 0; s < steps_per_epoch; ++s) {
      const int64_t global = epoch * steps_per_epoch + s;
      for (auto* opt : opts) set_lr(*opt, scheduled_lr(cfg, epoch, global, total_steps));
      const auto batch =
          order.narrow(0, s * cfg.batch_size, std::min(cfg.batch_size, N - s * cfg.batch_size));
      const int64_t b = batch.size(0);  // the global batch
      const auto [lo, hi] = rank_rows(b, rank, world);
      const auto idx = batch.narrow(0, lo, hi - lo);  // this rank's rows
      TrainConfig step_cfg = cfg;
      step_cfg.group = group;
      step_cfg.rank_share = static_cast<double>(hi - lo) / static_cast<double>(b);
      step_cfg.attack.start_seeds = start_seeds(cfg.seed, epoch, idx);
      auto x = data_augment(train.batch_images(idx), idx, cfg.augment, cfg.seed, epoch).to(device);
      auto y = train.batch_labels(idx).to(device);
      // PyTorch DDP's default: buffers (BatchNorm's running statistics) follow rank 0.
      if (group) distributed_broadcast_module(model, *group, /*buffers_only=*/true);
      learner.at_step(global, total_steps);
      std::optional<SyncBatchNormScope> sync_bn;
      if (group && cfg.sync_bn) sync_bn.emplace(group);
      StepStats st =
          learner.update(x, y, step_cfg, [&](const StepStats& t) { check_finite(t, epoch, s); });
      sync_bn.reset();
      const int64_t E = learner.num_experts();
      const bool has_adv = st.adv_correct >= 0;
      auto step_usage_clean = st.usage_clean.defined() ? st.usage_clean.to(torch::kLong).cpu()
                                                       : torch::zeros({E}, torch::kLong);
      auto step_usage_adv = st.usage_adv.defined() ? st.usage_adv.to(torch::kLong).cpu()
                                                   : torch::zeros({E}, torch::kLong);
      double loss_b = st.loss.item<double>() * static_cast<double>(hi - lo);
      int64_t step_clean = st.clean_correct, step_adv = has_adv ? st.adv_correct : 0;
      if (group) {  // the global batch's counts, on every rank
        std::vector<torch::Tensor> t{torch::cat(
            {torch::tensor({loss_b, static_cast<double>(step_clean), static_cast<double>(step_adv)},
                           torch::kDouble),
             step_usage_clean.to(torch::kDouble), step_usage_adv.to(torch::kDouble)})};
        group->all_reduce_sum(t);
        auto v = t[0].cpu();
        loss_b = v[0].item<double>();
        step_clean = std::llround(v[1].item<double>());
        step_adv = std::llround(v[2].item<double>());
        step_usage_clean = v.narrow(0, 3, E).round().to(torch::kLong);
        step_usage_adv = v.narrow(0, 3 + E, E).round().to(torch::kLong);
      }
      usage_clean = usage_clean + step_usage_clean;
      usage_adv = usage_adv + step_usage_adv;
      loss_sum += loss_b, win_loss += loss_b;
      seen += b, win_seen += b, clean_ok += step_clean, win_clean += step_clean;
      if (has_adv) adv_ok += step_adv, win_adv += step_adv, adv_seen += b;
      images_this_run += b, ++steps_this_run;
      if (lead && cfg.log_every > 0 && ((s + 1) % cfg.log_every == 0 || s + 1 == steps_per_epoch)) {
        const double t =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double steps_left = static_cast<double>(total_steps - global - 1);
        std::ostringstream line;
        line << "epoch " << epoch + 1 << "/" << cfg.epochs << "  step " << s + 1 << "/"
             << steps_per_epoch << "  loss " << fmt_fixed(win_loss / win_seen, 4) << "  sa "
             << fmt_fixed(static_cast<double>(win_clean) / win_seen, 3) << "  ra "
             << (has_adv ? fmt_fixed(static_cast<double>(win_adv) / win_seen, 3) : "-")
             << "  experts " << ExpertUsage::text(usage_shares(usage_clean))
             << (st.note.empty() ? "" : "  " + st.note) << "  " << fmt_fixed(images_this_run / t, 0)
             << " img/s  eta " << fmt_duration(t / steps_this_run * steps_left);
        std::cerr << line.str() << std::endl;
        win_seen = win_clean = win_adv = 0, win_loss = 0;
      }
    }
    const double epoch_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - epoch_t0).count();
    // Held-out evaluation of this epoch.
    auto eval = evaluate_heldout(learner, held_out, cfg, device, group);
    model.train();
    nlohmann::json row = {{"epoch", epoch + 1},
                          {"train_loss", loss_sum / seen},
                          {"train_sa", static_cast<double>(clean_ok) / seen},
                          {"heldout_sa", eval.sa},
                          {"heldout_ra", eval.ra},
                          {"heldout_samples", eval.samples},
                          {"train_seconds", epoch_seconds},
                          {"train_images_per_s", epoch_seconds > 0 ? seen / epoch_seconds : 0.0}};
    if (adv_seen > 0) row["train_ra"] = static_cast<double>(adv_ok) / adv_seen;
    const auto shares_clean = usage_shares(usage_clean), shares_adv = usage_shares(usage_adv);
    row["expert_usage_clean"] = shares_clean;
    if (lead) warn_collapse(shares_clean, cfg.collapse_share, "clean", epoch);
    if (usage_adv.sum().item<int64_t>() > 0) {
      row["expert_usage_adv"] = shares_adv;
      if (lead) warn_collapse(shares_adv, cfg.collapse_share, "adversarial", epoch);
    }
    if (group) row["world_size"] = world;
    if (!eval.usage.clean.empty()) {
      row["heldout_expert_usage_clean"] = ExpertUsage::shares(eval.usage.clean);
      row["heldout_expert_usage_adv"] = ExpertUsage::shares(eval.usage.adversarial);
    }
    const bool is_best = eval.ra > best_heldout_ra(summary.history);
    summary.history.push_back(row);
    if (lead) {
      std::cerr << "epoch " << epoch + 1 << "/" << cfg.epochs << " done: held-out sa "
                << fmt_fixed(eval.sa, 4) << "  ra " << fmt_fixed(eval.ra, 4) << " (" << eval.samples
                << " samples, PGD-" << cfg.eval_attack.steps << ")";
      if (!eval.usage.clean.empty())
        std::cerr << "  experts " << ExpertUsage::text(ExpertUsage::shares(eval.usage.clean))
                  << " (adversarial "
                  << ExpertUsage::text(ExpertUsage::shares(eval.usage.adversarial)) << ")";
      std::cerr << std::endl;
    }
    summary.heldout_usage = eval.usage;
    if (lead && !cfg.out_dir.empty()) {
      nlohmann::json manifest = manifest_base;
      manifest.update(learner.manifest_fields());
      manifest["training"] = cfg.to_json();
      manifest["metrics"] = {{"history", summary.history}, {"epochs_done", epoch + 1}};
      checkpoint_save(cfg.out_dir, model, manifest, [&](torch::serialize::OutputArchive& ar) {
        write_state(ar, opts, epoch + 1, summary.history);
      });
      if (cfg.keep_best && is_best) {
        manifest["metrics"]["best_epoch"] = epoch + 1;
        checkpoint_save(cfg.out_dir + "-best", model, manifest);
        std::cerr << "best held-out RA so far: kept epoch " << epoch + 1 << " in " << cfg.out_dir
                  << "-best" << std::endl;
      }
    }
    if (group) group->barrier();  // the others wait for rank 0's checkpoint
    summary.epochs_done = epoch + 1;
  }
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  summary.images_per_s = t > 0 ? images_this_run / t : 0;
  if (summary.epochs_done == 0) summary.epochs_done = summary.start_epoch;
  return summary;
}

}  // namespace moecert
