"""The three contexts of a DOPD step and the response positions aligned across them.

For a prompt `x`, hint `p` and sampled response `y` (token ids), the student reads `x,y` and the
privileged policies read `x,p,y`. The logit at context position `i` predicts the token at `i + 1`,
so response token `y[t]` is scored at position `len(prefix) - 1 + t` of each context. Gathering the
hidden states at those positions gives `[B, T, H]` tensors whose row `(b, t)` refers to the same
sampled token in every stream; `tokens[b, t]` is that token, or -100 past the end of `y`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Context:
    """A right-padded batch of `prefix + response` sequences and where each response token is scored."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, T] index of the logit that predicts tokens[b, t] (0 where ignored)
    tokens: torch.Tensor  # [B, T] response token ids, IGNORE_INDEX past the end of a response


@dataclass
class Contexts:
    student: Context  # x, y
    privileged: Context  # x, p, y (privileged teacher and privileged student)


def build_context(prefixes: list[list[int]], responses: list[list[int]], pad_id: int) -> Context:
    """Right-pad `prefix + response` rows (right padding keeps positions 0.. for every row)."""
    if len(prefixes) != len(responses):
        raise ValueError(f"{len(prefixes)} prefixes but {len(responses)} responses")
    length = max(len(p) + len(r) for p, r in zip(prefixes, responses))
    width = max(1, max(len(r) for r in responses))
    batch = len(prefixes)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    tokens = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for b, (prefix, response) in enumerate(zip(prefixes, responses)):
        if not prefix:
            raise ValueError("every prefix needs at least one token (the logit before y[0] lives on it)")
        row = prefix + response
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        positions[b, : len(response)] = torch.arange(len(response)) + len(prefix) - 1
        tokens[b, : len(response)] = torch.tensor(response, dtype=torch.long)
    return Context(input_ids, attention_mask, positions, tokens)


def build_contexts(prompts: list[list[int]], hints: list[list[int]], responses: list[list[int]],
                   pad_id: int) -> Contexts:
    """Student context `x,y` and privileged context `x,p,y` for the same responses."""
    contexts = Contexts(
        student=build_context(prompts, responses, pad_id),
        privileged=build_context([x + p for x, p in zip(prompts, hints)], responses, pad_id),
    )
    check_alignment(contexts.student, contexts.privileged)
    return contexts


def check_alignment(*contexts: Context) -> None:
    """Raise ValueError unless, in every context, the token after each scored position is the
    response token scored there, and all contexts score the same tokens."""
    first = contexts[0]
    for ctx in contexts:
        if not torch.equal(ctx.tokens, first.tokens):
            raise ValueError("contexts score different response tokens")
        valid = ctx.tokens != IGNORE_INDEX
        following = torch.gather(ctx.input_ids, 1, (ctx.positions + 1).clamp(max=ctx.input_ids.shape[1] - 1))
        if not torch.equal(following[valid], ctx.tokens[valid]):
            raise ValueError("response positions are misaligned: the logit at a scored position "
                             "does not predict the response token assigned to it")


def gather_response(hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
    """`[B, L, H]` hidden states -> `[B, T, H]` at the scored response positions."""
    index = ctx.positions.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)
