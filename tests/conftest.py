"""Shared fixtures: a fresh random seed per test (reported on failure) and input generators.

Every test draws its own seed, so each run sees new inputs. To reproduce a failure, rerun with
`DOPD_TEST_SEED=<seed shown in the failure report>`.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Triton reads TRITON_INTERPRET when it is first imported and when a kernel is decorated. Without
# CUDA, import it and our kernels here, interpreted, before any test module (or a library that pulls
# triton in, such as transformers) can import them compiled; then restore the variable so that
# backend="auto" elsewhere still chooses a CPU backend.
if not torch.cuda.is_available():
    _saved_interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import dopd_kernels.backends.triton_backend  # noqa: F401
        # The backend imports its kernel modules at the first launch; import them all now, so that a test
        # that reads one (tests/test_constants.py) cannot decorate them compiled ahead of an interpreted run.
        import dopd_kernels.kernels.divergence  # noqa: F401
        import dopd_kernels.kernels.sparse  # noqa: F401
        import dopd_kernels.kernels.stats  # noqa: F401
        import dopd_kernels.kernels.tail  # noqa: F401
    except ImportError:  # no triton: its tests skip
        pass
    finally:
        if _saved_interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved_interpret

IGNORE = -100
INTERPRETED_ON_CUDA = ("the Triton kernels are compiled for CUDA in this process; the interpreted variant runs on "
                       "machines without CUDA")


def interpreted_triton(monkeypatch, **tiles):
    """A `TritonBackend(**tiles)` whose kernels the interpreter runs on CPU tensors, with TRITON_INTERPRET
    set for the calling test only (`monkeypatch`); the test skips, saying why, without triton or where
    CUDA compiled the kernels in this process."""
    if torch.cuda.is_available():
        pytest.skip(INTERPRETED_ON_CUDA)
    triton_backend = pytest.importorskip("dopd_kernels.backends.triton_backend", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return triton_backend.TritonBackend(**tiles)


def with_padding_rows(t: torch.Tensor, rows: int, value: float = 50.0) -> torch.Tensor:
    """`t` (a head's weight [V, H] or bias [V]) with `rows` extra rows of `value`, a checkpoint's padding
    rows: at the default, large enough that any softmax that saw them would be dominated by them."""
    return torch.cat([t, torch.full((rows,) + tuple(t.shape[1:]), value, dtype=t.dtype, device=t.device)])

@pytest.fixture(autouse=True)
def seed(request):
    """Seed torch with a random (or `DOPD_TEST_SEED`) seed and attach it to the test's report."""
    value = int(os.environ.get("DOPD_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"reproduce with DOPD_TEST_SEED={seeds[0]}"))


def correlated_logits(lead_shape, vocab, n_streams=3, noise=(0.7, 1.0), scale=2.0, dtype=torch.float32):
    """Student logits ~ scale·N(0,1); each further stream = student + noise_i·N(0,1) (never zeros)."""
    if isinstance(lead_shape, int):
        lead_shape = (lead_shape,)
    s = scale * torch.randn(*lead_shape, vocab, dtype=torch.float64)
    noises = noise if isinstance(noise, (tuple, list)) else (noise,) * (n_streams - 1)
    streams = [s] + [s + noises[i % len(noises)] * torch.randn_like(s) for i in range(n_streams - 1)]
    return [z.to(dtype) for z in streams]


def distinct_logits(lead_shape, vocab, n_streams=3, noise=(0.7, 1.0), dtype=torch.bfloat16):
    """Like `correlated_logits` but each row of the student holds distinct values exactly
    representable in bf16 (a shuffled grid of step 1/32), so a top-K set never hinges on a tie."""
    if isinstance(lead_shape, int):
        lead_shape = (lead_shape,)
    n = 1
    for d in lead_shape:
        n *= d
    assert vocab <= 512
    grid = (torch.arange(vocab, dtype=torch.float64) - vocab // 2) / 32.0
    s = torch.stack([grid[torch.randperm(vocab)] for _ in range(n)]).reshape(*lead_shape, vocab)
    noises = noise if isinstance(noise, (tuple, list)) else (noise,) * (n_streams - 1)
    streams = [s] + [s + noises[i % len(noises)] * torch.randn_like(s) for i in range(n_streams - 1)]
    return [z.to(dtype) for z in streams]


def tied_logits(lead_shape, vocab, levels: int = 5, dtype=torch.float32):
    """Logits on a coarse grid (multiples of 1/4 in [−levels/4, levels/4]), exact in every dtype: a row
    repeats its values, so its K-th largest is often shared by more columns than a top-K set has room
    for (see `ambiguous_topk_rows`)."""
    if isinstance(lead_shape, int):
        lead_shape = (lead_shape,)
    return (torch.randint(-levels, levels + 1, (*lead_shape, vocab)) / 4).to(dtype)


def ambiguous_topk_rows(z: torch.Tensor, k: int) -> torch.Tensor:
    """Rows (over the last dimension) whose top-K set depends on how a tie at the K-th place is broken."""
    top = z.topk(k, dim=-1).values
    kth = top[..., -1:]
    return (z == kth).sum(-1) > (top == kth).sum(-1)


def random_tokens(lead_shape, vocab, mask_frac=0.2, ignore_index=IGNORE):
    """Random tokens in [0, vocab) with about `mask_frac` of positions (never all) set to ignore_index."""
    if isinstance(lead_shape, int):
        lead_shape = (lead_shape,)
    y = torch.randint(0, vocab, lead_shape)
    mask = torch.rand(lead_shape) < mask_frac
    mask.view(-1)[torch.randint(0, y.numel(), ())] = False  # at least one valid token
    return y.masked_fill(mask, ignore_index)


def linear_streams(n_lead, hidden, vocab, dtype=torch.float32, bias=True, teacher_hidden=None, noise=0.5):
    """Student/teacher/privileged-student hidden states and lm_head weights (correlated)."""
    if isinstance(n_lead, int):
        n_lead = (n_lead,)
    ht = teacher_hidden or hidden
    hs = torch.randn(*n_lead, hidden, dtype=torch.float64)
    ws = torch.randn(vocab, hidden, dtype=torch.float64) * (2.0 / hidden**0.5)
    if ht == hidden:
        h_t = hs + noise * torch.randn_like(hs)
        w_t = ws + noise * torch.randn_like(ws) / hidden**0.5
    else:
        h_t = torch.randn(*n_lead, ht, dtype=torch.float64)
        w_t = torch.randn(vocab, ht, dtype=torch.float64) * (2.0 / ht**0.5)
    h_p = hs + noise * torch.randn_like(hs)
    out = dict(student_hidden=hs, student_weight=ws, teacher_hidden=h_t, teacher_weight=w_t, priv_student_hidden=h_p)
    if bias:
        out["student_bias"] = 0.5 * torch.randn(vocab, dtype=torch.float64)
        out["teacher_bias"] = out["student_bias"] + 0.3 * torch.randn(vocab, dtype=torch.float64)
    return {k: v.to(dtype) for k, v in out.items()}


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that requires grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def assert_close(actual, expected, rtol=1e-5, atol=None, what=""):
    """Elementwise |a − e| ≤ atol + rtol·|e|, atol defaulting to rtol · max|e| (scale-aware)."""
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if atol is None:
        atol = rtol * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-12)
    err = (actual - expected).abs()
    # NaN anywhere fails; ±inf must match exactly; finite values within tolerance.
    finite = torch.isfinite(expected)
    bad = torch.where(finite, ~(err <= atol + rtol * expected.abs()), actual != expected)
    bad |= torch.isnan(actual) | torch.isnan(expected)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max abs err {float(err.max()):.3e} "
            f"(atol {atol:.1e}, rtol {rtol:.1e}); first at flat index {i}: "
            f"{float(actual.reshape(-1)[i])!r} vs {float(expected.reshape(-1)[i])!r}"
        )


def pytest_collection_modifyitems(config, items):
    """Deselect the cases a test module leaves out on purpose: those for which its module-level
    `leave_out(item)` is true (tests/test_backend_conformance.py: parts of its matrix on costly backends)."""
    keep, drop = [], []
    for item in items:
        leave_out = getattr(getattr(item, "module", None), "leave_out", None)
        (drop if leave_out is not None and leave_out(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
