// The c10d process group behind data-parallel training (docs/distributed.md): the
// rendezvous through a TCP store, Gloo (and NCCL in a CUDA build with it), and the
// collectives the epoch loop needs. The only translation unit that sees c10d.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef MOECERT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/csrc/autograd/function.h>
#include <torch/torch.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <unordered_set>

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

  std::function<void()> all_reduce_sum_start(std::vector<torch::Tensor> tensors) override {
    // Each Work reads its vector until wait(): the waiter owns them.
    auto held = std::make_shared<std::list<std::vector<at::Tensor>>>();
    auto works = std::make_shared<std::vector<c10::intrusive_ptr<c10d::Work>>>();
    guarded("all-reduce", [&] {
      for (auto& t : tensors) {
        held->push_back({t});
        works->push_back(pg_->allreduce(held->back()));
      }
    });
    return [this, held, works] {
      guarded("all-reduce", [&] {
        for (auto& w : *works) w->wait();
      });
    };
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
  if (env.world_size == 1) {
    // A group of one only when the launcher gave it a store (torchrun does).
    const char* addr = get("MASTER_ADDR");
    if (!addr || !*addr) return env;
  }
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

/// The buckets and the schedule of one reducer. Bucket b holds consecutive parameters
/// of one dtype and device: their gradients flattened, then one flag per parameter (1
/// where this rank has a gradient for it), summed in one all-reduce. The buffers are
/// allocated once and zeroed before each pass.
struct GradientReducer::State {
  struct Bucket {
    size_t first = 0, last = 0, waiting = 0;
    torch::Tensor data, flags;
    bool launched = false;
  };
  Collective* group = nullptr;
  bool overlap = true;
  std::vector<torch::Tensor> params;             // reverse registration order
  std::vector<std::pair<size_t, int64_t>> slot;  // (bucket, offset)
  std::vector<Bucket> buckets;
  std::vector<bool> seen;
  std::vector<std::function<void()>> waiters;
  size_t next = 0;
  bool active = false;  // inside backward(): the hooks act
  std::mutex mutex;

  void reset() {
    for (auto& b : buckets) b.data.zero_(), b.waiting = b.last - b.first, b.launched = false;
    seen.assign(params.size(), false);
    waiters.clear();
    next = 0;
  }
  /// Parameter i's gradient (of this pass, or what it held) enters its bucket.
  void ready(size_t i, const torch::Tensor& g) {
    auto& b = buckets[slot[i].first];
    if (b.launched)  // an AccumulateGrad node runs once per pass; never reached
      throw std::logic_error("GradientReducer: a gradient arrived after its bucket left");
    const auto& p = params[i];
    if (g.defined())
      b.data.narrow(0, slot[i].second, p.numel()).add_(g.detach().reshape(-1).to(b.data.dtype()));
    b.flags[static_cast<int64_t>(i - b.first)].fill_(g.defined() || p.grad().defined() ? 1 : 0);
    if (!seen[i]) seen[i] = true, --b.waiting;
  }
  /// Launches, in bucket order, every bucket whose gradients are all in and whose
  /// predecessors have left: every rank then issues the same collectives in the same
  /// order, whatever order its pass produced the gradients in.
  void launch_ready() {
    while (next < buckets.size() && buckets[next].waiting == 0) {
      buckets[next].launched = true;
      waiters.push_back(group->all_reduce_sum_start({buckets[next].data}));
      ++next;
    }
  }
  /// From a parameter's hook, on the thread of the backward pass.
  void on_gradient(size_t i, const torch::Tensor& g) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!active) return;  // another backward pass (an attack's, another optimizer's)
    ready(i, g);
    launch_ready();
  }
  /// Before the pass: the parameters `loss`'s graph does not reach (an expert no sample
  /// of this rank was routed to) are ready now, so their buckets do not hold back the
  /// ones after them (DDP's find_unused_parameters).
  void skip_unreached(const torch::Tensor& loss) {
    std::unordered_set<const torch::autograd::Node*> reached;
    std::vector<torch::autograd::Node*> stack;
    if (auto* root = loss.grad_fn().get()) stack.push_back(root);
    while (!stack.empty()) {
      auto* node = stack.back();
      stack.pop_back();
      if (!reached.insert(node).second) continue;
      for (const auto& edge : node->next_edges())
        if (edge.function) stack.push_back(edge.function.get());
    }
    std::lock_guard<std::mutex> lock(mutex);
    for (size_t i = 0; i < params.size(); ++i) {
      const auto acc = torch::autograd::impl::try_get_grad_accumulator(params[i]);
      if (!acc || !reached.count(acc.get())) ready(i, params[i].grad());
    }
    launch_ready();
  }
  /// After the pass: the parameters it did not reach are ready with what they hold
  /// (zeros, or nothing), the remaining buckets launched, all waited for, and the sums
  /// written to the gradients.
  void finish() {
    std::lock_guard<std::mutex> lock(mutex);
    active = false;
    for (size_t i = 0; i < params.size(); ++i)
      if (!seen[i]) ready(i, params[i].grad());
    launch_ready();
    for (auto& wait : waiters) wait();
    waiters.clear();
    for (const auto& b : buckets) {
      const auto produced = b.flags.to(torch::kCPU, torch::kDouble);
      const double* f = produced.data_ptr<double>();
      for (size_t i = b.first; i < b.last; ++i) {
        if (f[i - b.first] == 0) continue;  // no rank has a gradient for it
        auto& p = params[i];
        auto sum = b.data.narrow(0, slot[i].second, p.numel()).view(p.sizes());
        if (p.grad().defined())
          p.mutable_grad().copy_(sum);
        else
          p.mutable_grad() = sum.clone();
      }
    }
  }
};

