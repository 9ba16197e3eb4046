"""Causal LMs for the trainer: tiny Llama models from configs, or local `transformers` checkpoints.

The loss consumes final hidden states and `lm_head` weights rather than logits, so this module also
exposes those two views of a model.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

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
    """Student and teacher must score the same token ids: same tokenizer vocabulary, same lm_head rows."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UsageError("--teacher: its tokenizer vocabulary differs from --student's; both must share one tokenizer")
    v_s, v_t = lm_head(student)[0].shape[0], lm_head(teacher)[0].shape[0]
    if v_s != v_t:
        raise UsageError(f"--teacher: lm_head has {v_t} rows but --student's has {v_s}; both must share one vocabulary")


def lm_head(model):
    """`(weight [V, H], bias or None)` of the output projection."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states `[B, T, H]`, i.e. what `lm_head` maps to logits, without the logits."""
    device = model.device
    return model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state


class HiddenAndHead(torch.nn.Module):
    """A causal LM whose forward returns the fused loss's inputs: final hidden states and the `lm_head`
    weight and bias. Wrapped in DistributedDataParallel, the student's gradient-carrying forward goes
    through DDP's forward (which arms its gradient all-reduce for the next backward), and the
    `lm_head` the loss multiplies is a parameter of that same module, so its gradient is averaged
    with the others (also when it is not tied to the input embeddings)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return (final_hidden(self.model, input_ids, attention_mask), *lm_head(self.model))
