"""`LMHead`: a model's output head as the fused-linear losses need it (no `transformers` import).

A causal LM's next-token logits are `softcap(scale · (h·Wᵀ + b))` over the first `vocab_size` rows
of `W` (the rest are padding rows some checkpoints add for alignment). `dopd_kernels.hf.lm_head`
reads one from a Hugging Face model; anything else can build one by hand.

The fused-linear losses take an `LMHead` wherever they take a weight (`student_weight`,
`teacher_weight`, `priv_student_weight`, `token_logprobs(weight=...)`); a raw `[V, H]` tensor means
no transform and every row real. Usage, one line per stream:

    fused_linear_dopd_loss(h_s, LMHead(W_s, softcap=30.0), h_t, LMHead(W_t, b_t, scale=0.25), h_p, tokens)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LMHead:
    """An output head.

    weight:     `[V_rows, H]` (a tied input embedding is fine); receives the gradient on the student stream.
    bias:       optional `[V_rows]`.
    scale:      multiplier applied to `h·Wᵀ + b` (Cohere `logit_scale`, Falcon-H1 `lm_head_multiplier`,
                1 / Granite `logits_scaling`); 1.0 for none.
    softcap:    `c` of the soft-cap `c · tanh(z / c)` applied after the scale (Gemma 2/3
                `final_logit_softcapping`); None for none.
    vocab_size: number of real (tokenizer) rows; rows at or past it are padding and never take
                probability. None means every row is real.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: float = 1.0
    softcap: Optional[float] = None
    vocab_size: Optional[int] = None
