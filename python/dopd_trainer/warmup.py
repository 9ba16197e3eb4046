"""Supervised warm-up of the built-in models, cached on disk by a hash of everything that shapes it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .contexts import build_context, gather_response
from dopd_kernels.hf import lm_head

from .models import head_logits, hidden_states, load_checkpoint
from .rollout import encode_prompts
from .task import Example
from .train import cosine_schedule


def sft(model, tokenizer, examples: list[Example], *, hint_fraction: float, steps: int, batch_size: int, lr: float,
        seed: int, desc: str = "warm-up", show_progress: bool = False) -> None:
    """Teacher-forced cross-entropy on the answer (+EOS); each example reads `x,p` with probability
    `hint_fraction`, else `x`."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, warmup_steps=max(1, steps // 10), total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=not show_progress, dynamic_ncols=True):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        prompts, hints = encode_prompts(tokenizer, batch)
        prefixes = [x + p if rng.random() < hint_fraction else x for x, p in zip(prompts, hints)]
        answers = [tokenizer(e.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for e in batch]
        ctx = build_context(prefixes, answers, tokenizer.pad_token_id)
        hidden = gather_response(hidden_states(model, ctx.input_ids, ctx.attention_mask), ctx)
        logits = head_logits(hidden, lm_head(model, tokenizer))
        loss = F.cross_entropy(logits.flatten(0, 1), ctx.tokens.flatten().to(logits.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def cached_warmup(cache_dir: str, name: str, key: dict, build):
    """Return `(model, tokenizer)` from `cache_dir/name-<hash of key>`, calling `build()` to make and
    save it on a miss. The folder appears atomically (written elsewhere, then renamed)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"{name}-{digest}"
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer = build()
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{name}-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "warmup.json").write_text(json.dumps(key, indent=2, sort_keys=True))
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not path.is_dir():  # a concurrent run may have won the rename; anything else is real
                raise
    return load_checkpoint(str(path), f"cached {name}")
