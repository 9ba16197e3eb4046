"""What is specific to the `triton` backend: the tiles it chooses (the CUDA tile rules for every top-K, the
interpreter's defaults, and DOPD/OPD losses run at the exact CUDA tiles under the interpreter against
float64: `TritonBackend(cuda_tiles=True)`), its launch records (stats launches per running top-K, device
guards, deterministic mode without float atomics), pass-level kernels (stats pass, dense gradient tiles,
int64 top-K offsets), the fallback to torch above MAX_TOPK, the registry, a compiled step, allocation
traces, and a peer (Liger's fused-linear JSD). Its DOPD/OPD matrix against the float64 `reference`
(values, regimes, gradients, dtypes, odd sizes, head transforms, large logits, non-finite values) runs
in tests/test_backend_conformance.py: interpreted at small tiles without CUDA, compiled with it.

Without CUDA the kernels run on CPU tensors in the Triton interpreter: this module sets
`TRITON_INTERPRET=1` before the kernels are first imported (they read it when decorated) and keeps it
set during its own tests only, so other modules' `backend="auto"` is unaffected. With CUDA the same
cases run compiled on the GPU and the interpreter variants skip. Shapes stay at a few hundred columns at
most: the interpreter is slow.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Sequence

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

import dopd_kernels.kernels.divergence  # noqa: E402,F401  (decorated now: interpreted without CUDA)
from dopd_kernels.kernels.stats import topk_offsets  # noqa: E402


@triton.jit
def _topk_offsets_probe(out_ptr, slot, n_rows, top_k, base, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr):
    """The stats kernel's top-K output offsets for rows base .. base + BLOCK_N (test_topk_output_offsets_are_int64)."""
    offs = base + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K_PAD)
    tl.store(out_ptr + tl.arange(0, BLOCK_N)[:, None] * K_PAD + ks[None, :], topk_offsets(slot, n_rows, top_k, offs, ks))


if not CUDA:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import triton_sm90  # noqa: E402
from hardening_checks import check_forward_kl_tail  # noqa: E402
from head_transform_checks import check_bf16_heads, check_opd_heads  # noqa: E402
from test_backend_conformance import (Target, check_fused_linear_dopd_bf16, compare_dopd, compare_opd,  # noqa: E402
                                      fused_dopd_pair)
from test_memory import AllocationRecorder  # noqa: E402
from conftest import (IGNORE, INTERPRETED_ON_CUDA, assert_close, correlated_logits, distinct_logits, leaf,  # noqa: E402
                      linear_streams, random_tokens)
from dopd_kernels import (DOPDConfig, LMHead, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss,  # noqa: E402
                          opd_loss)
from dopd_kernels.backends import available_backends, resolve_backend  # noqa: E402
from dopd_kernels.backends import triton_backend  # noqa: E402
from dopd_kernels.backends.triton_backend import MAX_TOPK, TritonBackend  # noqa: E402
from dopd_kernels.passes import Grads  # noqa: E402
from dopd_kernels.sources import LinearSource, LogitsSource  # noqa: E402

# The interpreter evaluates discarded branches of tl.where on -inf columns (numpy warns; GPUs do not).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason=INTERPRETED_ON_CUDA)),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA not available")),
]
TB = TritonBackend()
SMALL_TILES = TritonBackend(block_n=16, block_v=32, block_h=16, vocab_splits=3)  # many tiles, several splits
RTOL = 1e-5
DIVS = ["reverse_kl", "forward_kl", "js"]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def to(device, *ts):
    return [t.to(device) for t in ts]


# -- the default tiles under the interpreter, and work skipped without a gradient -----------------


@pytest.mark.parametrize("device", DEVICES)
def test_default_tiles(device):
    """The tiles the backend chooses itself (under the interpreter: one vocabulary tile of up to 256
    columns and a single split, so no merge across tiles) on a DOPD logits batch with both top-K
    sources and a fused-linear DOPD batch (H = 40: hidden tiles of 64). The conformance matrix runs
    the interpreted kernels at 16 × 32 × 16 tiles with 3 splits."""
    be = Target(TB, device)
    zs, zt, zp = correlated_logits((3, 9), 150, noise=(0.8, 1.5))
    y = random_tokens((3, 9), 150)
    for source in ("student", "target"):
        compare_dopd(be, zs, zt, zp, y, DOPDConfig(top_k=16, topk_from=source, topk_renorm=source == "student",
                                                   trim=0.1, reduction="seq_mean"))
    fused_dopd_pair(be, linear_streams(24, 40, 97), random_tokens(24, 97), DOPDConfig(top_k=12, temperature=1.3))


@pytest.mark.parametrize("device", DEVICES)
def test_dopd_no_grad_does_no_gradient_work(device, monkeypatch):
    zs, zt, zp = to(device, *correlated_logits(20, 60))
    y = random_tokens(20, 60).to(device)
    s = leaf(zs)

    def fail(*a, **k):
        raise AssertionError("gradient pass ran under no_grad")

    monkeypatch.setattr(TritonBackend, "full_grad_pass", fail)
    monkeypatch.setattr(TritonBackend, "term_grad_pass", fail)
    with torch.no_grad():
        out = dopd_loss(s, zt, zp, y, config=DOPDConfig(top_k=8), backend=TB)
    assert not out.loss.requires_grad
    ref = dopd_loss(zs.double(), zt.double(), zp.double(), y, config=DOPDConfig(top_k=8), backend="reference")
    assert_close(out.loss, ref.loss, rtol=RTOL, what="loss")


