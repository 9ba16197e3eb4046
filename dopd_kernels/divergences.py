"""Divergences between two distributions given as log-probabilities over the last dimension.

Conventions: `0 · log 0 = 0` (a bucket the first distribution gives no mass contributes nothing,
and its gradient is 0, not NaN); a NaN log-probability is not "no mass": it propagates, so a
non-finite input shows in the value instead of vanishing behind a finite one; the JS mixture is formed in log space,
`log m = logaddexp(log β + log p, log(1−β) + log q)`, never as the log of a rounded sum.
"""

from __future__ import annotations

import math

import torch


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ a (log a − log b) over the last dim, with 0 · log 0 = 0."""
    has_mass = log_a != float("-inf")  # NaN counts as mass: it must reach the value
    # Where a has no mass the term is 0; the inputs are replaced first so no NaN flows backward.
    la = torch.where(has_mass, log_a, torch.zeros_like(log_a))
    lb = torch.where(has_mass, log_b, torch.zeros_like(log_b))
    return torch.where(has_mass, la.exp() * (la - lb), torch.zeros_like(la)).sum(-1)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log(β p + (1−β) q), computed in log space; -inf where both are -inf, with a zero (not NaN)
    gradient there: logaddexp's own gradient at (-inf, -inf) is NaN, and autograd (the reference)
    would spread it over the row through the softmax of padding columns."""
    a, b = log_p + math.log(beta), log_q + math.log1p(-beta)
    empty = (a == float("-inf")) & (b == float("-inf"))
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    mixed = torch.logaddexp(torch.where(empty, zero, a), torch.where(empty, zero, b))
    return mixed.masked_fill(empty, float("-inf"))


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, js_beta: float = 0.5) -> torch.Tensor:
    """Divergence of student `p` from target `q` over the last dim.

    kind: "reverse_kl" KL(p‖q), "forward_kl" KL(q‖p), or "js" β KL(p‖m) + (1−β) KL(q‖m) with
    m = β p + (1−β) q (β = `js_beta`, 0.5 is the symmetric JS, bounded by log 2).
    """
    if kind == "reverse_kl":
        return kl(log_p, log_q)
    if kind == "forward_kl":
        return kl(log_q, log_p)
    if kind == "js":
        log_m = log_mixture(log_p, log_q, js_beta)
        return js_beta * kl(log_p, log_m) + (1.0 - js_beta) * kl(log_q, log_m)
    raise ValueError(f"unknown divergence {kind!r}")



def js_bound(beta: float) -> float:
    """The largest value of JS_β: the entropy −β log β − (1−β) log(1−β) of the mixture weights
    (log 2 for β = ½), reached by distributions with disjoint supports."""
    return -beta * math.log(beta) - (1.0 - beta) * math.log1p(-beta)


def clamp_js(value: torch.Tensor, beta: float, out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A whole row's JS_β value held to `js_bound(β)`, rounded down to the largest `out_dtype` number not
    above it (fp32 log 2 rounds up): summation rounding at large logits could push a (near-)disjoint
    row just past the bound. The gradient passes through unchanged (straight-through), so the float64
    reference keeps its exact autograd."""
    bound = torch.tensor(js_bound(beta), dtype=torch.float64)
    rounded = bound.to(out_dtype)
    if rounded.double() > bound:
        rounded = torch.nextafter(rounded, torch.zeros_like(rounded))
    return value - (value - float(rounded)).clamp(min=0).detach()
