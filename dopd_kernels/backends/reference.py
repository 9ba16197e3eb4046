"""The `reference` backend: the float64 materialized math of `reference.py` behind the backend API."""

from __future__ import annotations

import torch

from .. import reference
from ..routing import Routing, poison_nan_routed


class ReferenceBackend:
    """Materializes every `[N, V]` logit tensor in float64; gradients by autograd. For tests."""

    name = "reference"

    def supports(self, device: torch.device) -> bool:
        return True

    def dopd(self, student, teacher, priv, tokens, valid, cfg, thresholds, shard=None, routing_group=None):
        _no_shards(shard)
        loss, regime, adv, q_t, q_p, used = reference.dopd_per_token(student, teacher, priv, tokens, valid, cfg, thresholds,
                                                                     routing_group)
        routing = Routing(regime, adv, q_t, q_p, used)
        return poison_nan_routed(loss, routing), routing

    def opd(self, student, teacher, tokens, valid, cfg, shard=None):
        _no_shards(shard)
        return reference.opd_per_token(student, teacher, tokens, valid, cfg)

    def token_logprobs(self, source, tokens, valid, shard=None):
        _no_shards(shard)
        with torch.no_grad():
            return reference.token_logprobs(source, tokens, valid)


def _no_shards(shard) -> None:
    if shard is not None:
        raise ValueError("backend 'reference' materializes whole logits and does not take vocab_parallel_group; "
                         "use backend='torch' (or another fused backend)")
