"""Configuration and result types shared by every backend.

`DOPDConfig` holds the static settings of the DOPD loss (DESIGN.md section 1), `OPDConfig` those of a
vanilla on-policy distillation loss (section 2). Both validate themselves on construction so a bad
setting fails before any tensor is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch

from .codes import DIVERGENCES, Divergence, Regime  # noqa: F401  (re-exported: the one definition)

GRANULARITIES = ("sampled", "topk", "full")
REDUCTIONS = ("mean", "seq_mean", "sum", "none")
TOPK_SOURCES = ("student", "target")


class Thresholds(NamedTuple):
    """Batch routing thresholds: trimmed means over the valid tokens (0-d float64 tensors).

    `adv_gap` is Ā, `q_teacher` is q̄_T, `q_priv_student` is q̄_P. A caller may pass its own
    (for example computed over a larger batch) through the `thresholds=` argument, as a
    `Thresholds`, a 3-tuple of floats, or a tensor of shape [3].
    """

    adv_gap: torch.Tensor
    q_teacher: torch.Tensor
    q_priv_student: torch.Tensor


@dataclass
class DOPDOutput:
    """Result of a DOPD loss call.

    Shapes use `*` for the token shape of the input (`[N]` or `[B, T]`).

    loss:           the reduced loss (0-d), or `[*]` when `reduction="none"`; carries the gradient.
    per_token_loss: `[*]` detached weighted loss of every token (0 at ignored positions).
    regime:         `[*]` int8 `Regime` code of every token (-1 at ignored positions).
    adv_gap:        `[*]` detached |log π_T(y) − log π_P(y)| (0 at ignored positions).
    q_teacher:      `[*]` detached π_T(y) (0 at ignored positions).
    q_priv_student: `[*]` detached π_P(y) (0 at ignored positions).
    thresholds:     the `Thresholds` used for routing.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    regime: torch.Tensor
    adv_gap: torch.Tensor
    q_teacher: torch.Tensor
    q_priv_student: torch.Tensor
    thresholds: Thresholds

    def regime_fractions(self) -> dict:
        """Fraction of valid tokens in each regime, e.g. `{"LH": 0.41, "LL": 0.32, ...}`."""
        valid = self.regime >= 0
        n = int(valid.sum())
        return {r.name: (float((self.regime == r).sum()) / n if n else 0.0) for r in Regime if r >= 0}


class OPDOutput(NamedTuple):
    """Result of a vanilla OPD loss call: `loss` (reduced, carries the gradient) and the detached
    `per_token_loss` shaped like the tokens (0 at ignored positions)."""

    loss: torch.Tensor
    per_token_loss: torch.Tensor


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_real(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")


def _check_int(name: str, value, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


@dataclass(frozen=True)
class OPDConfig:
    """Settings of a vanilla on-policy distillation loss (DESIGN.md section 2).

    divergence:  "reverse_kl" Σ p(log p − log q), "forward_kl" Σ q(log q − log p), or "js"
                 (generalized Jensen-Shannon with student weight `js_beta`).
    granularity: "full" (whole vocabulary), "topk" (K tokens, see `topk_from`/`topk_renorm`) or
                 "sampled" (the sampled token only; see DESIGN.md section 2).
    top_k:       K of the top-K support; clipped to the (valid) vocabulary size. Logits tied at the
                 K-th place enter lower column first (`topk.select_top_k`).
    js_beta:     student weight β of the JS mixture m = β p + (1−β) q, in (0, 1).
    temperature: both distributions are softmax(logits / temperature).
    topk_from:   "student" or "target": whose K most probable tokens form the support.
    topk_renorm: True renormalizes both distributions over the K tokens; False keeps the K
                 probabilities and adds one tail bucket holding the remaining mass.
    ignore_index: token value marking masked positions.
    reduction:   "mean" (over valid tokens), "seq_mean" (per sequence, then over sequences with at
                 least one valid token; needs [B, T] tokens), "sum" or "none" (per token).
    valid_vocab: columns at or past this index are padding and excluded (None: all columns).
    """

    divergence: str = "reverse_kl"
    granularity: str = "full"
    top_k: int = 128
    js_beta: float = 0.5
    temperature: float = 1.0
    topk_from: str = "student"
    topk_renorm: bool = True
    ignore_index: int = -100
    reduction: str = "mean"
    valid_vocab: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _validate_common(self)


@dataclass(frozen=True)
class DOPDConfig:
    """Settings of the DOPD loss (DESIGN.md section 1). Defaults are the paper's.

    top_k:        K of the top-K reverse-KL regimes (LH, LL, HS); clipped to the vocabulary size. Logits
                  tied at the K-th place enter lower column first (`topk.select_top_k`).
    beta_light:   weight of LH and HS tokens.
    beta_weak:    weight of LL tokens.
    beta_strong:  weight of HT tokens.
    js_beta:      student weight β of the JS mixture used on HT tokens, in (0, 1).
    trim:         fraction of largest values dropped before averaging each routing statistic:
                  the floor(trim · N_valid) largest values are discarded. In [0, 1).
    temperature:  all three distributions (and the routed log-probs) are softmax(logits / temperature).
    ignore_index: token value marking masked positions.
    reduction:    "mean", "seq_mean", "sum" or "none" (see `OPDConfig`).
    topk_from:    "student" (default) or "target": whose top-K forms the support of a top-K regime.
    topk_renorm:  True (default) renormalizes over the K tokens; False adds a tail bucket.
    valid_vocab:  columns at or past this index are padding and excluded (None: all columns).
    """

    top_k: int = 128
    beta_light: float = 0.6
    beta_weak: float = 0.3
    beta_strong: float = 1.0
    js_beta: float = 0.5
    trim: float = 0.05
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    topk_from: str = "student"
    topk_renorm: bool = True
    valid_vocab: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("beta_light", "beta_weak", "beta_strong"):
            _check_real(name, getattr(self, name), lo=0.0)
        _check_real("trim", self.trim, lo=0.0, hi=1.0, hi_open=True)
        _validate_common(self)

    def replace(self, **changes) -> "DOPDConfig":
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return DOPDConfig(**values)


def _validate_common(cfg) -> None:
    _check_int("top_k", cfg.top_k, 1)
    _check_real("js_beta", cfg.js_beta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    _check_real("temperature", cfg.temperature, lo=0.0, lo_open=True)
    _check_choice("topk_from", cfg.topk_from, TOPK_SOURCES)
    if not isinstance(cfg.topk_renorm, bool):
        raise TypeError(f"topk_renorm must be a bool, got {type(cfg.topk_renorm).__name__}")
    if isinstance(cfg.ignore_index, bool) or not isinstance(cfg.ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(cfg.ignore_index).__name__}")
    if not -2**63 <= cfg.ignore_index < 2**63:  # tokens are compared with it as int64
        raise ValueError(f"ignore_index must fit in int64, got {cfg.ignore_index}")
    _check_choice("reduction", cfg.reduction, REDUCTIONS)
    _check_int("valid_vocab", cfg.valid_vocab, 1, allow_none=True)
