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


def check_tokens(tokens, token_shape: torch.Size, logits_name: str) -> None:
    """`tokens` must be an integer tensor shaped like `token_shape` (its values: `check_token_range`)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of shape {list(token_shape)}, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must have an integer dtype (int64 or int32), got {tokens.dtype}")
    if tokens.shape != token_shape:
        raise ValueError(
            f"tokens must have shape {list(token_shape)} (the leading dims of {logits_name}), got {list(tokens.shape)}"
        )


def check_token_range(tokens: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Each entry of `tokens` in [0, vocab) or equal to ignore_index (reads the tokens)."""
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


def check_finite_logits(name: str, logits: torch.Tensor, valid_vocab: Optional[int] = None,
                        whole_rows: bool = True) -> None:
    """Raise (naming the first bad row of the flattened `[N, V]` view) if a row holds a NaN or +inf
    logit, or (when the tensor holds whole rows, `whole_rows`: not a vocabulary shard) has no finite
    logit in its valid vocabulary `[0, valid_vocab)` (its softmax is undefined). A -inf logit alone is
    allowed: it marks an impossible token (padding)."""
    flat = logits.reshape(-1, logits.shape[-1])
    v = flat.shape[1] if valid_vocab is None else valid_vocab
    for start in range(0, flat.shape[0], _FINITE_CHECK_ROWS):
        chunk = flat[start : start + _FINITE_CHECK_ROWS]
        bad = torch.isnan(chunk).any(1) | torch.isposinf(chunk).any(1)
        if bool(bad.any()):
            raise ValueError(f"{name} contains NaN or +inf values (row {start + int(bad.nonzero()[0])} of the "
                             f"flattened [N, V] logits)")
        empty = torch.isneginf(chunk[:, :v]).all(1)
        if whole_rows and bool(empty.any()):
            raise ValueError(f"{name} has a row whose logits are all -inf over the valid vocabulary (row "
                             f"{start + int(empty.nonzero()[0])} of the flattened [N, V] logits): no distribution")


def check_finite_rows(name: str, t: torch.Tensor) -> None:
    """Raise, naming the first bad row, if `t` (hidden states, a weight or a bias) holds NaN or ±inf."""
    flat = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(-1, 1)
    for start in range(0, flat.shape[0], _FINITE_CHECK_ROWS):
        bad = ~torch.isfinite(flat[start : start + _FINITE_CHECK_ROWS]).all(1)
        if bool(bad.any()):
            raise ValueError(f"{name} contains NaN or infinite values (row {start + int(bad.nonzero()[0])})")


