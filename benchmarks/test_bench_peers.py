"""The configurations peers also implement, against the same naive baselines and library backends:
full-vocabulary JS (β=0.5) and forward KL, forward+backward (Liger-Kernel), and the sampled-token
log-prob / log-sum-exp pass, forward only (Cut Cross-Entropy)."""

from .harness import run

WORKLOADS = ("js", "kl", "logprob")


def test_peers(benchmark, settings, case_contender):
    case, contender = case_contender
    run(benchmark, settings, case, contender)
