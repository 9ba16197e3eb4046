"""What is specific to the chunked `torch` backend. Its DOPD/OPD matrix against the float64 `reference`
(logits and fused-linear modes, every divergence × granularity, dtypes, reductions, gradients, odd
sizes, head transforms, large logits, non-finite values) runs in tests/test_backend_conformance.py at
the default tiles and at 3 × 7 tiles; here, the extreme tile configuration of one row × one column.
"""

from __future__ import annotations

import pytest

from conftest import correlated_logits, random_tokens
from dopd_kernels import DOPDConfig, TorchBackend
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