def check_config(config, cls):
    """`config` if it is a `cls` (DOPDConfig/OPDConfig), `cls()` for None; TypeError otherwise."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__} (or None for the defaults), got {type(config).__name__}")
    return config


def check_seq_mean(reduction: str, tokens: torch.Tensor) -> None:
    if reduction == "seq_mean" and tokens.dim() != 2:
        raise ValueError(f'reduction="seq_mean" needs tokens shaped [B, T], got {list(tokens.shape)}')


def check_normalizer(normalizer, reduction: str) -> Optional[torch.Tensor]:
    """`normalizer` divides the summed loss; only meaningful for "mean" and "sum" reductions. Returns it
    as a 0-d tensor (a number becomes a float64 one, its value checked here); a tensor's value is
    checked by `normalizer_value`, which reads it."""
    if normalizer is None:
        return None
    if reduction not in ("mean", "sum"):
        raise ValueError(f'normalizer= is only accepted with reduction "mean" or "sum", got reduction={reduction!r}')
    if isinstance(normalizer, torch.Tensor):
        if normalizer.requires_grad:
            raise ValueError("normalizer must not require grad: it is a token count, not a differentiable quantity "
                             "(pass normalizer.detach() or a number)")
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got a tensor of shape {list(normalizer.shape)}")
        return normalizer.reshape(())
    if isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
        _check_normalizer_value(float(normalizer))
        return torch.tensor(float(normalizer), dtype=torch.float64)
    raise TypeError(f"normalizer must be a positive number or 0-d tensor, got {type(normalizer).__name__}")


def normalizer_value(normalizer: Optional[torch.Tensor]) -> Optional[float]:
    """The value of a normalizer `check_normalizer` returned (reads it: positive and finite)."""
    if normalizer is None:
        return None
    value = float(normalizer)
    _check_normalizer_value(value)
    return value


def _check_normalizer_value(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normalizer must be positive and finite, got {value}")


def thresholds_tensor(thresholds) -> Optional[torch.Tensor]:
    """A `thresholds=` argument (a `Thresholds`, a 3-sequence of numbers or of 1-element tensors, or a
    tensor of shape [3]: Ā, q̄_T, q̄_P) as a [3] float64 CPU tensor; its values are checked by
    `check_thresholds`, which reads them."""
    if thresholds is None:
        return None
    if isinstance(thresholds, torch.Tensor):
        if thresholds.shape != (3,):
            raise ValueError(f"thresholds tensor must have shape [3] (adv_gap, q_teacher, q_priv_student), got {list(thresholds.shape)}")
        return thresholds.detach().to("cpu", torch.float64)
    if isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__len__"):
        raise TypeError(f"thresholds must be a Thresholds, a 3-tuple of numbers or a [3] tensor, got {type(thresholds).__name__}")
    values = []
    for v in thresholds:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            values.append(v.detach().reshape(()).to("cpu", torch.float64))
        elif isinstance(v, (int, float)):
            values.append(torch.tensor(float(v), dtype=torch.float64))
        else:
            raise TypeError(f"thresholds must be a Thresholds, a 3-tuple or a [3] tensor, got {type(thresholds).__name__} "
                            f"holding a {type(v).__name__}")
    if len(values) != 3:
        raise ValueError(f"thresholds must have 3 entries (adv_gap, q_teacher, q_priv_student), got {len(values)}")
    return torch.stack(values)


def check_thresholds(thresholds: Optional[torch.Tensor]) -> Optional[Thresholds]:
    """The `Thresholds` of a [3] tensor from `thresholds_tensor` (reads it: the values must be finite)."""
    if thresholds is None:
        return None
    if not bool(torch.isfinite(thresholds).all()):
        raise ValueError(f"thresholds must be finite, got {thresholds.tolist()}")
    return Thresholds(*thresholds.unbind())


def coerce_thresholds(thresholds) -> Optional[Thresholds]:
    """Accept a `Thresholds`, a 3-sequence of numbers or a tensor of shape [3] (Ā, q̄_T, q̄_P)."""
    return check_thresholds(thresholds_tensor(thresholds))


def check_linear(prefix: str, hidden, weight, bias, n_rows_shape: Optional[torch.Size]) -> None:
    """hidden [N, H] or [B, T, H]; weight [V, H]; bias [V] or None; one dtype within the stream."""
    check_float_tensor(f"{prefix}_hidden", hidden, (2, 3), "[N, H] or [B, T, H]")
    check_float_tensor(f"{prefix}_weight", weight, (2,), "[V, H]")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight must have shape [V, {hidden.shape[-1]}] to match {prefix}_hidden's last dim, got {list(weight.shape)}"
        )
    if hidden.shape[-1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"{prefix}_hidden and {prefix}_weight need a hidden size H >= 1 and a vocabulary V >= 1, "
                         f"got H={hidden.shape[-1]}, V={weight.shape[0]}")
    if bias is not None:
        check_float_tensor(f"{prefix}_bias", bias, (1,), "[V]")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}_bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    # One stream is one matmul: its operands share a dtype (streams may differ from each other).
    for name, t in ((f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {prefix}_hidden has {hidden.dtype}; the hidden states, "
                            f"weight and bias of one stream must share a dtype (cast one of them)")
    if n_rows_shape is not None and hidden.shape[:-1] != n_rows_shape:
        raise ValueError(
            f"{prefix}_hidden must have leading shape {list(n_rows_shape)} like student_hidden, got {list(hidden.shape[:-1])}"
        )


def check_head_transform(prefix: str, scale, softcap) -> None:
    """An `LMHead`'s transform: `scale` a finite non-zero real, `softcap` None or a finite positive real."""
    for name, value in (("scale", scale), ("softcap", softcap)):
        if name == "softcap" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{prefix}_weight: LMHead.{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{prefix}_weight: LMHead.{name} must be finite, got {value}")
    if scale == 0:
        raise ValueError(f"{prefix}_weight: LMHead.scale must be non-zero (it multiplies the logits), got {scale}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{prefix}_weight: LMHead.softcap must be > 0 (the cap c of c·tanh(z/c)), got {softcap}")


def common_vocab(heads: Sequence[tuple]) -> int:
    """The vocabulary the streams share, from `heads` = [(prefix, rows, vocab_size)], student first.

    Rule: a stream's real vocabulary is its declared `vocab_size` (an `LMHead`'s), else its number of
    rows; the common vocabulary is the student's real vocabulary. Rows of any stream at or past it are
    padding: excluded from every softmax (the caller slices them off). A stream that declares a
    different real vocabulary, or has fewer rows than the common one, uses another tokenizer and is
    refused with both sizes named.
    """
    prefix0, rows0, declared0 = heads[0]
    for prefix, rows, declared in heads:
        if declared is None:
            continue
        if isinstance(declared, bool) or not isinstance(declared, int):
            raise TypeError(f"{prefix}_weight: LMHead.vocab_size must be an int or None, got {type(declared).__name__}")
        if not 1 <= declared <= rows:
            raise ValueError(f"{prefix}_weight: LMHead.vocab_size must be in [1, {rows}] (the head's rows), got {declared}")
    vocab = rows0 if declared0 is None else declared0
    # When the student's vocabulary comes from its row count, padding rows of its own may be the cause.
    hint = (f" (if {prefix0}_weight has padding rows, declare its real vocabulary: LMHead(weight, vocab_size=...))"
            if declared0 is None else "")
    for prefix, rows, declared in heads[1:]:
        if declared is not None and declared != vocab:
            raise ValueError(f"{prefix}_weight has a vocabulary of {declared} tokens but {prefix0}_weight has {vocab}: "
                             f"the streams must share one tokenizer{hint}")
        if rows < vocab:
            raise ValueError(f"{prefix}_weight has {rows} rows, fewer than the {vocab} tokens of {prefix0}_weight's "
                             f"vocabulary: the streams must share one tokenizer{hint}")
    return vocab