# -- the CUDA tiles under the interpreter (issue 14 point 4) -----------------------------------------
# `TritonBackend(cuda_tiles=True)` launches every kernel with the constexprs it uses on CUDA (the module
# docstring's tile rules; only UPCAST_MASK differs: the interpreter multiplies bf16 operands in fp32),
# so block-boundary and masking bugs of the GPU tiles show here. Shapes are a little over one row
# block and one or two vocabulary tiles of those tiles, ragged everywhere: each test checks, from the
# launch records, that every kernel it names ran with a partial last vocabulary tile and (fused-linear)
# a partial last hidden chunk, and where it fixes the rows a pass sees, with several row blocks ending
# in a partial one.
#   fused-linear fp32  stats 32×64×16 (a running top-K: 16×128×16, one per launch), tail 64×64×16,
#                      value 16×64×16, grad 32×64×16, grad_dw 16×64×16          (N 70, H 40, V 150)
#   fused-linear bf16  stats 64×128×32 (two top-Ks: 16×128×32, one launch), tail and value 64×128×32,
#                      grad 32×128×32, grad_dw 32×64×32                          (N 70, H 40, V 150)
#   logits             stats 8×512 (top-Ks: 128 or K_PAD wide, 4 rows at 256 keys), tail 8×256,
#                      value and grad 8×512                                       (N 10, V 530)
#   sparse             K_PAD × min(pow2(H), 4096 / K_PAD, 128): 8 × 64 at K = 6, H = 40
# Logits-mode tiles do not depend on the dtype (bf16 logits are loaded and converted in registers), so
# bf16 runs in fused-linear mode only, where its tiles differ. The fused-linear gradient grid keeps the
# interpreter's 2 vocabulary splits (a GPU takes ~4 programs per SM: one tile each at these sizes); both
# go through the per-split dH scratch.

CUDA_TILES = TritonBackend(cuda_tiles=True)
CUDA_TILES_DET = TritonBackend(cuda_tiles=True, deterministic=True)
LIN_N, LIN_H, LIN_V = 70, 40, 150
LOG_N, LOG_V = 10, 530
TILED = {"stats_kernel", "tail_lse_kernel", "full_value_kernel", "kl_online_kernel", "grad_kernel", "grad_dw_kernel"}


def _hidden(args: dict) -> int:
    """Hidden size of a fused-linear launch's (first) stream; 0 in logits mode."""
    if not args.get("LINEAR", True):
        return 0
    return next(args[h] for h in ("hdim", "hs", "h0") if h in args)


@contextlib.contextmanager
def ragged_launches(*kernels: str, rows: Sequence[str] = ()):
    """Records the launches of the block (`triton_sm90.launches`, yielded); then checks that each of
    `kernels` ran, every launch of them ending in a partial vocabulary tile and, in fused-linear mode,
    a partial hidden chunk (the sparse kernels, one program per row, also in padded K lanes), and that
    every launch of the kernels in `rows` spans several row blocks ending in a partial one (named where
    the test fixes the number of rows a pass sees)."""
    with triton_sm90.launches() as seen:
        yield seen
    ran = {la.kernel for la in seen}
    assert set(kernels) <= ran, f"not launched: {sorted(set(kernels) - ran)} (launched: {sorted(ran)})"
    for name in kernels:
        mine = [la.args for la in seen if la.kernel == name]
        assert all(_hidden(a) % a["BLOCK_H"] for a in mine if _hidden(a)), f"{name}: H is a multiple of BLOCK_H"
        if name in TILED:
            assert all(a["valid_vocab"] % a["BLOCK_V"] for a in mine), f"{name}: a vocabulary without a partial tile"
        elif "K_PAD" in mine[0]:
            assert all(a["K_PAD"] > a["k"] for a in mine), f"{name}: no padded K lanes"
        if name in rows:
            assert all(a["n_rows"] > a["BLOCK_N"] and a["n_rows"] % a["BLOCK_N"] for a in mine), \
                f"{name}: rows {[a['n_rows'] for a in mine]} at BLOCK_N {mine[0]['BLOCK_N']}"


def tokens_with_ignored(n: int, v: int, ignored: int) -> torch.Tensor:
    """Random tokens [n] in [0, v) with exactly `ignored` of them (at random positions) ignored, so the
    passes see a fixed number of rows."""
    y = torch.randint(0, v, (n,))
    y[torch.randperm(n)[:ignored]] = IGNORE
    return y


