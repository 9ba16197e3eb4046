"""Examples with privileged hints: the built-in arithmetic task and JSONL loading.

Built-in task: add two `digits`-digit numbers. The answer is the sum written least-significant digit
first and zero-padded to `digits + 1` digits (the order in which a carry propagates, which a tiny
causal model can learn); the privileged hint is the column-by-column working without the final answer,
e.g. prompt `158+275=`, hint `8+5+0=13,5+7+1=13,1+2+1=04;`, answer `3340` (433 reversed).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError

ALPHABET = "0123456789+=,;"


@dataclass(frozen=True)
class Example:
    prompt: str
    hint: str
    answer: Optional[str] = None


def make_addition_example(a: int, b: int, digits: int) -> Example:
    """One addition problem with its step-wise hint."""
    xs, ys = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    steps, carry = [], 0
    for da, db in zip(xs, ys):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={total:02d}")
        carry = total // 10
    answer = str(a + b).zfill(digits + 1)[::-1]
    return Example(prompt=f"{str(a).zfill(digits)}+{str(b).zfill(digits)}=", hint=",".join(steps) + ";", answer=answer)


def addition_splits(digits: int, n_train: int, n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Disjoint train and held-out problem sets, the same for the same arguments."""
    rng = random.Random(seed)
    limit = 10**digits
    if n_train + n_eval > limit * limit:
        raise UsageError(f"--digits {digits}: only {limit * limit} problems exist, fewer than "
                         f"--train-size + --eval-size = {n_train + n_eval}")
        #{digits} has only {limit * limit} problems; asked for {n_train + n_eval}")
    pairs: set[tuple[int, int]] = set()
    ordered = []
    while len(ordered) < n_train + n_eval:
        pair = (rng.randrange(limit), rng.randrange(limit))
        if pair not in pairs:
            pairs.add(pair)
            ordered.append(pair)
    examples = [make_addition_example(a, b, digits) for a, b in ordered]
    return examples[:n_train], examples[n_train:]


def load_jsonl(path: str, arg: str = "--data") -> list[Example]:
    """Read `{"prompt", "hint", "answer"?}` records; a bad line is a UsageError naming `arg`, the file
    and the line."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{arg} {path}:{lineno}: not JSON ({exc})") from exc
            for field in ("prompt", "hint"):
                if not isinstance(record.get(field), str):
                    raise UsageError(f"{arg} {path}:{lineno}: field {field!r} is missing or not a string")
            answer = record.get("answer")
            examples.append(Example(record["prompt"], record["hint"], None if answer is None else str(answer)))
    if not examples:
        raise UsageError(f"{arg} {path}: no records")
    return examples


def exact_match(completion: str, example: Example) -> float:
    """Default accuracy: 1.0 when the completion equals the reference answer (whitespace-stripped)."""
    if example.answer is None:
        raise UsageError("--eval-data: the default accuracy (exact match) needs an 'answer' in every record; "
                         "add answers or pass --reward")
    return float(completion.strip() == example.answer.strip())
