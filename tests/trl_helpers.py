"""Tiny models, tokenizer and datasets for the TRL integration tests (CPU, a few seconds each).

The tokenizer is character-level, built locally, with a chat template that wraps every turn in
special tokens (`<|user|>...<|end|>`) and opens the assistant turn with `<|assistant|>`, so the
tests see a template that adds tokens around turns. The models are `tests/tiny_models.py`'s random
causal LMs over that vocabulary: a Llama student and a wider Qwen2 teacher by default, other families
(with their head transforms) on request.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tiny_models import tiny_causal_lm
from transformers import PreTrainedTokenizerFast

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TURN_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-=?:.,!\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Context tokens: the privileged context of every test row is written in capitals, a range of
# tokens no plain prompt contains, so a test can tell which model read it.
CONTEXT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, special tokens for the turns, left padding (TRL generates left-padded)."""
    chars = sorted(set(ALPHABET + CONTEXT_ALPHABET))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL.values(), *TURN_TOKENS])}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left", **SPECIAL)
    tok.add_special_tokens({"additional_special_tokens": TURN_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_student(tok, family: str = "llama", seed: int = 0, hidden: int = 32):
    """A random `family` causal LM over the tokenizer's vocabulary (`tests/tiny_models.py`; head transforms of the
    family on, e.g. Cohere's logit scale)."""
    return tiny_causal_lm(family, tokenizer=tok, hidden=hidden, seed=seed)


def tiny_teacher(tok, family: str = "qwen2", seed: int = 1, hidden: int = 48):
    """A wider random teacher over the same vocabulary (e.g. Gemma 2 with its soft-cap)."""
    return tiny_causal_lm(family, tokenizer=tok, hidden=hidden, seed=seed)


def dataset(n: int = 8, conversational: bool = False, seed: int = 0) -> Dataset:
    """Rows `{"prompt", "privileged_context"}`: sums with a capital-letter hint."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = (int(v) for v in torch.randint(0, 50, (2,), generator=g))
        prompt = f"{a}+{b}="
        hint = "HINT " + CONTEXT_ALPHABET[i % 26] * (1 + i % 3)
        rows.append({"prompt": [{"role": "user", "content": prompt}] if conversational else prompt,
                     "privileged_context": hint})
    return Dataset.from_list(rows)


def config(tmp_path, **overrides):
    """A small, fast, deterministic CPU configuration of the trainer."""
    from dopd_kernels.integrations.trl import DOPDTrainerConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
                max_completion_length=6, use_cpu=True, seed=0, disable_dropout=True, loss_top_k=8, loss_backend="torch",
                shuffle_dataset=False)
    base.update(overrides)
    return DOPDTrainerConfig(**base)


def context_token_ids(tok) -> set[int]:
    return set(tok.convert_tokens_to_ids(list(CONTEXT_ALPHABET)))

