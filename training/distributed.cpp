// The c10d process group behind data-parallel training (docs/distributed.md): the
// rendezvous through a TCP store, Gloo (and NCCL in a CUDA build with it), and the
// collectives the epoch loop needs. The only translation unit that sees c10d.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef MOECERT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>

#include <cstdlib>
#include <list>

#include "moecert/distributed.h"
#include "moecert/error.h"
#include "moecert/runtime.h"

namespace moecert {

namespace {

/// Parses an integer environment variable; ConfigError naming it otherwise.
int env_int(const char* name, const char* value, int lo, int hi) {
  try {
    size_t used = 0;
    const long v = std::stol(value, &used);
    if (used == std::string(value).size() && v >= lo && v <= hi) return static_cast<int>(v);
  } catch (const std::exception&) {
  }
  throw ConfigError("environment variable " + std::string(name) + "=" + value +
                    ": expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                    "]");
}

const char* env_required(const std::function<const char*(const char*)>& get, const char* name,
                         int world) {
  const char* v = get(name);
  if (v && *v) return v;
  throw ConfigError("environment variable " + std::string(name) +
                    " is not set: a distributed run (WORLD_SIZE=" + std::to_string(world) +
                    ") joins its group through MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE; "
                    "launch it with torchrun or scripts/slurm-env.sh (docs/distributed.md)");
}

bool loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

std::string what_of(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

class C10dGroup : public Collective {
 public:
  C10dGroup(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::string backend, int rank, int size)
      : pg_(std::move(pg)), backend_(std::move(backend)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return backend_; }

  void all_reduce_sum(std::vector<torch::Tensor>& tensors) override {
    guarded("all-reduce", [&] {
      std::list<std::vector<at::Tensor>> held;  // each Work reads its vector until wait()
      std::vector<c10::intrusive_ptr<c10d::Work>> works;
      for (auto& t : tensors) {
        held.push_back({t});
        works.push_back(pg_->allreduce(held.back()));
      }
      for (auto& w : works) w->wait();
    });
  }
  void broadcast(std::vector<torch::Tensor>& tensors, int root) override {
    guarded("broadcast", [&] {
      std::list<std::vector<at::Tensor>> held;
      std::vector<c10::intrusive_ptr<c10d::Work>> works;
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      for (auto& t : tensors) {
        held.push_back({t});
        works.push_back(pg_->broadcast(held.back(), opts));
      }
      for (auto& w : works) w->wait();
    });
  }
  void barrier() override {
    guarded("barrier", [&] { pg_->barrier()->wait(); });
  }

 private:
  template <class F>
  void guarded(const char* what, F&& f) {
    try {
      f();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error(ExitCode::distributed,
                  "rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ": " + what +
                      " over " + backend_ +
                      " failed (another rank exited or stalled, or the network failed; the "
                      "last checkpoint is left as it was): " +
                      what_of(e).substr(0, 300));
    }
  }

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::string backend_;
  int rank_, size_;
};

}  // namespace

DistributedEnv distributed_env(const std::function<const char*(const char*)>& get_in) {
  const std::function<const char*(const char*)> get =
      get_in ? get_in : [](const char* n) -> const char* { return std::getenv(n); };
  DistributedEnv env;
  const char* world = get("WORLD_SIZE");
  if (!world || !*world) return env;
  env.world_size = env_int("WORLD_SIZE", world, 1, 1 << 16);
  if (env.world_size == 1) return env;
  const int w = env.world_size;
  env.rank = env_int("RANK", env_required(get, "RANK", w), 0, w - 1);
  const char* local = get("LOCAL_RANK");
  env.local_rank = local && *local ? env_int("LOCAL_RANK", local, 0, w - 1) : 0;
  const char* local_world = get("LOCAL_WORLD_SIZE");
  env.local_world_size =
      local_world && *local_world ? env_int("LOCAL_WORLD_SIZE", local_world, 1, w) : 1;
  env.master_addr = env_required(get, "MASTER_ADDR", w);
  env.master_port = env_int("MASTER_PORT", env_required(get, "MASTER_PORT", w), 1, 65535);
  const char* agent = get("TORCHELASTIC_USE_AGENT_STORE");
  env.agent_store = agent && std::string(agent) == "True";
  const char* restarts = get("TORCHELASTIC_RESTART_COUNT");
  if (restarts && *restarts) env.restart_count = restarts;
  return env;
}

std::string distributed_backend(const std::string& requested, torch::Device device) {
  const std::string b = requested == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : requested;
  if (b == "gloo") return b;
  if (b != "nccl") throw ConfigError::invalid("--dist-backend", requested, "auto | gloo | nccl");
  if (!device.is_cuda())
    throw ConfigError::invalid("--dist-backend", requested,
                               "gloo on CPU (NCCL needs --device cuda)");
#ifndef MOECERT_WITH_NCCL
  throw ConfigError::invalid("--dist-backend", requested,
                             "gloo (this build's LibTorch has no NCCL; docs/distributed.md)");
#endif
  return b;
}

std::unique_ptr<Collective> distributed_join(const DistributedEnv& env, const std::string& backend,
                                             std::chrono::milliseconds timeout) {
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  c10::intrusive_ptr<c10d::Store> store;
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(env.master_port);
    o.isServer = env.rank == 0 && !env.agent_store;
    o.numWorkers = env.world_size;
    o.waitWorkers = false;
    o.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
    store = env.agent_store
                ? c10::intrusive_ptr<c10d::Store>(c10::make_intrusive<c10d::PrefixStore>(
                      "/worker/attempt_" + env.restart_count, tcp))
                : c10::intrusive_ptr<c10d::Store>(tcp);
  } catch (const std::exception& e) {
    throw ConfigError("rank " + std::to_string(env.rank) + ": cannot reach the TCP store at " +
                      where + " (MASTER_ADDR, MASTER_PORT) within " +
                      fmt_fixed(static_cast<double>(timeout.count()) / 1000.0, 1) +
                      " s: " + what_of(e).substr(0, 300));
  }
  try {
    c10::intrusive_ptr<c10d::ProcessGroup> pg;
    if (backend == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname && *ifname)
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      else if (loopback(env.master_addr))
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      else
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, env.rank, env.world_size, opts);
    } else {
#ifdef MOECERT_WITH_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, env.rank, env.world_size, opts);
#else
      throw ConfigError::invalid("--dist-backend", backend, "gloo");
#endif
    }
    auto group = std::make_unique<C10dGroup>(pg, backend, env.rank, env.world_size);
    group->barrier();  // every rank has arrived
    return group;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw ConfigError("rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size) +
                      ": the " + backend + " group at " + where +
                      " did not form within the timeout: " + what_of(e).substr(0, 300));
  }
}