@pytest.mark.skipif(CUDA, reason="compares with the interpreter's tiles; with CUDA the option changes nothing")
def test_cuda_tiles_option_selects_the_cuda_rules(monkeypatch):
    """`cuda_tiles=True` under the interpreter gives the configuration the backend picks on CUDA, for
    every role, mode, operand dtype and top-K width; without it the interpreter's tiles differ."""
    v, hdim, n = 151936, 4096, 65536
    groups = [[LinearSource(torch.empty(4, hdim, dtype=dt), torch.empty(v, hdim, dtype=dt))]
              for dt in (torch.bfloat16, torch.float32)] + [[LogitsSource(torch.empty(4, v))]]
    calls = [(g, k, role, n_topk) for g in groups for k in (0, 8, 128, 256) for n_topk in (1, 2)
             for role in ("stats", "tail", "value", "grad", "grad_dw") if k * n_topk <= TB._topk_width(g)]
    assert triton_backend._interpreting()
    here = [CUDA_TILES._config(g, n, k, role=role, n_topk=m) for g, k, role, m in calls]
    interpreted = [TB._config(g, n, k, role=role, n_topk=m) for g, k, role, m in calls]
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    on_cuda = [TB._config(g, n, k, role=role, n_topk=m) for g, k, role, m in calls]
    assert here == on_cuda
    assert sum(a != b for a, b in zip(interpreted, on_cuda)) > len(calls) // 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source,renorm", [("student", True), ("target", False)],
                         ids=["one-topk-renorm", "two-topks-tail"])
