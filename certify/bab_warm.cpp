// Warm starts of ReLU branch and bound (see bab-impl.h): the α-CROWN parameters each
// subproblem's margin rows were tuned to, banked for its children. docs/certification.md §22.
#include <torch/torch.h>

#include <functional>
#include <map>

#include "bab-impl.h"

namespace moecert::bab::detail {
namespace {

/// The bank of several RowParams (rows stacked in order); a tensor some of them lack is
/// zero on their rows (zero multipliers; slopes of 0, sound like any other).
RowParams stack(const std::vector<const RowParams*>& parts) {
  RowParams out;
  if (parts.empty()) return out;
  auto cat = [&](const std::function<torch::Tensor(const RowParams&)>& get) {
    torch::Tensor like;
    for (const auto* q : parts)
      if (get(*q).defined()) {
        like = get(*q);
        break;
      }
    if (!like.defined()) return torch::Tensor();
    std::vector<torch::Tensor> ts;
    for (const auto* q : parts) {
      auto t = get(*q);
      if (!t.defined()) {
        auto shape = like.sizes().vec();
        shape[0] = q->has.size(0);
        t = torch::zeros(shape, like.options());
      }
      ts.push_back(t);
    }
    return torch::cat(ts);
  };
  size_t na = 0, nb = 0;
  for (const auto* q : parts) na = std::max(na, q->alpha.size()), nb = std::max(nb, q->beta.size());
  for (size_t m = 0; m < na; ++m)
    out.alpha.push_back(
        cat([m](const RowParams& q) { return m < q.alpha.size() ? q.alpha[m] : torch::Tensor(); }));
  for (size_t m = 0; m < nb; ++m)
    out.beta.push_back(
        cat([m](const RowParams& q) { return m < q.beta.size() ? q.beta[m] : torch::Tensor(); }));
  out.beta_in = cat([](const RowParams& q) { return q.beta_in; });
  out.has = cat([](const RowParams& q) { return q.has; });
  return out;
}

/// The bytes the tensors of `q` hold.
int64_t param_bytes(const RowParams& q) {
  int64_t bytes = 0;
  auto add = [&](const torch::Tensor& t) {
    if (t.defined()) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  };
  for (const auto& t : q.alpha) add(t);
  for (const auto& t : q.beta) add(t);
  add(q.beta_in), add(q.has);
  return bytes;
}

}  // namespace

void WarmStarts::apply(forms::MemberPass& pass, const std::vector<Sub>& subs) const {
  const int64_t n = static_cast<int64_t>(subs.size());
  for (size_t j = 0; j < pass.experts.size(); ++j) {
    std::vector<const RowParams*> parts;
    std::map<const Tuned*, int64_t> offset;
    int64_t rows = 0;
    auto slot = torch::full({n, K1_}, int64_t{-1}, torch::kLong);
    auto sa = slot.accessor<int64_t, 2>();
    for (int64_t c = 0; c < n; ++c) {
      const Tuned* t = subs[static_cast<size_t>(c)].warm.get();
      if (!t || j >= t->params.size() || !t->params[j].has.defined()) continue;
      auto [it, fresh] = offset.emplace(t, rows);
      if (fresh) parts.push_back(&t->params[j]), rows += t->params[j].has.size(0);
      for (size_t r = 0; r < t->k[j].size(); ++r)
        sa[c][t->k[j][r]] = it->second + static_cast<int64_t>(r);
    }
    pass.warm.push_back(stack(parts));
    pass.warm_slot.push_back(slot.to(pass.domain.x.device()));
  }
}

void WarmStarts::keep(const forms::Evaluation& ev, std::vector<Sub>& subs) {
  const int64_t n = static_cast<int64_t>(subs.size());
  std::vector<Tuned> made(static_cast<size_t>(n));  // empty params: none
  std::vector<int64_t> bytes(static_cast<size_t>(n), 0);
  for (size_t j = 0; j < ev.tuned.size(); ++j) {
    if (!ev.tuned[j].has.defined()) continue;
    auto keys = ev.tuned_keys[j].cpu();
    const auto ka = keys.accessor<int64_t, 1>();
    std::vector<std::vector<int64_t>> at(static_cast<size_t>(n));
    for (int64_t r = 0; r < keys.size(0); ++r) at[static_cast<size_t>(ka[r] / K1_)].push_back(r);
    for (int64_t c = 0; c < n; ++c) {
      const auto& rows = at[static_cast<size_t>(c)];
      if (rows.empty()) continue;
      auto& t = made[static_cast<size_t>(c)];
      t.params.resize(ev.tuned.size()), t.k.resize(ev.tuned.size());
      t.params[j] = forms::param_rows(ev.tuned[j], torch::tensor(rows, torch::kLong));
      bytes[static_cast<size_t>(c)] += param_bytes(t.params[j]);
      for (int64_t r : rows) t.k[j].push_back(ka[r] % K1_);
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    auto& s = subs[static_cast<size_t>(c)];
    // An expert none of whose rows were tuned here (not bounded again: its parent's
    // bounds carried) keeps the parameters it had.
    auto& t = made[static_cast<size_t>(c)];
    if (s.warm)
      for (size_t j = 0; j < s.warm->params.size(); ++j) {
        if (!s.warm->params[j].has.defined() || (j < t.params.size() && t.params[j].has.defined()))
          continue;
        t.params.resize(std::max(t.params.size(), s.warm->params.size()));
        t.k.resize(t.params.size());
        t.params[j] = s.warm->params[j], t.k[j] = s.warm->k[j];
        bytes[static_cast<size_t>(c)] += param_bytes(t.params[j]);
      }
    s.warm.reset();
    const int64_t b = bytes[static_cast<size_t>(c)];
    if (t.params.empty() || held_ + b > cap_) continue;
    held_ += b;
    Tuned* raw = new Tuned(std::move(t));
    s.warm = std::shared_ptr<const Tuned>(raw, [this, b](const Tuned* t) {
      held_ -= b;
      delete t;
    });
  }
}

}  // namespace moecert::bab::detail
