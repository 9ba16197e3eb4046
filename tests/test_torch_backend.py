"""What is specific to the chunked `torch` backend. Its DOPD/OPD matrix against the float64 `reference`
(logits and fused-linear modes, every divergence × granularity, dtypes, reductions, gradients, odd
sizes, head transforms, large logits, non-finite values) runs in tests/test_backend_conformance.py at
the default tiles and at 3 × 7 tiles; here, the extreme tile configuration of one row × one column.
"""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_logits, random_tokens
from dopd_kernels import DOPDConfig, TorchBackend
from dopd_kernels.backends.base import PassBackend
from dopd_kernels.sources import LogitsSource
from test_backend_conformance import ODD_DOPD, Target, compare_dopd


@pytest.mark.parametrize("size", [s for s in ODD_DOPD if s != "V=61,K=V"])  # K=V: 7 × 5 already
@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_odd_sizes_one_by_one_tiles(renorm, size):
    """Tiles of 1 row × 1 column: every running max, log-sum-exp and top-K merges across tiles of a
    single logit, and every row chunk is one row."""
    n, v, k = ODD_DOPD[size]
    zs, zt, zp = correlated_logits(n, v, noise=(0.8, 1.5))
    y = random_tokens(n, v, mask_frac=0.1)
    one_by_one = Target(TorchBackend(row_chunk=1, vocab_chunk=1))
    compare_dopd(one_by_one, zs, zt, zp, y, DOPDConfig(top_k=k, topk_renorm=renorm))


@pytest.mark.parametrize("tiles", [(1, 1), (3, 7), (1024, 8192)])
def test_stats_pass_sums_the_tail_bucket_in_its_sweep(tiles):
    """`Stats.rest_lse` (log Σ_{v≠y} e^{z_v}) from the stats sweep against float64, on rows where the
    sampled token holds nearly all the mass (z_y ~40 above the rest: lse + log(1 − p_y) would cancel to
    -inf in fp32) and on ordinary rows, with a padded vocabulary; the same as the composed default
    (`PassBackend.rest_logsumexp`) the other backends get."""
    n, v, valid = 13, 61, 57
    zs, zt = correlated_logits(n, v, n_streams=2)
    y = random_tokens(n, valid, mask_frac=0.0)
    zs[: n // 2].scatter_add_(1, y[: n // 2, None], torch.full((n // 2, 1), 60.0))
    sources = [LogitsSource(z, temperature=1.3, valid_vocab=valid) for z in (zs, zt)]
    rows = torch.arange(n)
    passes = TorchBackend(*tiles)
    stats = passes.stats_pass(sources, rows, y, (), 1, rest_streams=(0, 1))
    for j, z in enumerate((zs, zt)):
        z64 = z.to(torch.float64)[:, :valid] / 1.3
        want = z64.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)
        assert stats.rest_lse[j].dtype == torch.float64
        torch.testing.assert_close(stats.rest_lse[j], want, rtol=0, atol=2e-5)
        torch.testing.assert_close(stats.rest_lse[j], PassBackend.rest_logsumexp(passes, sources[j], rows, y[:, None]))
    assert bool((stats.lse[0][: n // 2] - stats.rest_lse[0][: n // 2] > 20).all())  # 1 − p_y < 2^-28: rounds to 0 in fp32
