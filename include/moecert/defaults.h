// Every default, tolerance and seed of moecert in one place, each with its reason.
#pragma once

#include <cstdint>

namespace moecert::defaults {

// --- data -------------------------------------------------------------------
/// Where Debian's `dataset-fashion-mnist` package puts the IDX files.
inline constexpr const char* fashion_mnist_dir = "/usr/share/datasets/fashion-mnist";
/// Per-channel statistics of the Fashion-MNIST training images (pixels in [0,1]).
inline constexpr double fashion_mnist_mean = 0.2860;
inline constexpr double fashion_mnist_std = 0.3530;
/// The synthetic set's split sizes: fixed, so that --samples picks images of one set
/// (an index names the same image in every command), as it does for real data.
inline constexpr int64_t synthetic_train_size = 2000;
inline constexpr int64_t synthetic_test_size = 2000;
/// Global seed when the user gives none; every run is reproducible by default.
inline constexpr uint64_t seed = 0;

// --- models -----------------------------------------------------------------
inline constexpr int64_t experts = 4;
inline constexpr int64_t top_k = 1;
/// MoE-CNN (AdvMoE): N = 2 channel groups of width r = 0.5 of each conv layer.
inline constexpr int64_t moe_cnn_groups = 2;
inline constexpr double moe_cnn_scale = 0.5;

// --- attacks ----------------------------------------------------------------
/// Fashion-MNIST L-inf radius used by the demo and the foundation targets.
inline constexpr double eps = 0.1;
/// PGD step size when none is given: Madry's rule step = 2.5 * eps / steps, which
/// lets the attack cross the whole ball and come back along the boundary.
inline constexpr double step_scale = 2.5;
/// Held-out samples carved from the training split for per-epoch evaluation.
inline constexpr int64_t val_samples = 1000;
inline constexpr int eval_steps = 20;
inline constexpr int train_steps = 5;
/// AdvMoE (paper 2) trains with 2 PGD steps.
inline constexpr int advmoe_train_steps = 2;
inline constexpr int restarts = 1;

// --- training ---------------------------------------------------------------
inline constexpr int64_t batch_size = 128;
inline constexpr int log_every = 50;
/// A routing share above this for one expert triggers a collapse warning.
inline constexpr double collapse_share = 0.9;

// --- certification ----------------------------------------------------------
/// The p = 2 operator norm (certify/lipschitz.cpp): block power iterations of the
/// float32 estimate of the top eigenvalue, and the slack τ of the Cholesky test
/// λ_max <= (1 + τ)·estimate. The estimate has no soundness role: a frequency the
/// test cannot verify gets its exact eigenvalue instead, so the bound is always
/// within a factor sqrt(1 + τ) of the exact circular-embedding norm.
inline constexpr int spectral_power_iterations = 24;
inline constexpr double spectral_slack = 1e-9;
/// Relative inflation of every Lipschitz constant, covering float64 rounding in
/// the products of norms and in the interval propagation (errors ~1e-13 relative).
inline constexpr double constant_inflation = 1e-9;
/// Absolute allowance subtracted from every probability / logit margin for the
/// float64 evaluation error of the network (observed errors are ~1e-13).
inline constexpr double margin_allowance = 1e-9;

/// Radius search of the bound-propagation forms (certify/search.cpp): full bound
/// passes per sample (each followed by cheap probes below it) and the relative width
/// of the bracket at which a sample is done. α-CROWN starts from CROWN's radius.
inline constexpr int search_rounds = 4;
inline constexpr double search_tol = 0.01;
/// α-CROWN: 3 full passes (demo MoE, 500 images, L∞: certified at ε = 0.1 41.0 % with
/// 3, 39.8 % with 2; the other radii of the grid within 0.2 points).
inline constexpr int alpha_rounds = 3;
/// α-CROWN (certify/bounds/specs.cpp): projected Adam steps on the lower ReLU slopes
/// of every bound row, and their step size (slopes live in [0, 1]). Measured on the
/// demo MoE: 20 steps reach most of what 100 do.
inline constexpr int alpha_steps = 20;
inline constexpr double alpha_lr = 0.25;
/// β-CROWN's Lagrange multipliers of branch and bound's splits and route constraints:
/// Adam step size (α,β-CROWN's default).
inline constexpr double beta_lr = 0.05;
/// α-CROWN on intermediate bounds (BoundOptions::intermediate_alpha_steps) optimises a
/// node's units only while units × the coefficients of one dense row over every node
/// before it stays within this (2^28: the cnn-s expert's widest node, about 1 500 units
/// × 10 000, is 2^24); larger nodes keep CROWN's bounds, whose patch rows cost far less.
inline constexpr int64_t intermediate_alpha_elements = int64_t{1} << 28;
/// Bound propagation holds at most this many row coefficients (float64) at once:
/// 2^25 = 256 MiB; rows beyond it are processed in chunks.
inline constexpr int64_t bound_chunk_elements = int64_t{1} << 25;
/// A bound pass keeps at most this many coefficients of each sample's refined units'
/// input-level rows (2^17 = 1 MiB per sample), for cheap bounds at smaller radii; a
/// node whose rows would exceed it keeps only its intervals for that sample. Per
/// sample, so that no radius depends on the other samples of a batch. (Demo MoE,
/// CROWN, 200 images: 0, 2^17, 2^18 and 2^21 give the same certified accuracies within
/// 0.5 points; larger budgets narrow more and cost more time.)
inline constexpr int64_t bound_keep_elements = int64_t{1} << 17;

// --- numerics ---------------------------------------------------------------
/// Tolerance of the batched-vs-reference MoE equivalence (float32 sums).
inline constexpr double dispatch_tolerance = 1e-5;

}  // namespace moecert::defaults
