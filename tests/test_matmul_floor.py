"""Matmul FLOPs counted, not assumed (issue 14 point 5): the `torch` backend's fused-linear passes under
`torch.utils.flop_counter.FlopCounterMode`, against the matmul floor the README defines ("How the
computation is organised").

One projection is 2·n·V·H FLOPs (the logits of n rows of one stream). The floor: one projection per
stream per valid row; rows whose gradient touches the whole vocabulary add the contractions dH = G·W and
dW += Gᵀ·H (2 projections' worth) and, only where routing forces it (DOPD's HT rows), a recomputation of
the two streams their term reads. Few-column terms (top-K, sampled token) add O(N·K·H): their gathers
and sparse contractions, allowed for as `SPARSE_ALLOWANCE` gathers' worth. The torch backend reaches the
floor through `full_pass` (one sweep where a row's vocabulary fits one tile, eager gradients); a plan not at the floor
yet is a strict xfail, which flips to a failure the day the plan reaches it.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import leaf, linear_streams, random_tokens
from dopd_kernels import DOPDConfig, Regime, TorchBackend, fused_linear_dopd_loss, fused_linear_opd_loss

N, H, V, K = 48, 16, 300, 8
SPARSE_ALLOWANCE = 12  # gathers of 2·K·H FLOPs per row: student/target logits, head jacobians, dH, dW
BACKEND = TorchBackend(row_chunk=16, vocab_chunk=512)  # several row chunks; a row fits one tile (one sweep)
NOT_AT_FLOOR = pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "issue 14, open: sampled forward KL / JS sum each stream's tail bucket in a sweep of its own and recompute "
    "the student for the gradient; the floor needs the tails and the gradient in the statistics' sweep"))


def proj(n: int) -> int:
    return 2 * n * V * H


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def opd_call(granularity: str):
    t = linear_streams(N, H, V)
    y = random_tokens(N, V, mask_frac=0.0)
    h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])

    def step():
        out = fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], y, divergence="js",
                                    granularity=granularity, top_k=K, backend=BACKEND)
        out.loss.backward()

    return step


@pytest.mark.parametrize("granularity", [
    "topk",
    "full",
    pytest.param("sampled", marks=NOT_AT_FLOOR),
])
def test_opd_matmuls_at_the_floor(granularity):
    # Two streams' projections; full-vocabulary and sampled rows (the sampled JS gradient has a dense part)
    # add the two contractions.
    floor = 2 * proj(N) + (2 * proj(N) if granularity in ("full", "sampled") else 0)
    flops = counted(opd_call(granularity))
    assert flops >= 2 * proj(N), f"counted {flops} FLOPs: fewer than the two forward projections (counter broken?)"
    assert flops <= floor + SPARSE_ALLOWANCE * 2 * N * K * H, f"{flops / floor:.2f}x the floor"


@pytest.mark.parametrize("ht_rows", ["none", "some"])
def test_dopd_matmuls_at_the_floor(ht_rows):
    t = linear_streams(N, H, V)
    y = random_tokens(N, V, mask_frac=0.0)
    h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])
    # Thresholds that send no row (Ā huge: every gap is low) or some rows (Ā = 0) to the high-gap regimes.
    thresholds = (1e30, 0.0, 0.0) if ht_rows == "none" else (0.0, 0.0, 0.0)
    out = {}

    def step():
        out["r"] = fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                          config=DOPDConfig(top_k=K), thresholds=thresholds, backend=BACKEND)
        out["r"].loss.backward()

    flops = counted(step)
    n_ht = int((out["r"].regime == int(Regime.HT)).sum())
    assert (n_ht > 0) == (ht_rows == "some"), f"{n_ht} HT rows"
    # Three streams' projections; HT rows recompute student and teacher, then the two contractions.
    floor = 3 * proj(N) + 4 * proj(n_ht)
    assert flops >= 3 * proj(N)
    assert flops <= floor + SPARSE_ALLOWANCE * 2 * N * K * H, f"{flops / floor:.2f}x the floor ({n_ht} HT rows)"
