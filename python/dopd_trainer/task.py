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
from typing import Callable, Optional

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


def load_jsonl(path: str, arg: str = "--data",
               check: Optional[Callable[[Example], Optional[str]]] = None) -> list[Example]:
    """Read `{"prompt", "hint", "answer"?}` records, one JSON object per UTF-8 line. `check(example)`
    returns a complaint about a well-formed example (e.g. characters the tokenizer lacks, or a length
    past the model's positions) or None. Any bad line is a UsageError naming `arg`, the file and the
    line number; the file is read line by line, so a huge line is refused before it is tokenized."""
    examples = []
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"{arg} {path}: cannot open it ({exc.strerror})") from exc
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{arg} {path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{where}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: not JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise UsageError(f"{where}: expected a JSON object with 'prompt' and 'hint', got a "
                                 f"{type(record).__name__}")
            for field in ("prompt", "hint"):
                if not isinstance(record.get(field), str):
                    raise UsageError(f"{where}: field {field!r} is missing or not a string")
            if not record["prompt"]:
                raise UsageError(f"{where}: field 'prompt' is empty")
            answer = record.get("answer")
            if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
                raise UsageError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
            example = Example(record["prompt"], record["hint"], None if answer is None else str(answer))
            problem = check(example) if check is not None else None
            if problem:
                raise UsageError(f"{where}: {problem}")
            examples.append(example)
    if not examples:
        raise UsageError(f"{arg} {path}: no records")
    return examples


def example_checker(tokenizer, max_positions: Optional[int], max_new_tokens: int) -> Callable[[Example], Optional[str]]:
    """A `check` for `load_jsonl`: every character must be in the tokenizer's vocabulary (no silent
    `<unk>`), and prompt + hint + the longest response must fit the models' positions. Lines longer
    than the positions allow are refused on their character count before being tokenized (a token
    covers at most a few dozen characters in any tokenizer this trainer meets)."""
    unk = tokenizer.unk_token_id
    max_chars_per_token = 64

    def check(example: Example) -> Optional[str]:
        if max_positions is not None and len(example.prompt) + len(example.hint) > max_chars_per_token * max_positions:
            return (f"prompt + hint is {len(example.prompt) + len(example.hint)} characters, far beyond the "
                    f"models' {max_positions} positions")
        ids = tokenizer(example.prompt).input_ids + tokenizer(example.hint, add_special_tokens=False).input_ids
        if unk is not None and unk in ids:
            unknown = sorted({c for c in example.prompt + example.hint
                              if unk in tokenizer(c, add_special_tokens=False).input_ids})
            return (f"characters outside the tokenizer's vocabulary: {''.join(unknown)!r} "
                    f"(they would become {tokenizer.unk_token!r})")
        if max_positions is not None and len(ids) + max_new_tokens > max_positions:
            return (f"prompt + hint is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that exceeds "
                    f"the models' {max_positions} positions")
        return None

    return check


def exact_match(completion: str, example: Example) -> float:
    """Default accuracy: 1.0 when the completion equals the reference answer (whitespace-stripped)."""
    if example.answer is None:
        raise UsageError("--eval-data: the default accuracy (exact match) needs an 'answer' in every record; "
                         "add answers or pass --reward")
    return float(completion.strip() == example.answer.strip())
