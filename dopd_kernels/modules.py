"""`nn.Module` faces of the loss functions, for trainers that hold their loss as a module."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .api import dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss
from .config import DOPDConfig, DOPDOutput, OPDConfig, OPDOutput


class DOPDLoss(nn.Module):
    """`DOPDLoss(config)(student_logits, teacher_logits, priv_student_logits, tokens, thresholds=None) -> DOPDOutput`."""

    def __init__(self, config: Optional[DOPDConfig] = None, backend="auto"):
        super().__init__()
        self.config, self.backend = config or DOPDConfig(), backend

    def forward(self, student_logits, teacher_logits, priv_student_logits, tokens, thresholds=None, normalizer=None) -> DOPDOutput:
        return dopd_loss(student_logits, teacher_logits, priv_student_logits, tokens, config=self.config,
                         thresholds=thresholds, backend=self.backend, normalizer=normalizer)


class FusedLinearDOPDLoss(nn.Module):
    """`FusedLinearDOPDLoss(config)(student_hidden, student_weight, teacher_hidden, teacher_weight,
    priv_student_hidden, tokens, **kwargs) -> DOPDOutput`; kwargs as in `fused_linear_dopd_loss`.
    Each weight may be an `LMHead` (bias, scale, soft-cap, vocab_size)."""

    def __init__(self, config: Optional[DOPDConfig] = None, backend="auto"):
        super().__init__()
        self.config, self.backend = config or DOPDConfig(), backend

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, priv_student_hidden, tokens,
                **kwargs) -> DOPDOutput:
        return fused_linear_dopd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, priv_student_hidden,
                                      tokens, config=self.config, backend=self.backend, **kwargs)


def _opd_options(config: Optional[OPDConfig], options: dict) -> dict:
    if config is not None and not isinstance(config, OPDConfig):
        raise TypeError(f"config must be an OPDConfig (or None), got {type(config).__name__}")
    cfg = config or OPDConfig(**options)
    if config is not None and options:
        raise ValueError("pass either an OPDConfig or keyword options, not both")
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


class OPDLoss(nn.Module):
    """`OPDLoss(divergence=..., granularity=..., ...)(student_logits, teacher_logits, tokens) -> OPDOutput`
    (or `OPDLoss(OPDConfig(...))`)."""

    def __init__(self, config: Optional[OPDConfig] = None, backend="auto", **options):
        super().__init__()
        self.options, self.backend = _opd_options(config, options), backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                normalizer=None) -> OPDOutput:
        return opd_loss(student_logits, teacher_logits, tokens, backend=self.backend, normalizer=normalizer, **self.options)


class FusedLinearOPDLoss(nn.Module):
    """`FusedLinearOPDLoss(...)(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens,
    student_bias=None, teacher_bias=None) -> OPDOutput`; each weight may be an `LMHead`."""

    def __init__(self, config: Optional[OPDConfig] = None, backend="auto", **options):
        super().__init__()
        self.options, self.backend = _opd_options(config, options), backend

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, tokens, student_bias=None,
                teacher_bias=None, normalizer=None) -> OPDOutput:
        return fused_linear_opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens,
                                     student_bias=student_bias, teacher_bias=teacher_bias, backend=self.backend,
                                     normalizer=normalizer, **self.options)
