// `moecert train`, and the options every subcommand (and `attack`) shares.
#include "commands.h"

#include <sys/stat.h>
#include <torch/torch.h>

#include <iostream>
#include <thread>

#include "moecert/attack_suite.h"
#include "moecert/attacks.h"
#include "moecert/backbones.h"
#include "moecert/checkpoint.h"
#include "moecert/defaults.h"
#include "moecert/distributed.h"
#include "moecert/error.h"
#include "moecert/limits.h"
#include "moecert/model_io.h"
#include "moecert/runtime.h"
#include "moecert/training.h"

namespace moecert {
namespace {

bool path_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

/// Splits a seeded held-out set of `n_val` rows off the training split.
std::pair<Dataset, Dataset> split_holdout(const Dataset& d, int64_t n_val, uint64_t seed) {
  if (n_val <= 0 || n_val >= d.size())
    throw ConfigError::invalid(
        "--val-samples", std::to_string(n_val),
        "between 1 and the training set size - 1 (" + std::to_string(d.size() - 1) + ")");
  auto perm = data_epoch_order(d.size(), seed, /*epoch=*/-1);
  return {d.select(perm.narrow(0, n_val, d.size() - n_val)), d.select(perm.narrow(0, 0, n_val))};
}

double default_step(double eps, int steps) {
  return steps > 0 ? defaults::step_scale * eps / steps : eps;
}

/// What a training step of `cfg.method` optimises against, for the run's first line:
/// certified training has no attack but a bound on its ε / κ schedule, `st` neither.
std::string describe_training_step(const TrainConfig& cfg) {
  if (cfg.method == "ibp" || cfg.method == "crown-ibp") {
    const CertifiedPoint end = certified_schedule(cfg, 1, 1);  // the values at the last step
    return "training bound " + std::string(cfg.method == "ibp" ? "IBP" : "CROWN-IBP") +
           " Linf eps 0 -> " + fmt_fixed(end.eps, 4) + ", kappa " +
           fmt_fixed(cfg.certified.kappa_start, 2) + " -> " + fmt_fixed(end.kappa, 2) +
           " (the current values on the progress line)";
  }
  if (cfg.method == "st") return "no training attack";
  return "training attack " + describe_attack(cfg.attack);
}

}  // namespace

int64_t samples_parse(const std::string& text) {
  if (text == "all") return 0;
  try {
    size_t used = 0;
    const long long n = std::stoll(text, &used);
    if (used == text.size() && n >= 1 && n <= limits::max_samples) return n;
  } catch (const std::exception&) {
  }
  throw ConfigError::invalid(
      "--samples", text,
      "a number of images in [1, " + std::to_string(limits::max_samples) + "], or 'all'");
}

nlohmann::json selection_json(const CommonOptions& c, int64_t images) {
  if (c.samples == 0) return {{"rule", "all"}, {"samples", images}};
  const bool first = c.subset != "random";
  nlohmann::json j = {{"rule", first ? "first" : "random"}, {"samples", images}};
  if (!first) j["seed"] = c.seed;
  return j;
}

DataSpec data_spec(const CommonOptions& c, const std::string& fallback, bool train) {
  DataSpec d;
  d.name = c.dataset.empty() ? fallback : c.dataset;
  d.dir = c.data_dir;
  d.train = train;
  d.seed = c.seed;
  d.samples = c.samples;
  // Evaluation takes the first N test images, training a seeded subset, unless --subset says.
  d.first = c.subset.empty() ? !train : c.subset == "first";
  return d;
}

namespace {

// --- train --------------------------------------------------------------------------------

struct TrainOptions {
  TrainConfig cfg;
  ModelSpec spec;
  std::string routing = "top-k";
  std::string batch_norm = "shared";  ///< moe-cnn: shared | per-group
  AttackOptions train_attack, eval_attack;
  int64_t val_samples = defaults::val_samples;
  bool force = false;
  double alpha = 0.8;                      ///< jtdmoe: weight of the robust member
  std::string init_standard, init_robust;  ///< jtdmoe: optional starting checkpoints
  std::string dist_backend = "auto";       ///< data-parallel: auto | gloo | nccl
  double dist_timeout = 300;               ///< seconds for the rendezvous and each collective
};

/// Loads a starting member for jtdmoe, or builds a fresh one from `spec`.
Moe jtd_member(const std::string& dir, const ModelSpec& spec) {
  if (dir.empty()) return Moe(spec);
  auto loaded = model_load(dir, torch::kCPU);
  if (loaded.is_dual()) throw ConfigError("jtdmoe: " + dir + " is a dual-model, expected one MoE");
  return loaded.model;
}

void report_training(const TrainSummary& summary, const std::string& out_dir) {
  const auto& last = summary.history.back();
  std::cout << "trained " << summary.epochs_done << " epochs ("
            << fmt_fixed(summary.images_per_s, 0) << " img/s); held-out SA "
            << fmt_fixed(last.value("heldout_sa", 0.0), 4) << ", RA "
            << fmt_fixed(last.value("heldout_ra", 0.0), 4) << "; checkpoint " << out_dir << "\n";
  const auto& u = summary.heldout_usage;
  if (!u.clean.empty())
    std::cout << "held-out expert usage: clean " << usage_line(u.clean) << ", adversarial "
              << usage_line(u.adversarial) << "\n";
}

void run_train(const CommonOptions& common, TrainOptions& o) {
  // Data-parallel when WORLD_SIZE > 1 (torchrun, scripts/slurm-env.sh): the ranks of
  // one machine share its cores, and each CUDA rank takes the GPU of its local rank.
  const DistributedEnv env = distributed_env();
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = runtime_threads(env.distributed() && common.threads == 0
                                          ? std::max(1, hw / env.local_world_size)
                                          : common.threads);
  auto device = runtime_device(common.device);
  if (env.distributed() && device.is_cuda() && common.device.find(':') == std::string::npos)
    device = runtime_device("cuda:" + std::to_string(env.local_rank));
  const bool lead = env.rank == 0;
  runtime_seed(common.seed);
  o.cfg.seed = common.seed;
  o.cfg.attack = o.train_attack.config();
  o.cfg.eval_attack = o.eval_attack.config();
  o.cfg.log_every = common.quiet ? 0 : o.cfg.log_every;
  o.cfg.validate();
  // Sizes first, before the data loads (the full check follows once the input shape is known).
  limits::check_range("--experts", o.spec.experts, 1, limits::max_experts);
  limits::check_range("--top-k", o.spec.top_k, 1, limits::max_experts);
  if (o.cfg.out_dir.empty()) throw ConfigError("train: --out DIR is required");
  if (!o.cfg.resume && !o.force && path_exists(o.cfg.out_dir + "/" + checkpoint_manifest_file))
    throw ConfigError(
        "train: " + o.cfg.out_dir +
        " already holds a checkpoint; pass --resume to continue it or --force to replace it");
  if (!(o.dist_timeout >= 1 && o.dist_timeout <= 86400))
    throw ConfigError::invalid("--dist-timeout", std::to_string(o.dist_timeout),
                               "seconds in [1, 86400]");
  std::unique_ptr<Collective> group;
  if (env.distributed()) {
    const auto backend = distributed_backend(o.dist_backend, device);
    group = distributed_join(
        env, backend, std::chrono::milliseconds(static_cast<int64_t>(o.dist_timeout * 1000)));
    o.cfg.group = group.get();
    if (lead)
      std::cerr << "train: data-parallel over " << env.world_size
                << (env.world_size == 1 ? " rank (" : " ranks (") << backend << ", store "
                << env.master_addr << ":" << env.master_port << "), global batch "
                << o.cfg.batch_size << ", " << threads << " threads per rank" << std::endl;
  }

  DataSpec spec = data_spec(common, "fashion-mnist", /*train=*/true);
  spec.samples = 0;  // held-out images come from the whole split; --samples thins the rest
  Dataset full = data_load(spec);
  auto [train, val] = split_holdout(full, o.val_samples, common.seed);
  if (common.samples > 0)
    train = common.subset == "first" ? data_first(train, common.samples)
                                     : data_subset(train, common.samples, common.seed);

  nlohmann::json resumed;
  if (o.cfg.resume) {
    auto manifest = checkpoint_read_manifest(o.cfg.out_dir);
    resumed = manifest;
    if (manifest.value("kind", "moe") != "dual")
      o.spec = ModelSpec::from_json(manifest.at("architecture"));
    const auto method = manifest.value("training", nlohmann::json::object()).value("method", "");
    if (method != o.cfg.method)
      throw ConfigError("train --resume: the checkpoint was trained with --method " + method +
                        ", not " + o.cfg.method);
  } else {
    o.spec.routing = o.routing == "soft" ? Routing::soft : Routing::top_k;
    if (o.routing != "soft" && o.routing != "top-k")
      throw ConfigError::invalid("--routing", o.routing, "soft | top-k");
    if (o.batch_norm != "shared" && o.batch_norm != "per-group")
      throw ConfigError::invalid("--batch-norm", o.batch_norm, "shared | per-group");
    o.spec.shared_batch_norm = o.spec.kind == "moe-cnn" && o.batch_norm == "shared";
    o.spec.in_channels = train.channels(), o.spec.height = train.height(),
    o.spec.width = train.width();
    o.spec.num_classes = train.num_classes, o.spec.mean = train.mean, o.spec.std = train.std;
  }
  nlohmann::json base = {
      {"dataset",
       {{"name", train.name}, {"train_samples", train.size()}, {"val_samples", val.size()}}},
      {"threads", threads}};
  if (group) base["world_size"] = env.world_size;
  o.spec.validate();  // limits first: their message names the option
  o.spec.check_memory(o.cfg.batch_size, "--batch-size");
  if (o.cfg.method == "jtdmoe") {
    Dual dual{nullptr};
    if (o.cfg.resume) {
      const auto& arch = resumed.at("architecture");
      dual = Dual(Moe(ModelSpec::from_json(arch.at("standard"))),
                  Moe(ModelSpec::from_json(arch.at("robust"))), resumed.value("alpha", o.alpha));
    } else {
      dual = Dual(jtd_member(o.init_standard, o.spec), jtd_member(o.init_robust, o.spec), o.alpha);
    }
    dual->to(device);
    if (lead)
      std::cerr << "train jtdmoe: dual-model alpha=" << dual->alpha() << " of "
                << model_describe(dual->standard().spec()) << " (standard) and "
                << model_describe(dual->robust().spec()) << " (robust); " << train.size()
                << " training / " << val.size() << " held-out images; " << threads << " threads on "
                << device << std::endl;
    const auto summary = train_dual_run(*dual, train, val, o.cfg, base, device);
    if (lead) report_training(summary, o.cfg.out_dir);
    train_check_routing_health(summary, o.cfg);
    return;
  }
  Moe model(o.spec);
  model->to(device);
  if (lead)
    std::cerr << "train " << o.cfg.method << ": " << model_describe(o.spec) << ", "
              << module_parameter_count(*model) << " parameters; " << train.size() << " training / "
              << val.size() << " held-out " << train.name << " images; " << threads
              << " threads on " << device << "; " << describe_training_step(o.cfg) << std::endl;
  const auto summary = train_run(*model, train, val, o.cfg, base, device);
  if (lead) report_training(summary, o.cfg.out_dir);
  train_check_routing_health(summary, o.cfg);
}

}  // namespace

void cli_register_common(CLI::App& app, CommonOptions& c) {
  app.fallthrough();
  app.add_option("--device", c.device, "auto | cpu | cuda | cuda:N")->capture_default_str();
  app.add_option("--threads", c.threads, "CPU threads (0 = all cores)")->capture_default_str();
  app.add_option("--seed", c.seed, "global seed (data order, init, attacks)")
      ->capture_default_str();
  app.add_option("--dataset", c.dataset, data_names());
  app.add_option("--data", c.data_dir, "data directory (default: the data set's standard place)");
  app.add_option_function<std::string>(
      "--samples", [&c](const std::string& v) { c.samples = samples_parse(v); },
      "N images: the first N of the test split (attack, certify, lipschitz), a seeded "
      "subset of the training split (train); 'all' (default) for the whole split");
  app.add_option(
         "--subset", c.subset,
         "which N images --samples takes: first | random (seeded by --seed); default: first "
         "for evaluation, random for train")
      ->check(CLI::IsMember({"first", "random"}));
  app.add_flag("--quiet,-q", c.quiet, "no progress lines on stderr");
}

void cli_register_train(CLI::App& app, const CommonOptions& common) {
  auto o = std::make_shared<TrainOptions>();
  o->train_attack.steps = defaults::train_steps;
  auto* cmd = app.add_subcommand("train", "train an MoE (or dense) classifier and checkpoint it");
  auto& c = o->cfg;
  std::string methods;
  for (const auto& m : train_method_registry())
    methods += "\n  " + std::string(m.name) + ": " + m.help;
  cmd->add_option("--method", c.method, "training method:" + methods)->capture_default_str();
  auto& z = c.certified;
  cmd->add_option("--train-eps", z.eps,
                  "ibp / crown-ibp: training radius at the ramp's end (< 0: --eps)")
      ->capture_default_str();
  cmd->add_option("--eps-warmup", z.warmup,
                  "ibp / crown-ibp: epochs at eps = 0 (< 0: 5% of --epochs)")
      ->capture_default_str();
  cmd->add_option("--eps-ramp", z.ramp,
                  "ibp / crown-ibp: epochs over which eps, kappa (and crown-ibp's beta) ramp (< 0: "
                  "25% of --epochs)")
      ->capture_default_str();
  cmd->add_option("--kappa-start", z.kappa_start,
                  "ibp / crown-ibp: weight of the clean loss at the ramp's start")
      ->capture_default_str();
  cmd->add_option(
         "--kappa-end", z.kappa_end,
         "ibp / crown-ibp: weight of the clean loss after the ramp (< 0: ibp 0.5, crown-ibp 0)")
      ->capture_default_str();
  cmd->add_option("--cert-margin", z.cert_margin,
                  "ibp / crown-ibp: train the bound's margins past this many logits (for a "
                  "dual-model at alpha: "
                  "ln((1 + (K-1)c)/(1-c)), c = (1-alpha)/alpha; 1.47 for alpha 0.8)")
      ->capture_default_str();
  cmd->add_option("--route-margin", c.route_margin,
                  "weight of the route-margin term: the router's clean top-k choice kept on the "
                  "L-inf ball of "
                  "--eps (ibp / crown-ibp: the scheduled eps); 0 = off")
      ->capture_default_str();
  cmd->add_option("--alpha", o->alpha, "jtdmoe: weight of the robust member")
      ->capture_default_str();
  cmd->add_option("--jtd-gamma", c.jtd_gamma, "jtdmoe: weight of CE(F_D(x_adv)) in the F_S step")
      ->capture_default_str();
  cmd->add_option("--jtd-robust", c.jtd_robust,
                  "jtdmoe: the method of the F_R step (rt-er: paper 1): " +
                      train_method_names(/*members_only=*/true))
      ->capture_default_str();
  cmd->add_option("--init-standard", o->init_standard, "jtdmoe: start F_S from this checkpoint");
  cmd->add_option("--init-robust", o->init_robust, "jtdmoe: start F_R from this checkpoint");
  cmd->add_option("--beta", c.beta, "TRADES / RT-ER regulariser weight")->capture_default_str();
  cmd->add_option("--balance", c.balance, "load-balancing loss weight (0 = off)")
      ->capture_default_str();
  cmd->add_option("--router-train", c.router_train,
                  "router gradient: top2 (renormalised top-2 mixture) | straight-through | none "
                  "(router kept at its random initialisation, as paper 1's code)")
      ->capture_default_str();
  cmd->add_option("--max-expert-share", c.max_expert_share,
                  "routing health gate: exit 1 after training when one expert takes more than this "
                  "share of the held-out samples, clean or adversarial (1 = off)")
      ->capture_default_str();
  cmd->add_option("--collapse-share", c.collapse_share,
                  "warn when one expert takes more than this share of the samples")
      ->capture_default_str();
  cmd->add_option("--arch", o->spec.kind,
                  "moe (model-level experts) | moe-cnn (AdvMoE channel-group conv layers)")
      ->capture_default_str();
  cmd->add_option("--scale", o->spec.scale, "moe-cnn: channel-group width r as a share of C_out")
      ->capture_default_str();
  cmd->add_option("--batch-norm", o->batch_norm,
                  "moe-cnn: shared (one BatchNorm per layer for all channel groups, paper 2's "
                  "layout) | per-group")
      ->capture_default_str();
  cmd->add_option("--experts", o->spec.experts,
                  "number of experts E (1 = dense; moe-cnn: groups N)")
      ->capture_default_str();
  cmd->add_option("--expert", o->spec.expert,
                  "expert backbone:" + backbone_help(BackboneRole::expert) +
                      "\n  (--arch moe-cnn: " + backbone_names(BackboneRole::channel_groups) + ")")
      ->capture_default_str();
  cmd->add_option("--router", o->spec.router, "router:" + backbone_help(BackboneRole::router))
      ->capture_default_str();
  cmd->add_option("--routing", o->routing, "soft | top-k")->capture_default_str();
  cmd->add_option("--top-k", o->spec.top_k, "k of top-k routing")->capture_default_str();
  cmd->add_option("--epochs", c.epochs)->capture_default_str();
  cmd->add_option("--batch-size", c.batch_size)->capture_default_str();
  cmd->add_option("--optimizer", c.optimizer, "adam | sgd")->capture_default_str();
  cmd->add_option("--lr", c.lr)->capture_default_str();
  cmd->add_option("--momentum", c.momentum, "SGD momentum")->capture_default_str();
  cmd->add_option("--weight-decay", c.weight_decay)->capture_default_str();
  cmd->add_option("--schedule", c.schedule, "cosine | step | constant")->capture_default_str();
  cmd->add_option("--milestones", c.milestones, "epochs where `step` multiplies lr by --gamma");
  cmd->add_option("--gamma", c.gamma)->capture_default_str();
  cmd->add_option("--crop-pad", c.augment.crop_pad,
                  "augment: random crop after padding with N zero pixels (the papers: 4 on "
                  "CIFAR; 0 = off)")
      ->capture_default_str();
  cmd->add_flag("--flip", c.augment.flip, "augment: random horizontal flip");
  add_attack_options(cmd, o->train_attack, "", "training attack");
  add_attack_options(cmd, o->eval_attack, "eval-", "held-out attack");
  cmd->add_option("--val-samples", o->val_samples, "held-out images split off the training set")
      ->capture_default_str();
  cmd->add_option("--log-every", c.log_every, "progress line every N steps")->capture_default_str();
  cmd->add_option("--out", c.out_dir, "checkpoint directory")->required();
  cmd->add_flag("--resume", c.resume, "continue the checkpoint in --out from its last epoch");
  cmd->add_flag("--force", o->force, "replace an existing checkpoint in --out");
  cmd->add_option("--dist-backend", o->dist_backend,
                  "data-parallel runs (WORLD_SIZE > 1, docs/distributed.md): auto (gloo on CPU, "
                  "nccl on CUDA) | gloo | nccl")
      ->capture_default_str();
  cmd->add_flag("--sync-bn", c.sync_bn,
                "data-parallel runs: BatchNorm with the statistics of the whole global batch "
                "(default: each rank's part, as PyTorch's DDP)");
  cmd->add_option("--dist-timeout", o->dist_timeout,
                  "data-parallel runs: seconds to wait for the store, the other ranks and each "
                  "collective before exiting (2 at the start, 6 later)")
      ->capture_default_str();
  cmd->add_flag("--keep-best", c.keep_best, "also keep the best held-out-RA epoch in <out>-best");
  cmd->callback([&common, o, cmd] {
    // AdvMoE's paper trains with 2 PGD steps; the other methods with defaults::train_steps.
    if (o->cfg.method == "advmoe" && cmd->count("--steps") == 0)
      o->train_attack.steps = defaults::advmoe_train_steps;
    if (o->spec.kind == "moe-cnn" && cmd->count("--experts") == 0)
      o->spec.experts = defaults::moe_cnn_groups;
    run_train(common, *o);
  });
}

PgdConfig AttackOptions::config() const {
  PgdConfig c;
  c.norm = norm_parse(norm);
  c.loss = attack_loss_parse(loss);
  if (!(eps >= 0)) throw ConfigError::invalid("--eps", std::to_string(eps), ">= 0");
  limits::check_range("--steps", steps, 0, limits::max_steps);
  limits::check_range("--restarts", restarts, 1, limits::max_restarts);
  c.eps = eps, c.steps = steps, c.restarts = restarts;
  c.step_size = step_size > 0 ? step_size : default_step(eps, steps);
  return c;
}

void add_attack_options(CLI::App* cmd, AttackOptions& a, const std::string& prefix,
                        const std::string& what) {
  cmd->add_option("--" + prefix + "norm", a.norm, what + " norm: inf | 2")->capture_default_str();
  cmd->add_option("--" + prefix + "eps", a.eps, what + " radius")->capture_default_str();
  cmd->add_option("--" + prefix + "steps", a.steps, what + " PGD steps")->capture_default_str();
  cmd->add_option("--" + prefix + "step-size", a.step_size,
                  what + " step size (default 2.5*eps/steps)");
  cmd->add_option("--" + prefix + "restarts", a.restarts, what + " random restarts")
      ->capture_default_str();
  cmd->add_option("--" + prefix + "loss", a.loss, what + " loss: ce | margin")
      ->capture_default_str();
}

std::string describe_attack(const PgdConfig& c) {
  return "PGD-" + std::to_string(c.steps) + " L" + (c.norm == Norm::linf ? "inf" : "2") +
         " eps=" + fmt_fixed(c.eps, 4) + " step=" + fmt_fixed(c.step_size, 4) +
         " restarts=" + std::to_string(c.restarts) +
         " loss=" + (c.loss == AttackLoss::ce ? "ce" : "margin");
}

/// Shares per expert as "0.25/0.31/0.22/0.22".
std::string usage_line(const std::vector<int64_t>& counts) {
  return ExpertUsage::text(ExpertUsage::shares(counts));
}

}  // namespace moecert