def test_cuda_tiles_logits_dopd(source, renorm, device):
    """Logits DOPD at the CUDA tiles, 18 valid rows: one running top-K (8 × 128) or two in one launch
    (4 × 128), the HT rows' value and gradient (8 × 512), tail buckets (8 × 256) and their dense
    gradient; a padded vocabulary (valid_vocab = 520 of 530) in the second."""
    zs, zt, zp = correlated_logits(LOG_N * 2, LOG_V, noise=(0.8, 1.5))
    y = tokens_with_ignored(LOG_N * 2, 520, 2)
    kernels = ("stats_kernel", "grad_kernel") + (("tail_lse_kernel",) if not renorm else ())
    with ragged_launches(*kernels, rows=("stats_kernel",)):
        compare_dopd(Target(CUDA_TILES, device), zs, zt, zp, y, DOPDConfig(
            top_k=6, topk_from=source, topk_renorm=renorm, valid_vocab=None if renorm else 520, trim=0.1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gran,k", [("full", 6), ("topk", 200)], ids=["full-js", "topk-K200-tail"])
def test_cuda_tiles_logits_opd(gran, k, device):
    """Logits OPD at the CUDA tiles, 10 rows: full-vocabulary JS (stats, value and gradient at 8 × 512),
    and a top-K of 200 with a tail bucket (one running top-K of K_PAD 256: 4 × 256 tiles; tail 8 × 256;
    the dense gradient 8 × 512)."""
    v = LOG_V if gran == "full" else 300
    zs, zt = correlated_logits(LOG_N, v, n_streams=2, noise=1.2)
    y = tokens_with_ignored(LOG_N, v, 0)
    kernels = ("stats_kernel", "grad_kernel") + (("full_value_kernel",) if gran == "full" else ("tail_lse_kernel",))
    with ragged_launches(*kernels, rows=kernels):
        compare_opd(Target(CUDA_TILES, device), zs, zt, y, divergence="js", granularity=gran, top_k=k,
                    topk_renorm=False, temperature=0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source,renorm,backend", [("student", True, CUDA_TILES), ("target", False, CUDA_TILES_DET)],
                         ids=["one-topk-renorm", "two-topks-tail-deterministic"])
def test_cuda_tiles_fused_linear_dopd_fp32(source, renorm, backend, device):
    """fp32 fused-linear DOPD at the CUDA tiles, 67 valid rows: a running top-K (16 × 128 × 16; two of
    them take two launches), the HT rows' value (16 × 64) and gradient (32 × 64), sparse top-K gathers
    and contractions; then tail buckets (64 × 64), the dense gradient with explicit columns, a padded
    vocabulary (valid_vocab = 150 of 160) and the deterministic dW / db (grad_dw 16 × 64 × 16, sparse_dw)."""
    v = LIN_V if renorm else LIN_V + 10
    t = linear_streams(LIN_N, LIN_H, v)
    y = tokens_with_ignored(LIN_N, LIN_V, 3)
    cfg = DOPDConfig(top_k=6, topk_from=source, topk_renorm=renorm, temperature=1.2, trim=0.1,
                     valid_vocab=None if renorm else LIN_V)
    kernels = ("stats_kernel", "grad_kernel") + (
        ("gather_kernel", "sparse_grad_kernel") if renorm else ("tail_lse_kernel", "grad_dw_kernel"))
    with ragged_launches(*kernels, rows=("stats_kernel",)) as seen:
        out, _ = fused_dopd_pair(Target(backend, device), t, y, cfg)
    assert len(set(out.regime[y != IGNORE].tolist())) >= 3
    # fp32 tiles keep one running top-K per launch (`_topk_width`): the teacher's in the launch of all
    # three streams, the privileged student's in one of its own.
    assert [la.args["TOPK_MASK"] for la in seen if la.kernel == "stats_kernel"] == ([1] if renorm else [2, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_tiles_fused_linear_opd_heads_fp32(device):
    """Full-vocabulary JS with soft-capped, scaled heads at the fp32 CUDA tiles: stats 32 × 64 × 16,
    value 16 × 64 × 16, gradient 32 × 64 × 16 (the shared check masks a random ~20 % of the rows)."""
    with ragged_launches("stats_kernel", "full_value_kernel", "grad_kernel"):
        check_opd_heads(CUDA_TILES, "js", "full", device=device, n=LIN_N, hdim=LIN_H, v=LIN_V)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_tiles_fused_linear_dopd_bf16(device):
    """bf16 fused-linear DOPD at the CUDA tiles, judged like Cut Cross-Entropy: two running top-Ks in
    one launch (16 × 128 × 32), tail buckets (64 × 128 × 32), gradient tiles (32 × 128 × 32) and the
    deterministic dW / db (grad_dw 32 × 64 × 32)."""
    with ragged_launches("stats_kernel", "tail_lse_kernel", "grad_kernel", "grad_dw_kernel") as seen:
        check_fused_linear_dopd_bf16(Target(CUDA_TILES_DET, device), renorm=False, v=LIN_V, hdim=LIN_H, rows=LIN_N,
                                     topk_from="target", grad_rtol=2 ** -6, grad_atol=1e-2)
    assert [la.args["TOPK_MASK"] for la in seen if la.kernel == "stats_kernel"] == [6]  # teacher and priv student


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_tiles_fused_linear_opd_heads_bf16(device):
    """Full-vocabulary JS on bf16 operands with heads at the CUDA tiles, judged like Cut Cross-Entropy:
    stats and value 64 × 128 × 32, gradient 32 × 128 × 32."""
    with ragged_launches("stats_kernel", "full_value_kernel", "grad_kernel"):
        check_bf16_heads(CUDA_TILES, "js", "full", device=device, n=LIN_N, hdim=LIN_H, v=LIN_V)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_cuda_tiles_kl_online(kind, device):
    """Full-vocabulary reverse / forward KL at the CUDA tiles: `kl_online_kernel` computes both
    log-sum-exps and the KL in one sweep (no stats pass), then `grad_kernel`. Logits mode (10 rows at
    16 × 512), fused-linear fp32 with soft-capped, scaled heads (value tiles 16 × 64 × 16) and bf16 with
    heads (64 × 128 × 32, judged like Cut Cross-Entropy)."""
    zs, zt = correlated_logits(LOG_N, LOG_V, n_streams=2, noise=1.2)
    with ragged_launches("kl_online_kernel", "grad_kernel") as seen:
        compare_opd(Target(CUDA_TILES, device), zs, zt, tokens_with_ignored(LOG_N, LOG_V, 0), divergence=kind,
                    granularity="full", temperature=0.9)
    with ragged_launches("kl_online_kernel", "grad_kernel") as more:
        check_opd_heads(CUDA_TILES, kind, "full", device=device, n=LIN_N, hdim=LIN_H, v=LIN_V)
        check_bf16_heads(CUDA_TILES, kind, "full", device=device, n=LIN_N, hdim=LIN_H, v=LIN_V)
    assert "stats_kernel" not in {la.kernel for la in [*seen, *more]}, "full-vocabulary KL ran a separate stats pass"


# -- stats pass, registry, compile ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,v,backend", [(200, 300, TB), (5, 200, SMALL_TILES), (128, 128, TB)],
                         ids=["K=200(K_PAD=256)", "K=5-many-tiles", "K=V=128"])
def test_stats_pass_topk_and_lse(k, v, backend, device):
    """Running top-K of up to 256 columns (sorted descending) for several streams at once, and the
    sampled token's tail bucket of streams 0 and 1 in the same sweep (one row's token holding all but
    ~e-60 of the mass: summed directly, not as lse + log(1 − p_y)), against torch."""
    # Streams 0 and 2 keep a top-K: each holds distinct values, so the top-K set is unique.
    zs, zt, zp = (distinct_logits(20, v)[0].float().to(device) for _ in range(3))
    rows = torch.tensor([0, 3, 4, 7, 8, 9, 12, 13, 19], device=device)
    tokens = torch.randint(0, v, (rows.shape[0],), device=device)
    zs[rows[1], tokens[1]] += 60.0
    sources = [LogitsSource(z, temperature=0.9) for z in (zs, zt, zp)]
    stats = backend.stats_pass(sources, rows, tokens, (0, 2), k, rest_streams=(0, 1))
    for j, z in enumerate((zs, zt, zp)):
        zr = z[rows].double() / 0.9
        assert_close(stats.lse[j], torch.logsumexp(zr, 1), rtol=1e-6, what=f"lse {j}")
        assert_close(stats.logit_y[j], zr.gather(1, tokens[:, None])[:, 0], rtol=1e-6, what=f"logit_y {j}")
        if j < 2:
            tail = torch.logsumexp(zr.scatter(1, tokens[:, None], float("-inf")), 1)
            assert_close(stats.rest_lse[j], tail, rtol=1e-6, what=f"tail {j}")
    assert set(stats.rest_lse) == {0, 1}
    assert stats.lse[0][1] - stats.rest_lse[0][1] > 50  # the confident row's tail is far below its token
    assert set(stats.topk) == {0, 2}
    for j in (0, 2):
        assert torch.equal(stats.topk[j], torch.topk(sources[j].logits[rows], k, dim=1).indices), f"top-K {j}"


@pytest.mark.parametrize("device", DEVICES)
def test_stats_pass_topk_fused_linear(device):
    t = {k: x.to(device) for k, x in linear_streams(17, 20, 150).items()}
    src = LinearSource(t["student_hidden"], t["student_weight"], t["student_bias"])
    rows = torch.arange(17, device=device)
    tokens = torch.randint(0, 150, (17,), device=device)
    stats = SMALL_TILES.stats_pass([src], rows, tokens, (0,), 24, rest_streams=(0,))
    z = t["student_hidden"].double() @ t["student_weight"].double().T + t["student_bias"].double()
    assert torch.equal(stats.topk[0].sort(1).values, torch.topk(z, 24, dim=1).indices.sort(1).values)
    tail = torch.logsumexp(z.scatter(1, tokens[:, None], float("-inf")), 1)
    assert_close(stats.rest_lse[0], tail, rtol=1e-5, what="tail bucket")


def test_registry_auto_and_unavailable(monkeypatch):
    device = torch.device("cuda" if CUDA else "cpu")
    assert isinstance(resolve_backend("auto", device), TritonBackend)
    assert isinstance(resolve_backend("triton", device), TritonBackend)
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not isinstance(resolve_backend("auto", device), TritonBackend)
        assert "triton" not in available_backends()  # it could not run anywhere here
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            resolve_backend("triton", device)
    # Without the triton package the factory says why.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "dopd_kernels.backends.triton_backend")
    with pytest.raises(RuntimeError, match="triton"):
        resolve_backend("triton", device)


def test_torch_compile_step_runs_with_a_graph_break():
    """A compiled training step around the fused loss with the Triton kernels: the public function is
    a deliberate graph break (`torch.compiler.disable`), so the step compiles and matches eager,
    gradients included."""
    t = linear_streams(20, 24, 90)
    y = random_tokens(20, 90)

    def step(h, w):
        out = fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                     config=DOPDConfig(top_k=8), backend=TB)
        return 2.0 * out.loss

    h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])
    eager = step(h, w)
    eager.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    compiled = torch.compile(step, backend="eager")(h, w)
    compiled.backward()
    assert_close(compiled, eager, rtol=1e-6, what="loss")
    assert_close(h.grad, gh, rtol=1e-6, what="dH")
    assert_close(w.grad, gw, rtol=1e-6, what="dW")


