"""Input checks run before any backend touches the data.

Every check raises `TypeError` (wrong kind or dtype) or `ValueError` (wrong shape or value) naming
the argument and what was expected. Checks that read tensor values (token range, finiteness) read
them in bounded row chunks so they never allocate an `[N, V]` temporary.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .config import Thresholds

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_FINITE_CHECK_ROWS = 256


def check_float_tensor(name: str, t, ndims: Sequence[int], shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype bfloat16, float16, float32 or float64, got {t.dtype}")
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")


def check_same_device(named: dict) -> None:
    devices = {n: t.device for n, t in named.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n} is on {d} but {first_name} is on {first}; all inputs must share a device")


def check_tokens(tokens, token_shape: torch.Size, vocab: int, ignore_index: int, logits_name: str) -> None:
    """`tokens` must be an integer tensor shaped like `token_shape`, each entry in [0, vocab) or ignore_index."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of shape {list(token_shape)}, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must have an integer dtype (int64 or int32), got {tokens.dtype}")
    if tokens.shape != token_shape:
        raise ValueError(
            f"tokens must have shape {list(token_shape)} (the leading dims of {logits_name}), got {list(tokens.shape)}"
        )
    valid = tokens != ignore_index
    bad = valid & ((tokens < 0) | (tokens >= vocab))
    if bool(bad.any()):
        first = int(tokens[bad].flatten()[0])
        raise ValueError(
            f"tokens must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )


def check_valid_vocab(valid_vocab: Optional[int], vocab: int) -> int:
    """The effective vocabulary size: `valid_vocab` (<= the logits' vocabulary) or the whole of it."""
    if valid_vocab is None:
        return vocab
    if valid_vocab > vocab:
        raise ValueError(f"config.valid_vocab={valid_vocab} exceeds the vocabulary size {vocab} of the inputs")
    return valid_vocab


def check_finite_logits(name: str, logits: torch.Tensor) -> None:
    """Raise if any logit is NaN or +inf (-inf is allowed: it marks an impossible token)."""
    flat = logits.reshape(-1, logits.shape[-1])
    for start in range(0, flat.shape[0], _FINITE_CHECK_ROWS):
        chunk = flat[start : start + _FINITE_CHECK_ROWS]
        if bool(torch.isnan(chunk).any()) or bool(torch.isposinf(chunk).any()):
            raise ValueError(f"{name} contains NaN or +inf values (rows {start}..{start + chunk.shape[0] - 1})")


def check_seq_mean(reduction: str, tokens: torch.Tensor) -> None:
    if reduction == "seq_mean" and tokens.dim() != 2:
        raise ValueError(f'reduction="seq_mean" needs tokens shaped [B, T], got {list(tokens.shape)}')


def check_normalizer(normalizer, reduction: str):
    """`normalizer` divides the summed loss; only meaningful for "mean" and "sum" reductions."""
    if normalizer is None:
        return None
    if reduction not in ("mean", "sum"):
        raise ValueError(f'normalizer= is only accepted with reduction "mean" or "sum", got reduction={reduction!r}')
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got a tensor of shape {list(normalizer.shape)}")
        value = float(normalizer)
    elif isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
        value = float(normalizer)
    else:
        raise TypeError(f"normalizer must be a positive number or 0-d tensor, got {type(normalizer).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normalizer must be positive and finite, got {value}")
    return value


def coerce_thresholds(thresholds) -> Optional[Thresholds]:
    """Accept a `Thresholds`, a 3-sequence of numbers or a tensor of shape [3] (Ā, q̄_T, q̄_P)."""
    if thresholds is None:
        return None
    if isinstance(thresholds, torch.Tensor):
        if thresholds.shape != (3,):
            raise ValueError(f"thresholds tensor must have shape [3] (adv_gap, q_teacher, q_priv_student), got {list(thresholds.shape)}")
        values = [float(v) for v in thresholds]
    else:
        try:
            values = [float(v) for v in thresholds]
        except TypeError:
            raise TypeError(f"thresholds must be a Thresholds, a 3-tuple or a [3] tensor, got {type(thresholds).__name__}") from None
        if len(values) != 3:
            raise ValueError(f"thresholds must have 3 entries (adv_gap, q_teacher, q_priv_student), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"thresholds must be finite, got {values}")
    return Thresholds(*(torch.tensor(v, dtype=torch.float64) for v in values))


def check_linear(prefix: str, hidden, weight, bias, n_rows_shape: Optional[torch.Size]) -> None:
    """hidden [N, H] or [B, T, H]; weight [V, H]; bias [V] or None."""
    check_float_tensor(f"{prefix}_hidden", hidden, (2, 3), "[N, H] or [B, T, H]")
    check_float_tensor(f"{prefix}_weight", weight, (2,), "[V, H]")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight must have shape [V, {hidden.shape[-1]}] to match {prefix}_hidden's last dim, got {list(weight.shape)}"
        )
    if bias is not None:
        check_float_tensor(f"{prefix}_bias", bias, (1,), "[V]")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}_bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    if n_rows_shape is not None and hidden.shape[:-1] != n_rows_shape:
        raise ValueError(
            f"{prefix}_hidden must have leading shape {list(n_rows_shape)} like student_hidden, got {list(hidden.shape[:-1])}"
        )
