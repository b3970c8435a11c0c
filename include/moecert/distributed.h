// Data-parallel training beyond one process (SPEC §7): a group of ranks joined
// through LibTorch's c10d (a TCP store for the rendezvous, Gloo on CPU, NCCL on
// CUDA), from the variables torchrun and scripts/slurm-env.sh set.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moecert {

/// The processes that train one model. Every rank must call the same collectives
/// in the same order with tensors of the same shapes; a collective that cannot
/// complete within the group's timeout (a rank died, the network failed) throws
/// Error(ExitCode::distributed) naming this rank, instead of hanging.
class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// "gloo" | "nccl"
  virtual std::string backend() const = 0;
  /// Starts summing each tensor over the ranks, in place, and returns at once; the
  /// returned function waits until the sums are complete (and throws as a collective
  /// does). The tensors must not be read or written before it returns.
  virtual std::function<void()> all_reduce_sum_start(std::vector<torch::Tensor> tensors) = 0;
  /// Sums each tensor over the ranks, in place.
  void all_reduce_sum(const std::vector<torch::Tensor>& tensors) {
    all_reduce_sum_start(tensors)();
  }
  /// Overwrites each tensor with rank `root`'s, in place.
  virtual void broadcast(std::vector<torch::Tensor>& tensors, int root = 0) = 0;
  virtual void barrier() = 0;
};

/// Where a rank finds the group: read from the environment.
struct DistributedEnv {
  int rank = 0, world_size = 1, local_rank = 0, local_world_size = 1;
  std::string master_addr;
  int master_port = 0;
  /// torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE=True): every
  /// rank joins it as a client, under the restart's prefix.
  bool agent_store = false;
  std::string restart_count = "0";

  /// WORLD_SIZE > 1, or WORLD_SIZE=1 with MASTER_ADDR and MASTER_PORT (torchrun
  /// --nproc_per_node=1): a group of one, through which every collective still runs.
  bool distributed() const { return world_size > 1 || !master_addr.empty(); }
};

/// Reads WORLD_SIZE (unset, or 1 without MASTER_ADDR: one process), RANK, LOCAL_RANK,
/// LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT through `get` (the process environment by
/// default). Throws ConfigError naming the variable that is missing or malformed.
DistributedEnv distributed_env(const std::function<const char*(const char*)>& get = {});

/// "auto" -> "gloo" on CPU, "nccl" on CUDA; "gloo" | "nccl" kept. ConfigError for
/// other names, and for nccl without CUDA or in a build without NCCL.
std::string distributed_backend(const std::string& requested, torch::Device device);

/// Joins the group: the TCP store at MASTER_ADDR:MASTER_PORT (rank 0 hosts it unless
/// torchrun's agent does), then a process group of `backend`. A store that cannot be
/// reached, or ranks that do not all arrive, within `timeout` give a ConfigError
/// naming the address (exit 2). `timeout` also bounds every later collective.
std::unique_ptr<Collective> distributed_join(const DistributedEnv& env, const std::string& backend,
                                             std::chrono::milliseconds timeout);

/// How a GradientReducer groups and schedules its all-reduces.
struct GradientBuckets {
  /// Parameters are packed, in reverse registration order (roughly the order the
  /// backward pass produces their gradients), into flat buckets of about this size.
  int64_t bytes = 25 << 20;
  /// Launch each bucket's all-reduce from inside the backward pass as soon as it and
  /// every bucket before it have their gradients, so communication overlaps the rest
  /// of the backward pass (PyTorch DDP's schedule); false: all after the pass.
  bool overlap = true;
};

/// Sums the gradients of one optimizer's parameters over the group. Made once per
/// optimizer: it packs `params` into buckets and, with `overlap`, hooks every one that
/// requires a gradient now (the hooks stay for its lifetime and act only inside
/// backward()).
class GradientReducer {
 public:
  GradientReducer(const std::vector<torch::Tensor>& params, Collective& group,
                  const GradientBuckets& buckets = {});
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  /// Runs `loss.backward()` (each rank's loss already scaled by its share of the
  /// global batch) and sums the gradients over the group, so every rank ends with the
  /// gradient of the global batch's mean loss. The gradients must be zero or undefined
  /// before. Every rank launches the same buckets in the same order; a parameter this
  /// rank's pass does not reach (an expert no sample of this rank was routed to)
  /// contributes zeros. A gradient no rank produced stays undefined (the optimizer
  /// skips it, as one process would); one some ranks produced is summed with zeros for
  /// the others. The equality with one process and the schedule: docs/distributed.md.
  void backward(const torch::Tensor& loss);

 private:
  struct State;
  std::shared_ptr<State> state_;
  std::vector<std::pair<size_t, unsigned>> hooks_;  // (parameter, hook)
};

/// While one is alive on a thread, BatchNorm layers in training mode there normalise
/// with the statistics of the whole data-parallel batch (sums over `group`, in float64),
/// and gradients flow through those statistics to every rank's inputs (`--sync-bn`,
/// PyTorch's SyncBatchNorm). Running statistics use the global batch too.
class SyncBatchNormScope {
 public:
  explicit SyncBatchNormScope(Collective* group);
  ~SyncBatchNormScope();
  SyncBatchNormScope(const SyncBatchNormScope&) = delete;
  SyncBatchNormScope& operator=(const SyncBatchNormScope&) = delete;
  /// The group of the innermost scope on this thread; null outside any.
  static Collective* active();

 private:
  Collective* previous_;
};

/// Copies rank 0's parameters and buffers of `module` to every rank.
void distributed_broadcast_module(torch::nn::Module& module, Collective& group,
                                  bool buffers_only = false);

}  // namespace moecert