# -- memory rule and a peer implementation ----------------------------------------------------------


def test_fused_linear_allocates_no_vocabulary_rows():
    """Allocation trace: every tensor created during a fused-linear forward + backward (DOPD with all
    regimes, and full-vocabulary JS OPD) is checked; none has a vocabulary axis per token."""

    n, hdim, v = 40, 24, 257  # V appears in no other dimension
    t = linear_streams(n, hdim, v, teacher_hidden=20)
    y = random_tokens(n, v)


    h, w, b = leaf(t["student_hidden"]), leaf(t["student_weight"]), leaf(t["student_bias"])
    with AllocationRecorder() as trace:
        out = fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                     student_bias=b, teacher_bias=t["teacher_bias"],
                                     config=DOPDConfig(top_k=8, topk_renorm=False), backend=TB)
        out.loss.backward()
        opd = fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], y, divergence="js", backend=TB)
        opd.loss.backward()
    assert len(set(out.regime[y != IGNORE].tolist())) >= 3
    shapes = [(f, s) for f, s, _, _ in trace.allocs]
    assert any("zeros" in f and s == (n, hdim) for f, s in shapes), "the trace misses the backward"
    allowed = {(v, hdim), (v,)}  # dW / db accumulators
    bad = [(f, s) for f, s in shapes if v in s and s not in allowed]
    assert not bad, f"tensors with a vocabulary axis per token: {bad[:5]}"
    assert max(torch.Size(s).numel() for _, s in shapes) < n * v


def test_js_matches_liger_fused_linear_jsd():
    """Full-vocabulary JS OPD against Liger-Kernel's LigerFusedLinearJSD on identical inputs. Liger's
    `jsd_beta` weights the teacher: JS_β(student, teacher) here is Liger's with jsd_beta = 1 − β."""
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed "
                                "(optional test dependency: pip install liger-kernel==0.8.5 --no-deps)")
    n, hdim, v = 16, 24, 120
    t = linear_streams(n, hdim, v, bias=False, teacher_hidden=28)
    device = "cuda" if CUDA else "cpu"
    t = {k: x.to(device) for k, x in t.items()}
    for beta, temperature in ((0.5, 1.0), (0.3, 2.0)):
        h1, w1 = leaf(t["student_hidden"]), leaf(t["student_weight"])
        peer = liger.LigerFusedLinearJSD(jsd_beta=1.0 - beta, temperature=temperature)
        ref = peer(h1, w1, t["teacher_hidden"], t["teacher_weight"], None)
        ref.backward()
        h2, w2 = leaf(t["student_hidden"]), leaf(t["student_weight"])
        out = fused_linear_opd_loss(h2, w2, t["teacher_hidden"], t["teacher_weight"],
                                    torch.zeros(n, dtype=torch.long, device=device), divergence="js",
                                    granularity="full", js_beta=beta, temperature=temperature, backend=TB)
        out.loss.backward()
        assert_close(out.loss, ref, rtol=1e-5, what="loss vs Liger")
        assert_close(h2.grad, h1.grad, rtol=1e-4, what="dH vs Liger")
        assert_close(w2.grad, w1.grad, rtol=1e-4, what="dW vs Liger")



