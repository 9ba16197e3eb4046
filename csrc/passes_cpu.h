// The passes of dopd_kernels/engine.py on CPU tensors (see kernels_cpu.cpp), as bound by bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

namespace dopd {

// One stream: logits x [N, V] (any float dtype), or hidden x [N, H] with an lm_head weight w [V, H]
// and optional bias b [V] (any strides). Logits are x / τ; in fused-linear mode the output-head
// transform comes first: z = h·Wᵀ + b, z ← scale·z, z ← softcap·tanh(z / softcap) when softcap > 0
// (dopd_kernels.sources.LinearSource). Columns at or past `valid_vocab` are padding.
struct Stream {
  at::Tensor x;
  std::optional<at::Tensor> w, b;
  double inv_tau;
  int64_t valid_vocab;
  double scale = 1.0;
  double softcap = 0.0;  // 0: none

  bool linear() const { return w.has_value() && w->defined(); }
  // float64 inputs compute in float64, every other dtype in float32.
  at::ScalarType acc() const { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
};

// Tile sizes: rows per chunk and vocabulary columns per block. A fused-linear pass holds at most
// two [rows, block] logit tiles plus, in the gradient pass, a [rows, H] dH accumulator.
struct Tiling {
  int64_t row_chunk;
  int64_t vocab_chunk;
};

// Log-sum-exp of the scaled logits of `rows` as (max [n], log Σ exp(z − max) [n]) in the compute
// dtype, for the caller to add in float64 (-inf, 0 for a row without finite logits), (k > 0) their
// top-k column indices [n, k], best first (ties to the smaller column), and, with `tail_tokens` [n],
// the tail bucket of each row's token (every valid column but that one; a token outside the valid
// vocabulary or < 0 leaves nothing out) as (max, log-sum) in the same sweep ([0] tensors without). With
// `shares` (fused-linear streams), also each vocabulary tile's log-share of the row's softmax mass,
// log Σ_{v∈T} p_v [n, tiles] (float32, tiles of `tiling`; [0, 0] without): full_pass's `shares_s` / `shares_t`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_pass(
    const Stream& s, const at::Tensor& rows, int64_t k, Tiling tiling, const std::optional<at::Tensor>& tail_tokens,
    bool shares);

// Log-sum-exp of the scaled logits of `rows` over the valid columns not in the row's `cols` [n, k]
// (entries < 0 ignored), as (max, log-sum) like stats_pass: a tail bucket's log-mass, summed directly.
std::tuple<at::Tensor, at::Tensor> rest_lse_pass(const Stream& s, const at::Tensor& rows, const at::Tensor& cols,
                                                 Tiling tiling);

// Log-sum-exps passed to the passes below (lse_s, lse_t) are [2, n]: the rows (hi, lo) of
// dopd_kernels.engine.split_lse, so that log p = (z − hi) − lo keeps fp32 precision at large logits.

// Full-vocabulary rows (kind: 0 reverse KL, 1 forward KL, 2 JS) in the fewest sweeps: Σ_v of the divergence
// per row [n] (float64) and the gradient constant c [n] (reverse KL the KL itself, JS β·KL(p‖m), forward KL 0);
// without lse_s / lse_t (both absent) also the log-sum-exps, returned as parts [4, n] in the compute dtype
// (max_s, log Σ exp(z_s − max_s), max_t, log Σ_t) for the caller to add in float64 (undefined when given);
// with `scale` also the gradient, into the buffers of grad_pass. A fused-linear row that fits one tile
// (valid_vocab <= vocab_chunk) takes one sweep, and in logits mode each row runs its phases in one thread;
// wider fused-linear rows take a sweep for the log-sum-exps and (reverse / forward KL) the value online, a
// value sweep (JS, or log-sum-exps given) and a gradient sweep. No buffer has a full vocabulary axis beyond
// one tile. With `skip`, as grad_pass; besides, the gradient sweep of wide rows leaves out whole tiles (no
// recomputation, no contraction) whose gradient the per-tile statistics of the sweep before it (the online
// sweep, or the value sweep) bound as negligible, under the same guarantee (kernels_cpu.cpp, TileSkips).
// Without `scale`, `skip` plans instead the whole tiles each wide fused-linear row may skip in a later grad_pass
// (a deferred gradient, of any per-row scale): returned as tile_keep [n, tiles] (bool) and tile_spent [n] (float64,
// the bound mass skipped, of the unscaled gradient), None where nothing was planned (rows that fit one tile,
// logits mode, a dtype that never skips). A JS row wider than one tile also leaves out of its value sweep the tiles
// its log-sum-exp sweep bounds as negligible (value within δ relative); a JS row with given log-sum-exps does the
// same from `shares_s` / `shares_t` [n, tiles] (stats_pass's log-shares of both streams, same tiling) when given.
// The last result is grad_pass's (entries, skipped, unformed) and the value sweeps' unprojected entries.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::tuple<int64_t, int64_t, int64_t, int64_t>>
full_pass(
    const Stream& s, const Stream& t, const at::Tensor& rows, const std::optional<at::Tensor>& lse_s,
    const std::optional<at::Tensor>& lse_t, int64_t kind, double beta, const std::optional<at::Tensor>& scale,
    Tiling tiling, const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& dh,
    const std::optional<at::Tensor>& dw, const std::optional<at::Tensor>& db, bool skip,
    const std::optional<at::Tensor>& shares_s, const std::optional<at::Tensor>& shares_t);

// Gradient of Σ_rows scale_r · D_r with respect to the unscaled student logits (scale includes 1/τ;
// in fused-linear mode the raw logits h·Wᵀ + b, through the head's jacobian).
// With a target `t`: full-vocabulary term (lse_t, c). Without: few-column term, p·dense on every
// column plus `sparse` [n, K] at `cols` — added, or with `overwrite` written as the columns' whole
// gradient (RowTerm.explicit). p·dense is formed as exp(log p)·dense in the compute dtype: a coefficient
// too large for that (forward KL's tail) comes as ±1 with its log-magnitude taken off lse_s
// (RowTerm.dense_normalizer). The gradient goes to `grad_logits` [N, V] (logits mode, written once,
// rows disjoint from earlier calls) or is contracted into dh [N, H], dw [V, H], db [V]. With `skip` (fused-linear
// mode, dh or dw given, a float32 / bfloat16 / float16 student) each row leaves out the contractions of its
// provably negligible 256-column blocks (dopd_kernels/skipping.py; db stays exact), and, given full_pass's planned
// tile_keep / tile_spent (full-vocabulary rows, the same tiling), the tiles it planned to skip whole: neither
// recomputed nor contracted. Returns the gradient entries offered to the contractions, those skipped and those
// skipped before their logits were recomputed, (entries, skipped, unformed): zeros when nothing could be skipped.
std::tuple<int64_t, int64_t, int64_t> grad_pass(const Stream& s, const std::optional<Stream>& t, const at::Tensor& rows,
                                                const at::Tensor& lse_s, const std::optional<at::Tensor>& lse_t,
                                                const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& dense,
                                                const std::optional<at::Tensor>& cols, const std::optional<at::Tensor>& sparse,
                                                bool overwrite, const at::Tensor& scale, int64_t kind, double beta, Tiling tiling,
                                                const std::optional<at::Tensor>& grad_logits,
                                                const std::optional<at::Tensor>& dh, const std::optional<at::Tensor>& dw,
                                                const std::optional<at::Tensor>& db, bool skip,
                                                const std::optional<at::Tensor>& tile_keep,
                                                const std::optional<at::Tensor>& tile_spent);

// Fused-linear gradient of a few columns per row: `coef` [n, K] is the gradient with respect to the
// transformed logits (before 1/τ) at (rows[i], cols[i, q]); times the head's jacobian it is contracted
// into dh += coef·W[cols], dw[cols] += coef·H, db[cols] += coef without gathering [n, K, H] weight
// rows (column-sorted, so dW rows have one writer). dw and db may be absent (a frozen head).
void sparse_grad(const Stream& s, const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& coef,
                 const std::optional<at::Tensor>& dh, const std::optional<at::Tensor>& dw,
                 const std::optional<at::Tensor>& db);

// Scaled logits [n, K] of `rows` at columns `cols` [n, K] (K dot products per row in fused-linear
// mode, no [n, K, H] gather, then the head transform); -inf at padding columns.
at::Tensor gather(const Stream& s, const at::Tensor& rows, const at::Tensor& cols);

// Matmul FLOPs (2·m·n·k per product) of the fused-linear tile GEMMs, contractions and K-column dot products
// the passes above performed since the last reset, in this process (thread-safe; always counted).
int64_t matmul_flops();
void reset_matmul_flops();

// DOPD regime codes (int8) of valid tokens from float64 statistics; -1 where not valid.
at::Tensor assign_regimes(const at::Tensor& adv, const at::Tensor& q_t, const at::Tensor& q_p,
                          const at::Tensor& valid, double adv_bar, double qt_bar, double qp_bar);

}  // namespace dopd