void distributed_sum_gradients(const std::vector<torch::Tensor>& params, Collective& group,
                               int64_t bucket_bytes) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> trained;
  for (const auto& p : params)
    if (p.requires_grad()) trained.push_back(p);
  if (trained.empty()) return;
  const auto flag_opts = trained.front().options().dtype(torch::kFloat32);
  auto flags = torch::zeros({static_cast<int64_t>(trained.size())}, flag_opts.device(torch::kCPU));
  auto* f = flags.data_ptr<float>();
  for (size_t i = 0; i < trained.size(); ++i) f[i] = trained[i].grad().defined() ? 1.f : 0.f;
  flags = flags.to(trained.front().device());
  // Buckets of consecutive parameters of one dtype and device.
  std::vector<std::pair<size_t, size_t>> ranges;
  std::vector<torch::Tensor> buffers{flags};
  for (size_t i = 0; i < trained.size();) {
    size_t j = i;
    int64_t bytes = 0;
    std::vector<torch::Tensor> pieces;
    while (j < trained.size() &&
           (j == i || (bytes < bucket_bytes && trained[j].dtype() == trained[i].dtype() &&
                       trained[j].device() == trained[i].device()))) {
      const auto& p = trained[j];
      pieces.push_back(p.grad().defined() ? p.grad().reshape(-1)
                                          : torch::zeros({p.numel()}, p.options()));
      bytes += p.numel() * static_cast<int64_t>(p.element_size());
      ++j;
    }
    ranges.emplace_back(i, j);
    buffers.push_back(torch::cat(pieces));
    i = j;
  }
  group.all_reduce_sum(buffers);
  auto any = buffers.front().cpu();
  for (size_t b = 0; b < ranges.size(); ++b) {
    int64_t offset = 0;
    for (size_t i = ranges[b].first; i < ranges[b].second; ++i) {
      auto& p = trained[i];
      auto piece = buffers[b + 1].narrow(0, offset, p.numel()).view(p.sizes());
      offset += p.numel();
      if (any.data_ptr<float>()[i] == 0) continue;  // no rank produced it
      if (p.grad().defined())
        p.mutable_grad().copy_(piece);
      else
        p.mutable_grad() = piece.clone();
    }
  }
}

void distributed_broadcast_module(torch::nn::Module& module, Collective& group, bool buffers_only) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> targets, sent;
  auto add = [&](const torch::Tensor& t) {
    targets.push_back(t);
    sent.push_back(t.detach().contiguous());
  };
  if (!buffers_only)
    for (const auto& p : module.parameters()) add(p);
  for (const auto& b : module.buffers()) add(b);
  if (sent.empty()) return;
  group.broadcast(sent, 0);
  for (size_t i = 0; i < targets.size(); ++i)
    if (sent[i].data_ptr() != targets[i].data_ptr()) targets[i].detach().copy_(sent[i]);
}

}  // namespace moecert
