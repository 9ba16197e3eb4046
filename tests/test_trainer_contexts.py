"""Alignment of response positions across the student and privileged contexts."""

import pytest
import torch

from dopd_trainer.contexts import IGNORE_INDEX, Context, build_contexts, check_alignment, gather_response
from dopd_kernels.hf import lm_head
from dopd_trainer.models import head_logits, hidden_states, tiny_llama
from dopd_trainer.task import ALPHABET
from dopd_trainer.tokenizer import build_char_tokenizer

PROMPTS = [[1, 5, 6], [1, 7]]
HINTS = [[8, 9, 10, 11], [12]]
RESPONSES = [[13, 14, 2], [15, 16, 17, 2]]


def shifted(ctx: Context, offset: int) -> Context:
    return Context(ctx.input_ids, ctx.attention_mask, (ctx.positions + offset).clamp(min=0), ctx.tokens)


def test_positions_point_at_the_logit_before_each_response_token():
    ctx = build_contexts(PROMPTS, HINTS, RESPONSES, pad_id=0)
    assert ctx.student.positions[0, :3].tolist() == [2, 3, 4]  # len(x) - 1 + t
    assert ctx.privileged.positions[0, :3].tolist() == [6, 7, 8]  # len(x) + len(p) - 1 + t
    assert ctx.student.tokens[0].tolist() == [13, 14, 2, IGNORE_INDEX]
    assert torch.equal(ctx.student.tokens, ctx.privileged.tokens)


@pytest.mark.parametrize("offset", [-1, 1])
def test_off_by_one_alignment_is_rejected(offset):
    ctx = build_contexts(PROMPTS, HINTS, RESPONSES, pad_id=0)
    with pytest.raises(ValueError, match="misaligned"):
        check_alignment(ctx.student, shifted(ctx.privileged, offset))
    with pytest.raises(ValueError, match="misaligned"):
        check_alignment(shifted(ctx.student, offset), ctx.privileged)


def test_contexts_scoring_different_tokens_are_rejected():
    ctx = build_contexts(PROMPTS, HINTS, RESPONSES, pad_id=0)
    other = build_contexts(PROMPTS, HINTS, [[13, 14, 3], [15, 16, 17, 2]], pad_id=0)
    with pytest.raises(ValueError, match="different response tokens"):
        check_alignment(ctx.student, other.privileged)


def incremental_logprobs(model, prefix, response):
    """log π(y_t | prefix, y_<t) from the model's own logits on each prefix separately: ground truth."""
    out = []
    for t, token in enumerate(response):
        ids = torch.tensor([prefix + response[:t]])
        out.append(torch.log_softmax(model(ids).logits[0, -1], -1)[token])
    return torch.stack(out)


def test_gathered_hidden_states_score_the_response_tokens_in_every_context():
    """Batched, padded contexts + gathered positions give exactly the per-prefix log-probs of the
    sampled tokens, for the student context and the privileged one; a shifted gather does not."""
    tokenizer = build_char_tokenizer(ALPHABET)
    model = tiny_llama(tokenizer, hidden=16, layers=1, heads=2, seed=0).eval()
    head = lm_head(model, tokenizer)
    ctx = build_contexts(PROMPTS, HINTS, RESPONSES, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for c, prefixes in ((ctx.student, PROMPTS), (ctx.privileged, [x + p for x, p in zip(PROMPTS, HINTS)])):
            hidden = hidden_states(model, c.input_ids, c.attention_mask)
            logp = torch.log_softmax(head_logits(gather_response(hidden, c), head), -1)
            off = torch.log_softmax(head_logits(gather_response(hidden, shifted(c, -1)), head), -1)
            for b, (prefix, response) in enumerate(zip(prefixes, RESPONSES)):
                expected = incremental_logprobs(model, prefix, response)
                n = len(response)
                got = logp[b, torch.arange(n), c.tokens[b, :n]]
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                wrong = off[b, torch.arange(n), c.tokens[b, :n]]
                assert not torch.allclose(wrong, expected, atol=1e-3)
