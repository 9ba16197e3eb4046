"""Causal LMs for the trainer: tiny Llama models from configs, or local `transformers` checkpoints.

The loss consumes final hidden states and output heads rather than logits; both come from
`dopd_kernels.hf` (`final_hidden_states`, `lm_head`), which know every family's head transforms
(scale, soft-cap), tied and padded heads and PEFT models.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from dopd_kernels.hf import final_hidden_states, lm_head
from dopd_kernels.heads import LMHead

from .errors import UsageError

HEADS = 4  # attention heads of the built-in models


def tiny_llama(tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int, heads: int = HEADS, seed: int = 0,
               max_positions: int = 128) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for CPU experiments (seeded, no dropout)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_checkpoint(path: str, arg: str):
    """Load `(model, tokenizer)` from a local folder; `arg` names the CLI option in errors."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except OSError as exc:
        raise UsageError(f"{arg} {path}: not a loadable local transformers checkpoint ({exc})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_same_vocabulary(student_tok, teacher_tok, student, teacher) -> None:
    """Student and teacher must score the same token ids: one tokenizer vocabulary. Their heads may
    have different numbers of padding rows past it (the losses exclude those rows)."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UsageError("--teacher: its tokenizer vocabulary differs from --student's; both must share one tokenizer")
    for name, model in (("--student", student), ("--teacher", teacher)):
        try:
            lm_head(model, student_tok)
        except ValueError as exc:
            raise UsageError(f"{name}: {exc}") from exc


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`dopd_kernels.hf.final_hidden_states` on the model's device: `[B, T, H]`, no logits."""
    device = next(model.parameters()).device
    return final_hidden_states(model, input_ids.to(device), attention_mask.to(device))


def head_logits(hidden: torch.Tensor, head: LMHead) -> torch.Tensor:
    """The model's own next-token logits over the real vocabulary from final hidden states `[..., H]`:
    `softcap(scale · (h·Wᵀ + b))` over the first `vocab_size` rows, `[..., vocab_size]`. For the
    warm-up's cross-entropy and the logged entropy; the distillation losses never form these."""
    rows = head.weight.shape[0] if head.vocab_size is None else head.vocab_size
    bias = None if head.bias is None else head.bias[:rows]
    z = torch.nn.functional.linear(hidden, head.weight[:rows], bias) * head.scale
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


class HiddenAndHead(torch.nn.Module):
    """A causal LM whose forward returns the fused loss's inputs: final hidden states and the head's
    weight and bias (`dopd_kernels.hf.lm_head`; `head()` re-attaches its transforms). Wrapped in
    DistributedDataParallel, the student's gradient-carrying forward goes through DDP's forward (which
    arms its gradient all-reduce for the next backward), and the head the loss multiplies is computed
    inside it (for a PEFT model, merged from its adapters), so its gradient is averaged with the others."""

    def __init__(self, model, vocab_size: Optional[int] = None):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        head = lm_head(self.model, vocab_size=self.vocab_size)
        return hidden_states(self.model, input_ids, attention_mask), head.weight, head.bias

    def head(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> LMHead:
        """The student's `LMHead` (with the model's transforms) around what `forward` returned."""
        return dataclasses.replace(lm_head(self.model, vocab_size=self.vocab_size), weight=weight, bias=bias)
