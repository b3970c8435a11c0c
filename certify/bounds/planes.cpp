// Input planes: the upper relaxation of a ReLU that reads an affine map of the input box
// by a face of the convex hull of the unit's graph over that box (docs/certification.md
// §10, input planes), instead of the chord over its interval. One backward step takes the
// ReLU and the affine layer together, straight to the box's node.
#include "bounds-impl.h"
#include "kernels.h"
#include "moecert/error.h"

namespace moecert::bp {
namespace {

constexpr double u64 = std::numeric_limits<double>::epsilon() / 2;
/// Units whose affine map reads more inputs than this keep the chord (sorting cost).
constexpr int64_t kMaxFanIn = 128;
/// Units per row that take a plane: those where it gains most on the chord.
constexpr int64_t kPerRow = 64;

/// Per unit of the affine node `a` (flat over its output), the flat indices of the
/// inputs it reads (-1: zero padding) and their weights, and its bias: [N, n], [N, n], [N].
struct FanIn {
  torch::Tensor index, weight, bias;
};

FanIn fan_in(const Layer& l, const Shape& in_shape, const Shape& out_shape) {
  auto opts = l.weight.options();
  FanIn f;
  if (l.kind == Layer::Kind::linear) {
    const int64_t N = l.weight.size(0), D = l.weight.size(1);
    f.index = torch::arange(D, torch::kLong).to(l.weight.device()).expand({N, D});
    f.weight = l.weight;
  } else {  // conv: the window of output (o, i, j) is column (i, j) of the unfolded input
    const int64_t O = l.weight.size(0), k = l.weight.size(2);
    const int64_t cells = in_shape[0] * in_shape[1] * in_shape[2];
    auto ids = (torch::arange(cells, opts) + 1).view({1, in_shape[0], in_shape[1], in_shape[2]});
    auto cols = torch::nn::functional::unfold(
        ids, torch::nn::functional::UnfoldFuncOptions({k, k}).stride(l.stride).padding(l.padding));
    auto per_site = cols[0].t().round().to(torch::kLong) - 1;  // [Ho·Wo, n]
    const int64_t sites = out_shape[1] * out_shape[2];
    f.index = per_site.repeat({O, 1});
    f.weight = l.weight.reshape({O, -1}).repeat_interleave(sites, 0);
  }
  const int64_t N = f.index.size(0);
  f.bias = l.bias.defined() ? (l.kind == Layer::Kind::linear
                                   ? l.bias
                                   : l.bias.repeat_interleave(out_shape[1] * out_shape[2]))
                            : torch::zeros({N}, opts);
  return f;
}

int64_t fan_in_size(const Layer& l) {
  return l.kind == Layer::Kind::linear ? l.weight.size(1) : l.weight[0].numel();
}

/// Σ min over the box [lo, hi] of G·x per row. G, lo, hi: [R, D] -> [R]
torch::Tensor box_min(const torch::Tensor& G, const torch::Tensor& lo, const torch::Tensor& hi) {
  return (G.clamp_min(0) * lo + G.clamp_max(0) * hi).sum(1);
}

}  // namespace

int input_planes_node(const BoundPass& pass, int m) {
  if (!pass.opt.input_planes || pass.domain.norm != Norm::linf || pass.relational()) return -1;
  const auto& nodes = pass.graph->nodes();
  const auto& r = nodes[static_cast<size_t>(m)];
  if (r.layer->kind != Layer::Kind::relu || r.inputs.size() != 1 || r.inputs[0] < 0) return -1;
  const int a = r.inputs[0];
  const auto& an = nodes[static_cast<size_t>(a)];
  if ((an.layer->kind != Layer::Kind::conv && an.layer->kind != Layer::Kind::linear) ||
      an.inputs.size() != 1 || an.consumers.size() != 1 || fan_in_size(*an.layer) > kMaxFanIn)
    return -1;
  // Between the input and the affine layer only a per-channel normalisation or a
  // flatten: the box of the layer's input is then the image of the region's box.
  for (int c = an.inputs[0]; c >= 0;) {
    const auto& cn = nodes[static_cast<size_t>(c)];
    if ((cn.layer->kind != Layer::Kind::channel_affine && cn.layer->kind != Layer::Kind::flatten) ||
        cn.inputs.size() != 1)
      return -1;
    c = cn.inputs[0];
  }
  return a;
}

Coeffs input_planes_step(const BoundPass& pass, int m, const Coeffs& rows,
                         const torch::Tensor& alpha, const torch::Tensor* extra, torch::Tensor& b,
                         torch::Tensor& mag) {
  const auto& nodes = pass.graph->nodes();
  const auto& rn = nodes[static_cast<size_t>(m)];
  const int a = rn.inputs[0];
  const auto& an = nodes[static_cast<size_t>(a)];
  const int c = an.inputs[0];
  const NodeBounds& zb = pass.nodes[static_cast<size_t>(a)];
  const NodeBounds& xb = c < 0 ? pass.input : pass.nodes[static_cast<size_t>(c)];
  const Shape& xshape = c < 0 ? pass.graph->input_shape() : nodes[static_cast<size_t>(c)].out_shape;
  const Layer& L = *an.layer;
  // Patch rows stay patches (their windows over the ReLU, then over the input). Rows
  // with a Lagrangian term at the affine layer's output come dense: the walk densifies
  // them before it lays the slopes out like them.
  if (rows.patches && extra)
    throw Error(ExitCode::internal, "certify: input planes: patch rows with a Lagrangian term");
  const bool patches = rows.patches;
  const int64_t R = rows.A.size(0);
  auto A = rows.A.reshape({R, -1});  // [R, N]: the units of the row (its window)
  auto gather_z = gatherer(rows);
  auto l = gather_z(zb.lo).reshape({R, -1}), u = gather_z(zb.hi).reshape({R, -1});
  auto sel = l.lt(0) & u.gt(0) & A.lt(0);  // the units whose upper line the rows take

  // The ReLU step as CROWN takes it: the other units through the rule (α included), the
  // selected ones by their chord y <= s·z + t (relu.cpp's, with its rounding allowance).
  Coeffs rest = rows;
  rest.A = torch::where(sel, torch::zeros_like(A), A).view_as(rows.A);
  torch::Tensor k0 = b;
  BackwardArgs ra{*rn.layer, rn.in_shapes, rn.out_shape, {&zb}, gather_z, alpha};
  Coeffs z = rn.rule->backward(ra, rest, k0).at(0);
  auto [s, t] = relu_chord(l, u);  // read on the selected units only
  auto A_sel = A.masked_fill(~sel, 0);
  k0 = k0 + (A_sel * t).sum(1);
  z.A = z.A + (A_sel * s).view_as(z.A);
  if (extra) z.A = z.A + *extra;
  mag = mag + abs_dot(z, zb.mag);  // the affine step's rounding, as the walk charges it
  BackwardArgs aa{L, an.in_shapes, an.out_shape, {&xb}, gatherer(z), {}};
  Coeffs g = an.rule->backward(aa, z, k0).at(0);  // the chord's rows over the box's node
  if (g.patches != patches) throw Error(ExitCode::internal, "certify: input planes: row layouts");
  auto G = g.A.reshape({R, -1});  // [R, D]: the row's inputs (its window)
  auto gather_x = gatherer(g);
  auto xlo = gather_x(xb.lo).reshape({R, -1}), xhi = gather_x(xb.hi).reshape({R, -1});

  // The box's vertex where the chord's rows are least, and each selected unit's gain
  // there: the chord's value above relu(z*), where a hull face through the vertex is exact.
  torch::Tensor gain, xstar;
  {
    torch::NoGradGuard ng;
    xstar = torch::where(G.gt(0), xlo, xhi);
    torch::Tensor zs;
    if (patches) {  // the units of a ReLU window read exactly the input window
      zs = torch::conv2d(xstar.view(g.A.sizes()), L.weight, L.bias, L.stride);
    } else {
      std::vector<int64_t> shape{R};
      shape.insert(shape.end(), xshape.begin(), xshape.end());
      zs = an.rule->forward(L, {xstar.view(shape)});
    }
    zs = zs.reshape({R, -1});
    gain = torch::where(sel, -A * (s * zs + t - zs.clamp_min(0)), torch::zeros_like(A));
  }
  const int64_t E = std::min<int64_t>(kPerRow, A.size(1));
  auto idx = std::get<1>(gain.topk(E, 1));  // [R, E]: the units that gain most
  auto valid = gain.gather(1, idx).gt(0);
  if (!valid.any().item<bool>()) {
    b = k0;
    return g;
  }
  auto lam = A.gather(1, idx).masked_fill(~valid, 0);  // < 0 where valid
  // Each entry's inputs (flat positions in the row's input layout), weights and bias.
  torch::Tensor ii, ww, bb;
  if (patches) {
    const int64_t K = rows.A.size(2), Kin = g.A.size(2), k = L.weight.size(2);
    auto lopt = idx.options();
    auto ch = torch::div(idx, K * K, "floor"), ky = torch::div(idx.remainder(K * K), K, "floor"),
         kx = idx.remainder(K);
    auto ci = torch::arange(L.weight.size(1), lopt).view({-1, 1, 1});
    auto dy = torch::arange(k, lopt).view({1, -1, 1}), dx = torch::arange(k, lopt).view({1, 1, -1});
    auto offsets = (ci * Kin * Kin + dy * Kin + dx).flatten();  // [n]
    ii = ((ky * L.stride) * Kin + kx * L.stride).unsqueeze(2) + offsets.view({1, 1, -1});
    ww = L.weight.flatten(1).index_select(0, ch.flatten()).view({R, E, -1});
    bb = L.bias.defined() ? L.bias.index_select(0, ch.flatten()).view({R, E})
                          : torch::zeros({R, E}, A.options());
  } else {
    const FanIn f = fan_in(L, an.in_shapes.at(0), an.out_shape);
    auto flat = idx.flatten();
    ii = f.index.index_select(0, flat).view({R, E, -1});
    ww = f.weight.index_select(0, flat).view({R, E, -1});
    bb = f.bias.index_select(0, flat).view({R, E});
  }
  const int64_t n = ii.size(2);
  auto at = ii.clamp_min(0).view({R, E * n});
  // Inputs on the zero padding: -1 in the fan-in table, outside the grid in a window
  // (whose entries there the walk drops).
  auto pad = ii.lt(0);
  if (patches) {
    auto inside = gather_x(torch::ones_like(xb.lo)).reshape({R, -1});  // 0 off the grid
    pad = inside.gather(1, at).view({R, E, n}).eq(0);
  }
  auto lo = xlo.gather(1, at).view({R, E, n}).masked_fill(pad, 0);
  auto hi = xhi.gather(1, at).view({R, E, n}).masked_fill(pad, 0);
  auto xs = xstar.gather(1, at).view({R, E, n}).masked_fill(pad, 0);
  auto Lb = torch::where(ww.ge(0), lo, hi);  // the end where w·x is least
  torch::Tensor plane_cf, plane_k;
  {
    torch::NoGradGuard ng;             // a function of the box and the weights alone
    auto d = ww.abs() * (hi - lo);     // >= 0
    auto ell = bb + (ww * Lb).sum(2);  // z's least value over the box (before rounding)
    auto M = bb.abs() + (ww.abs() * torch::max(lo.abs(), hi.abs())).sum(2);
    const double slack = 4.0 * static_cast<double>((n + 2) * (n + 2)) * u64;
    // Lovász's chain through the vertex: inputs at their high end first, larger spans first.
    auto high = (xs.ne(Lb) & d.gt(0)).to(d.scalar_type());
    auto key = high * 4 + d / (d.amax(2, true) + 1e-300);
    auto order = key.argsort(2, /*descending=*/true);
    auto ds = d.gather(2, order);
    auto Fk = (ell.unsqueeze(2) + ds.cumsum(2)).clamp_min(0);
    auto Fp = torch::cat({ell.clamp_min(0).unsqueeze(2), Fk.narrow(2, 0, n - 1)}, 2);
    auto ratio_sorted =
        torch::where(ds.gt(0), (Fk - Fp) / ds.clamp_min(1e-300), torch::zeros_like(ds));
    auto ratio = torch::zeros_like(ratio_sorted).scatter(2, order, ratio_sorted);
    plane_cf = (ratio * ww).masked_fill(pad, 0);
    plane_k = ell.clamp_min(0) + slack * M - (plane_cf * Lb).sum(2);
  }
  // Swap the chord for the plane on these units: the chord's part of the rows out, the
  // plane's in; per row, whichever gives the larger bound over the box.
  auto se = s.gather(1, idx), te = t.gather(1, idx);
  auto chord_cf = (se.unsqueeze(2) * ww).masked_fill(pad, 0);
  auto chord_k = se * bb + te;
  auto dw = (lam.unsqueeze(2) * (plane_cf - chord_cf)).view({R, E * n});
  auto G2 = G + torch::zeros_like(G).scatter_add(1, at, dw);
  auto k2 = k0 + (lam * (plane_k - chord_k)).sum(1);
  auto better = (k2 + box_min(G2, xlo, xhi)).gt(k0 + box_min(G, xlo, xhi));
  auto big = torch::max(lo.abs(), hi.abs());
  auto swap_mag = (lam.abs() * (plane_k.abs() + chord_k.abs() +
                                ((plane_cf.abs() + chord_cf.abs()) * big).sum(2)))
                      .sum(1);
  b = torch::where(better, k2, k0);
  mag = mag + torch::where(better, swap_mag, torch::zeros_like(swap_mag));
  g.A = torch::where(better.unsqueeze(1), G2, G).view(g.A.sizes());
  return g;
}

}  // namespace moecert::bp
