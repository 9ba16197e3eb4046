"""Examples with privileged hints: the built-in task and JSONL loading.

Built-in task, designed from the DOPD paper's premise (privileged information mixes capability the
student can learn with information it can never infer from the prompt): add two `digits`-digit
numbers and write the sum zero-padded to `digits + 1` digits, in an ORDER drawn at random for each
problem: `f` (most significant digit first) or `r` (least significant first). Either order counts as
correct, so without the hint nothing is lost by picking one; but the order is known only to whoever
reads the hint. The hint therefore carries

- an unlearnable part: the order (a fair coin, independent of the prompt), and
- a learnable part, in one of three forms (`HINT_FORMS`):
  `cues` (default, the paper's moderate hint: the carry out of each column, units first; no digit of
  the answer), `working` (the column-by-column execution trace, which contains every digit), or
  `answer` (the answer itself).

Example (`58+75=`, order `f`): cues hint `f|11;`, working hint `f|8+5+0=13,5+7+1=13;`, answer hint
`f|133;`; the answer is `133` (order `r`: `331`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import UsageError

ALPHABET = "0123456789+=,;|fr"
HINT_FORMS = ("cues", "working", "answer")
ORDERS = ("f", "r")


@dataclass(frozen=True)
class Example:
    """`answer` is the reference completion; `alternatives` are other completions that count as correct."""

    prompt: str
    hint: str
    answer: Optional[str] = None
    alternatives: tuple[str, ...] = ()


def make_addition_example(a: int, b: int, digits: int, order: str, hint_form: str = "cues") -> Example:
    """One problem: prompt `a+b=`, the hint in `hint_form` (led by the order), the sum in `order`."""
    if order not in ORDERS or hint_form not in HINT_FORMS:
        raise ValueError(f"order must be one of {ORDERS} and hint_form one of {HINT_FORMS}")
    xs, ys = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    steps, carries, carry = [], [], 0
    for da, db in zip(xs, ys):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={total:02d}")
        carry = total // 10
        carries.append(str(carry))
    forward = str(a + b).zfill(digits + 1)
    answer, other = (forward, forward[::-1]) if order == "f" else (forward[::-1], forward)
    body = {"cues": "".join(carries), "working": ",".join(steps), "answer": answer}[hint_form]
    return Example(prompt=f"{str(a).zfill(digits)}+{str(b).zfill(digits)}=", hint=f"{order}|{body};", answer=answer,
                   alternatives=(other,) if other != answer else ())


def addition_splits(digits: int, n_train: int, n_eval: int, seed: int,
                    hint_form: str = "cues") -> tuple[list[Example], list[Example]]:
    """Disjoint train and held-out problem sets (each with its random order), the same for the same
    arguments."""
    rng = random.Random(seed)
    limit = 10**digits
    if n_train + n_eval > limit * limit:
        raise UsageError(f"--digits {digits}: only {limit * limit} problems exist, fewer than "
                         f"--train-size + --eval-size = {n_train + n_eval}")
    pairs: set[tuple[int, int]] = set()
    ordered = []
    while len(ordered) < n_train + n_eval:
        pair = (rng.randrange(limit), rng.randrange(limit))
        if pair not in pairs:
            pairs.add(pair)
            ordered.append((*pair, rng.choice(ORDERS)))
    examples = [make_addition_example(a, b, digits, order, hint_form) for a, b, order in ordered]
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
    """Default accuracy: 1.0 when the completion equals the reference answer or one of its accepted
    alternatives (whitespace-stripped)."""
    if example.answer is None:
        raise UsageError("--eval-data: the default accuracy (exact match) needs an 'answer' in every record; "
                         "add answers or pass --reward")
    return float(completion.strip() in {a.strip() for a in (example.answer, *example.alternatives)})