# -- a frozen head allocates no dW (the head transforms' values: tests/test_backend_conformance.py) ---


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_student_head_computes_no_dw(device):
    """A frozen lm_head (LoRA, or requires_grad=False): dH only, and no [V, H] accumulator is allocated."""

    n, hdim, v = 18, 12, 67
    t = {k: x.to(device) for k, x in linear_streams(n, hdim, v).items()}
    y = random_tokens(n, v, mask_frac=0.1).to(device)
    head = dict(scale=1.3, softcap=3.0)


    grads = {}
    for be, dt in ((TB, None), ("reference", torch.float64)):
        h = leaf(t["student_hidden"], dt)
        w, b = t["student_weight"].to(dt or torch.float32), t["student_bias"].to(dt or torch.float32)
        with AllocationRecorder() as trace:
            out = fused_linear_dopd_loss(h, LMHead(w, b, **head), t["teacher_hidden"].to(h.dtype),
                                         t["teacher_weight"].to(h.dtype), t["priv_student_hidden"].to(h.dtype), y,
                                         config=DOPDConfig(top_k=6, topk_renorm=False, trim=0.1), backend=be)
            out.loss.backward()
        grads[str(be)] = (out.loss, h.grad, [shape for _, shape, _, _ in trace.allocs])
    (loss, dh, shapes), (loss64, dh64, _) = grads[str(TB)], grads["reference"]
    assert_close(loss, loss64, rtol=RTOL, what="loss")
    assert_close(dh, dh64, rtol=RTOL, what="dH")
    assert any(s == (n, hdim) for s in shapes), "the trace misses the backward"
    assert (v, hdim) not in shapes, "a [V, H] tensor was allocated for a frozen head"


# -- fp32 precision at large logits (issue 15 point 5) ---------------------------------------------
# log p = (z − hi) − lo from the float64 log-sum-exp's split: the loss keeps fp32 relative precision
# whatever the logits' magnitude. Gradients: Liger's JSD kernel stays within 1.6e-6 of the gradient's
# scale of float64 at logits ~N(0, 40²); on top of that, a full-vocabulary gradient element is allowed
# the fp32 rounding of its own bracket (p_v·(r_v − c), r_v = lp − lq ≈ c ≈ 40 for reverse KL cancel
# where p_v ≈ 1, on every fp32 backend): 4·eps32·p_v·(|r_v| + |c|) per unit of upstream gradient.
# Before the split lse (fp32 log p = z − lse) reverse KL, forward KL and JS all exceeded this.


def _large_logit_case(case: str, n: int = 16, v: int = 200):
    g = torch.Generator().manual_seed(7)
    if case == "N(0,40^2)":
        zs = 40 * torch.randn(n, v, generator=g)
        zt = zs + 20 * torch.randn(n, v, generator=g)
    else:  # spread over ±1e4, offset by 1e4; a few columns shared so the divergences are not all saturated
        zs = (torch.rand(n, v, generator=g) * 2 - 1) * 1e4 + 1e4
        zt = zs + 5e3 * torch.randn(n, v, generator=g)
        zt[:, :20] = zs[:, :20] + torch.randn(n, 20, generator=g)
    return zs, zt, torch.randint(0, v, (n,), generator=g)


def _bracket_rounding(zs: torch.Tensor, zt: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """4·eps32 times the magnitude of the terms of each full-vocabulary gradient element (float64)."""
    lp, lq = torch.log_softmax(zs.double(), 1), torch.log_softmax(zt.double(), 1)
    p, q = lp.exp(), lq.exp()
    if kind == "forward_kl":  # p − q
        return 4 * 2 ** -24 * (p + q)
    r = lp - lq if kind == "reverse_kl" else beta * (lp - torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta)))
    c = (p * r).sum(1, keepdim=True)
    return 4 * 2 ** -24 * p * (r.abs() + c.abs())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["N(0,40^2)", "1e4+-1e4"])
@pytest.mark.parametrize("gran,renorm", [("full", True), ("topk", True), ("topk", False)],
                         ids=["full", "topk-renorm", "topk-tail"])
@pytest.mark.parametrize("kind", DIVS)
def test_large_logits_fp32_precision(kind, gran, renorm, case, device):
    zs, zt, y = to(device, *_large_logit_case(case))
    kw = dict(divergence=kind, granularity=gran, top_k=8, topk_renorm=renorm)
    s, s64 = leaf(zs), leaf(zs, torch.float64)
    out = opd_loss(s, zt, y, backend=TB, **kw)
    ref = opd_loss(s64, zt.double(), y, backend="reference", **kw)
    assert_close(out.loss, ref.loss, rtol=1e-6, atol=0.0, what="loss")
    if kind == "js":  # JS ≤ log 2 (up to the rounding of log 2 to fp32)
        assert float(out.per_token_loss.max()) <= float(torch.tensor(math.log(2), dtype=torch.float32))
    out.loss.backward()
    ref.loss.backward()
    assert torch.isfinite(s.grad).all()
    if case == "N(0,40^2)":
        atol = 1.6e-6 * float(s64.grad.abs().max())
        if gran == "full":  # mean over the tokens: upstream 1/n
            atol = atol + _bracket_rounding(zs, zt, kind) / zs.shape[0]
        err = (s.grad.double() - s64.grad).abs()
        assert bool((err <= atol).all()), f"grad: worst excess {float((err - atol).max()):.3e}"
    # At ±1e4 the bracket terms are ~1e4, and every fp32 backend's gradient carries their rounding
    # (the torch backend's alike); only the loss is held to fp32 precision there.


