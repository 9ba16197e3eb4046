"""Sampling responses from a policy and measuring accuracy by greedy decoding."""

from __future__ import annotations

from typing import Callable

import torch

from .distributed import Workers
from .task import Example


def encode_prompts(tokenizer, examples: list[Example]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt (with the tokenizer's special prefix, e.g. BOS) and of each hint."""
    prompts = [tokenizer(e.prompt).input_ids for e in examples]
    hints = [tokenizer(e.hint, add_special_tokens=False).input_ids for e in examples]
    return prompts, hints


@torch.no_grad()
def generate(model, tokenizer, prefixes: list[list[int]], *, num_samples: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> list[list[int]]:
    """Responses (token ids, cut after the first EOS) for each prefix, `num_samples` per prefix,
    prefix-major. Uses the global torch RNG, which the checkpoint saves for exact resumes."""
    width = max(len(p) for p in prefixes)
    pad = tokenizer.pad_token_id
    # Decoder-only generation needs left padding so every row continues from its last real token.
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes])
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                         max_new_tokens=max_new_tokens, num_return_sequences=num_samples, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    model.train(was_training)
    responses = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        responses.append(row)
    return responses


def accuracy(model, tokenizer, examples: list[Example], reward_fn: Callable[[str, Example], float], *,
             with_hint: bool, max_new_tokens: int, workers: Workers = Workers(), batch_size: int = 256) -> float:
    """Mean reward of greedy completions, reading `x` (or `x,p` when `with_hint`); with several
    workers each rank decodes its share of `examples`."""
    total = 0.0
    mine = workers.shard(examples)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        prompts, hints = encode_prompts(tokenizer, chunk)
        prefixes = [x + p for x, p in zip(prompts, hints)] if with_hint else prompts
        responses = generate(model, tokenizer, prefixes, max_new_tokens=max_new_tokens, greedy=True)
        total += sum(reward_fn(tokenizer.decode(r, skip_special_tokens=True), e) for r, e in zip(responses, chunk))
    return sum(workers.gather(total)) / len(examples)