GradientReducer::GradientReducer(const std::vector<torch::Tensor>& params, Collective& group,
                                 const GradientBuckets& opts)
    : state_(std::make_shared<State>()) {
  torch::NoGradGuard no_grad;
  auto& st = *state_;
  st.group = &group, st.overlap = opts.overlap;
  st.params.assign(params.rbegin(), params.rend());
  st.slot.resize(st.params.size());
  const auto& ps = st.params;
  for (size_t i = 0; i < ps.size();) {
    State::Bucket b;
    int64_t bytes = 0, numel = 0;
    size_t j = i;
    while (j < ps.size() && (j == i || (bytes < opts.bytes && ps[j].dtype() == ps[i].dtype() &&
                                        ps[j].device() == ps[i].device()))) {
      bytes += ps[j].numel() * static_cast<int64_t>(ps[j].element_size());
      numel += ps[j].numel();
      ++j;
    }
    const auto n = static_cast<int64_t>(j - i);
    b.first = i, b.last = j;
    b.data = torch::zeros({numel + n}, ps[i].options().requires_grad(false));
    b.flags = b.data.narrow(0, numel, n);
    int64_t offset = 0;
    for (size_t k = i; k < j; ++k)
      st.slot[k] = {st.buckets.size(), offset}, offset += ps[k].numel();
    st.buckets.push_back(std::move(b));
    i = j;
  }
  if (!opts.overlap) return;
  // Hooks stay for the reducer's lifetime: LibTorch keeps a removed hook's slot, so
  // hooks registered per step would pile up on the parameters.
  const std::weak_ptr<State> weak = state_;
  for (size_t i = 0; i < ps.size(); ++i)
    if (ps[i].requires_grad())
      hooks_.emplace_back(i, ps[i].register_hook([weak, i](const torch::Tensor& g) {
        if (auto s = weak.lock()) s->on_gradient(i, g);
      }));
}

GradientReducer::~GradientReducer() {
  for (const auto& [i, h] : hooks_) state_->params[i].remove_hook(h);
}

void GradientReducer::backward(const torch::Tensor& loss) {
  auto& st = *state_;
  {
    std::lock_guard<std::mutex> lock(st.mutex);
    torch::NoGradGuard no_grad;
    st.reset();
  }
  struct Inactive {  // a pass that throws leaves the hooks idle
    State& st;
    ~Inactive() {
      std::lock_guard<std::mutex> lock(st.mutex);
      st.active = false;
    }
  } inactive{st};
  if (st.overlap) {
    st.skip_unreached(loss);
    std::lock_guard<std::mutex> lock(st.mutex);
    st.active = true;
  }
  loss.backward();
  torch::NoGradGuard no_grad;
  st.finish();
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