# -- tile rules, device guard, guards and offsets (issues 16 and 17) -------------------------------


DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
               (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("hdt,wdt", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_tile_rules_for_every_top_k(hdt, wdt, monkeypatch):
    """The CUDA defaults for every K the kernels take: tl.dot operands ≥ 16 in every dimension
    (Triton 3.6 refuses K < 16, fp32 included), K_PAD ≤ BLOCK_V, logits tiles ≥ 128 columns."""
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    v, hdim = 151936, 4096
    linear = [LinearSource(torch.empty(4, hdim, dtype=hdt), torch.empty(v, hdim, dtype=wdt))]
    logits = [LogitsSource(torch.empty(4, v, dtype=hdt))]
    assert TB._topk_width(linear) == (MAX_TOPK // 2 if torch.float32 in (hdt, wdt) else MAX_TOPK)
    for k in [0] + [1 << i for i in range(9)]:  # K_PAD 0 (no top-K), 1 .. MAX_TOPK
        if k <= TB._topk_width(linear):
            for role in ("stats", "tail", "value", "grad", "grad_dw"):
                cfg = TB._config(linear, 65536, k, role=role)
                assert min(cfg.block_n, cfg.block_v, cfg.block_h) >= 16, (k, role, cfg)
                assert cfg.block_v >= k
        for n_topk in (1, 2):
            if k * n_topk <= TB._topk_width(logits):
                cfg = TB._config(logits, 65536, k, n_topk=n_topk)
                assert cfg.block_v >= max(k, 128), (k, cfg)


@pytest.mark.parametrize("device", DEVICES)
def test_two_running_top_ks_beyond_one_launch(device, monkeypatch):
    """DOPD with topk_from="target" keeps two running top-Ks; with fp32 fused-linear tiles two of
    K_PAD = 128 exceed one launch's budget, so the second stream gets a stats launch of its own."""
    t = {k: x.to(device) for k, x in linear_streams(12, 16, 150).items()}
    y = random_tokens(12, 150).to(device)
    assert 2 * 128 > TB._topk_width([LinearSource(t["student_hidden"], t["student_weight"])])
    launched = _record_launches(monkeypatch)
    fused_dopd_pair(Target(TB, device), t, y, DOPDConfig(top_k=100, topk_from="target", topk_renorm=False, trim=0.1))
    assert [name for name, _ in launched].count("stats_kernel") == 2


def test_top_k_above_the_kernel_maximum_runs_on_torch(monkeypatch):
    """top_k > MAX_TOPK (the API accepts any K ≥ 1): the call runs on the torch backend, correctly."""
    zs, zt, zp = correlated_logits(6, MAX_TOPK + 60)
    y = random_tokens(6, MAX_TOPK + 60)
    calls = []
    monkeypatch.setattr(TritonBackend, "stats_pass", lambda *a, **k: calls.append(1))
    compare_dopd(Target(TB), zs, zt, zp, y, DOPDConfig(top_k=MAX_TOPK + 1, trim=0.0))
    s = leaf(zs)
    out = opd_loss(s, zt, y, divergence="reverse_kl", granularity="topk", top_k=MAX_TOPK + 20, backend=TB)
    ref = opd_loss(zs.double(), zt.double(), y, divergence="reverse_kl", granularity="topk", top_k=MAX_TOPK + 20,
                   backend="reference")
    assert_close(out.loss, ref.loss, rtol=RTOL, what="loss")
    assert not calls, "a Triton stats pass ran with a top-K above MAX_TOPK"


def test_every_launch_runs_under_a_guard_of_its_inputs_device(monkeypatch):
    """Triton launches on the current device: each kernel launch must be inside a device guard of
    its inputs' device. Mocked: the guard records the device it makes current, the launches check it."""
    import contextlib

    current = []
    launched = []

    @contextlib.contextmanager
    def guard(device):
        current.append(device)
        yield
        current.pop()

    real_run = TritonBackend._run

    def run(kernel, grid, device, *args, **kw):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        with guard(device):
            assert current and all(t.device == current[-1] for t in tensors)
            launched.append(kernel)
            orig_guard = triton_backend.device_guard
            monkeypatch.setattr(triton_backend, "device_guard", lambda d: contextlib.nullcontext())
            try:
                real_run(kernel, grid, device, *args, **kw)
            finally:
                monkeypatch.setattr(triton_backend, "device_guard", orig_guard)

    monkeypatch.setattr(TritonBackend, "_run", staticmethod(run))
    t = linear_streams(10, 16, 40)
    y = random_tokens(10, 40)
    h = leaf(t["student_hidden"])
    out = fused_linear_dopd_loss(h, t["student_weight"], t["teacher_hidden"], t["teacher_weight"],
                                 t["priv_student_hidden"], y, config=DOPDConfig(top_k=4, topk_renorm=False), backend=TB)
    out.loss.backward()
    assert len({k.fn.__name__ if hasattr(k, "fn") else str(k) for k in launched}) >= 4


def test_device_guard_makes_a_cuda_device_current(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with triton_backend.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with triton_backend.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("device", DEVICES)
def test_dense_gradient_with_an_overflowing_coefficient_has_no_nan(device):
    """KIND 3 (p · dense): a dense coefficient beyond fp32 range meets p = 0 at padding columns and
    underflowed columns; the tile must give 0 there, not 0·inf = NaN."""
    n, v, vv = 6, 40, 33
    z = torch.randn(n, v, device=device)
    z[:, 5] = -200.0  # p underflows to 0 in a valid column too
    src = LogitsSource(z, valid_vocab=vv)
    rows = torch.arange(n, device=device)
    lse = torch.logsumexp(z[:, :vv].double(), 1)
    sink = Grads(logits=torch.zeros_like(z))
    coef = torch.full((n,), 1e39, dtype=torch.float64, device=device)  # inf in fp32
    TB._grad_tiles(src, src, rows, lse, lse, coef, torch.ones(n, dtype=torch.float64, device=device),
                   TB._div.DENSE, 0.5, sink)
    g = sink.logits
    assert not torch.isnan(g).any()
    assert (g[:, vv:] == 0).all() and (g[:, 5] == 0).all()
    assert torch.isinf(g[:, :5]).all()  # p > 0: p · inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["logits", "linear"])
@pytest.mark.parametrize("gran", ["topk", "sampled"])
def test_forward_kl_tail_far_below_teacher(gran, mode, device):
    """Forward KL's tail coefficient 1 − Q_rest/P_rest past float64's range on rows whose tail p_v
    underflows fp32: the dense tiles take it folded into lse (RowTerm.dense_normalizer), so the O(1)
    tail gradient comes out, against float64 (tests/test_precision.py runs torch and cpp alike)."""
    check_forward_kl_tail(TB, gran, torch.float32, mode, device=device)


def test_topk_output_offsets_are_int64():
    """The second top-K stream's offsets (slot · n · K + row · K + j) at 9M rows and K = 256 pass
    2^31; computed by the stats kernel's own helper in an interpreted probe kernel."""
    n_rows, top_k, base = 9_000_000, 256, 8_999_990
    out = torch.empty(16, 4, dtype=torch.int64, device="cuda" if CUDA else "cpu")
    _topk_offsets_probe[(1,)](out, 1, n_rows, top_k, base, BLOCK_N=16, K_PAD=4)
    want = torch.tensor([[(n_rows + base + i) * top_k + j for j in range(4)] for i in range(16)])
    assert torch.equal(out.cpu(), want)


# -- determinism (issue 17 point 4) ----------------------------------------------------------------


def _record_launches(monkeypatch):
    launched = []
    real_run = TritonBackend._run

    def run(kernel, grid, device, *args, **kw):
        launched.append((getattr(kernel, "fn", kernel).__name__, {k: v for k, v in kw.items() if k.startswith("NEED")}))
        real_run(kernel, grid, device, *args, **kw)

    monkeypatch.setattr(TritonBackend, "_run", staticmethod(run))
    return launched


def _fused_dopd_grads(backend, t, y, cfg):
    h, w, b = (leaf(t[k]) for k in ("student_hidden", "student_weight", "student_bias"))
    out = fused_linear_dopd_loss(h, LMHead(w, b, 1.2, 4.0), t["teacher_hidden"], t["teacher_weight"],
                                 t["priv_student_hidden"], y, config=cfg, backend=backend)
    out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("via", ["constructor", "torch-flag"])
def test_deterministic_mode_avoids_atomics_and_repeats_bitwise(via, monkeypatch):
    """Deterministic dW / db: the vocabulary-major `grad_dw_kernel` (full and tail-bucket rows) and
    the column-sorted `sparse_dw_kernel` (renormalized top-K rows) run, no kernel with float atomics
    gets dW / db, two runs agree bitwise, and both agree with float64. (The interpreter runs atomics
    in order, so bitwise repeatability alone could not tell the modes apart: hence the launch check.)"""
    t = linear_streams(20, 16, 60)
    y = random_tokens(20, 60, mask_frac=0.1)
    if via == "constructor":
        backend = TritonBackend(block_n=16, block_v=32, block_h=16, vocab_splits=3, deterministic=True)
    else:
        backend = SMALL_TILES
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    launched = _record_launches(monkeypatch)
    t64 = {k: v.double() for k, v in t.items()}
    for renorm in (False, True):
        cfg = DOPDConfig(top_k=6, topk_renorm=renorm, trim=0.1)
        out1, g1 = _fused_dopd_grads(backend, t, y, cfg)
        out2, g2 = _fused_dopd_grads(backend, t, y, cfg)
        assert len(set(out1.regime[y != IGNORE].tolist())) >= 3
        for a, b in zip(g1, g2):
            assert torch.equal(a, b)
        ref, g64 = _fused_dopd_grads("reference", t64, y, cfg)
        assert_close(out1.loss, ref.loss, rtol=RTOL, what="loss")
        for a, e, name in zip(g1, g64, ("dH", "dW", "db")):
            assert_close(a, e, rtol=RTOL, what=name)
    names = {name for name, _ in launched}
    assert {"grad_dw_kernel", "sparse_dw_kernel"} <= names, names
    for name, needs in launched:  # no kernel with float atomics ran with dW / db
        if name in ("grad_kernel", "sparse_grad_kernel"):
            assert not needs["NEED_DW"] and not needs["NEED_DB"], (name, needs)
