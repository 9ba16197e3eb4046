"""Triton kernels of the `triton` backend (DESIGN.md section 4); imported lazily, never at package
import, so `TRITON_INTERPRET=1` can still be set before the kernels are decorated.

    tiles.py       shared @triton.jit helpers: a program's block of rows, a logit tile (logits load
                   or H·Wᵀ by tl.dot), the online log-sum-exp update, the packed sort keys of the
                   running top-K
    stats.py       stats pass: up to three streams at once, log-sum-exp, sampled logit, top-K
    tail.py        log-sum-exp of a tail bucket (the columns outside a top-K support or the sampled token)
    sparse.py      fused-linear top-K / sampled columns: K dot products per row, sparse dH / dW / db
    divergence.py  full-vocabulary value pass and the gradient pass (full rows, dense part of
                   sampled / tail-bucket rows), with the dH / dW / db contraction in fused-linear mode
"""
