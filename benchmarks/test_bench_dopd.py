"""DOPD loss (fused-linear, paper defaults), forward+backward: naive PyTorch, torch.compile of it and
every backend of this library. No peer library implements the DOPD routing."""

from .harness import run

WORKLOADS = ("dopd",)


def test_dopd(benchmark, settings, case_contender):
    case, contender = case_contender
    run(benchmark, settings, case, contender)
