"""How much of the backward's contraction work the skip rule (`dopd_kernels/skipping.py`) saves on
realistic inputs, and what it costs in accuracy: the skipped fraction and the max gradient error
against the float64 reference, with and without skipping (full-vocabulary fused-linear OPD, `torch`
and `cpp` backends at their default tiles, one forward+backward per case). Counts and errors, no timings;
also the share of entries skipped whole (neither recomputed nor contracted: wide full-vocabulary rows) and
the matmul FLOPs counted (torch's FlopCounterMode; `cpp`: its extension's counter) over the dense floor
(4 projections per row: two forward projections, dH and dW), with and without skipping.

    python -m benchmarks.skipping_report [--n 256] [--h 512] [--v 32000,151936] [--kinds js,reverse_kl]
                                         [--inputs bench,peaked] [--backends torch,cpp]

Two input generators:
- `bench`: the benchmark suite's (`benchmarks/inputs.py`): a few Zipf-drawn candidates over a Gaussian
  floor, per-row entropies log-normal around 1.2 nats. Its floor sits only ~10–15 nats below the
  candidates and holds a measurable share of the mass.
- `peaked` (`peaked_streams`): LLM-like entropies (~1–2 nats) on 8 candidates over a floor ~25 nats
  below them, as a trained LM's bulk of unlikely tokens.
Besides the torch backend's own rule (row by row: each column block contracts the rows that keep it),
the report gives (with the torch contender) the fraction the same rule leaves at coarser row granularity
(the same block skipped for groups of 16 and 64 rows, as a GPU kernel's row tile would need), from the
float64 logit gradient.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from dopd_kernels import TorchBackend, fused_linear_opd_loss, opd_loss
from dopd_kernels.skipping import RowBudget, SkipCounter, tolerance

from .inputs import Case, make_inputs


def peaked_streams(n: int, h: int, v: int, gap: float = 1.0, dtype=torch.float32, candidates: int = 8) -> dict:
    """Fused-linear streams whose softmax looks like an LLM's: each row puts its mass on `candidates`
    tokens (random ids) with logits spread by ~1.5 nats (entropy ~1–2 nats) and a Gaussian floor over
    the rest of the vocabulary whose 256-column block maxima sit ~25·`gap` nats below them (h ≥ 32·candidates). Unit-norm
    weight rows; each hidden state is s · the least-norm solution of W[cand]·h = preferences, so the
    candidates' logits are exact and the floor is s·W_v·h ~ N(0, s²·|h|²). Teacher and privileged
    student: the same candidates with their own preferences (±1 nat); the teacher's head is the
    student's plus a little noise. Keys as `tests/conftest.linear_streams` (with biases)."""
    f64 = torch.float64
    w = torch.randn(v, h, dtype=f64)
    w /= w.norm(dim=1, keepdim=True)
    cand = torch.stack([torch.randperm(v)[:candidates] for _ in range(n)])
    pinv = torch.linalg.pinv(w[cand])  # [n, h, candidates]
    # The floor's std is ≈ s·sqrt(candidates / h) (near-orthogonal unit rows): a 256-column block's maximum
    # (≈ 2.7 std) sits 25·gap nats below the candidates' logits (≈ s) for this s.
    s = 25.0 * gap / (1.0 - 2.7 * (candidates / h) ** 0.5)
    pref = 1.0 + 0.03 * torch.randn(n, candidates, dtype=f64)

    def hidden(p):
        return s * torch.einsum("nhk,nk->nh", pinv, p)

    out = dict(student_hidden=hidden(pref), student_weight=w, teacher_weight=w + 0.002 * torch.randn_like(w),
               teacher_hidden=hidden(pref + 0.02 * torch.randn_like(pref)),
               priv_student_hidden=hidden(pref + 0.02 * torch.randn_like(pref)),
               student_bias=0.5 * torch.randn(v, dtype=f64), teacher_bias=0.5 * torch.randn(v, dtype=f64))
    return {k: x.to(dtype) for k, x in out.items()}


def bench_streams(n: int, h: int, v: int) -> dict:
    """The benchmark suite's inputs (`inputs.make_inputs`) under the keys of `peaked_streams` (no biases)."""
    x = make_inputs(Case("js", n, v, h))
    return dict(student_hidden=x.hs.detach(), student_weight=x.ws.detach(), teacher_hidden=x.ht, teacher_weight=x.wt)


def _grads(t: dict, backend, kind: str):
    """(dH, dW) of full-vocabulary fused-linear OPD (summed over rows) on streams `t`."""
    h, w = (t[k].detach().clone().requires_grad_(True) for k in ("student_hidden", "student_weight"))
    fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], torch.zeros(h.shape[0], dtype=torch.long),
                          student_bias=t.get("student_bias"), teacher_bias=t.get("teacher_bias"), divergence=kind,
                          granularity="full", reduction="sum", backend=backend).loss.backward()
    return h.grad, w.grad


def group_fractions(t: dict, kind: str, vocab_chunk: int, groups=(1, 16, 64)) -> dict:
    """The rule's skipped fraction with the same column block skipped for groups of rows (`rows<g>`), on
    the float64 logit gradient cut into the torch backend's tiles (one row chunk, `vocab_chunk` columns)."""
    f64 = torch.float64
    z = (t["student_hidden"].to(f64) @ t["student_weight"].to(f64).T).requires_grad_(True)
    zt = t["teacher_hidden"].to(f64) @ t["teacher_weight"].to(f64).T
    biased = (z + t["student_bias"].to(f64), zt + t["teacher_bias"].to(f64)) if "student_bias" in t else (z, zt)
    opd_loss(*biased, torch.zeros(z.shape[0], dtype=torch.long), divergence=kind, granularity="full", reduction="sum",
             backend="reference").loss.backward()
    n, v = z.grad.shape
    out = {}
    for rows in groups:
        budget, counter = RowBudget(n, v, tolerance(t["student_hidden"].dtype), z.device, rows=rows), SkipCounter()
        for c0 in range(0, v, vocab_chunk):
            tile = z.grad[:, c0:c0 + vocab_chunk]
            counter.add(budget.keep(tile), tile.shape[1])
        out[f"rows{rows}"] = counter.fraction
    return out


def _cpp(skip: bool):
    from dopd_kernels.backends.compiled import CppBackend

    return CppBackend(skip_negligible=skip)


BACKENDS = {"torch": lambda skip: TorchBackend(skip_negligible=skip), "cpp": _cpp}
PREFIX = {"torch": "", "cpp": "cpp_"}  # the torch contender's keys keep their names in results/cpu/skipping.json


def matmul_flops(backend, run: Callable[[], object]) -> tuple:
    """(what `run()` returns, the matmul FLOPs it performed): torch's FlopCounterMode for the torch backend,
    the extension's own counter for `cpp` (its GEMMs run inside the extension, unseen by torch)."""
    if isinstance(backend, TorchBackend):
        with FlopCounterMode(display=False) as counter:
            out = run()
        return out, counter.get_total_flops()
    backend.reset_matmul_flops()
    out = run()
    return out, backend.matmul_flops()


def contend(row: dict, name: str, t: dict, ref: tuple, kind: str) -> None:
    """Errors of backend `name` with skipping off and on into `row`, its skipped fraction, the share of entries
    skipped whole (neither recomputed nor contracted: wide full-vocabulary rows), the share of a JS value sweep's
    entries left unprojected, and its counted matmul FLOPs over the dense floor (4 projections of 2·n·V·H FLOPs)."""
    p = PREFIX[name]
    for skip in (False, True):
        backend = BACKENDS[name](skip)
        got, flops = matmul_flops(backend, lambda: _grads(t, backend, kind))
        for grad, a, r in zip(("dH", "dW"), got, ref):
            row[f"{p}{grad}_err_{'skip' if skip else 'dense'}"] = float((a.double() - r).abs().max() / r.abs().max())
        if skip:
            row[f"{p}skipped"] = backend.skip_counter.fraction
            row[f"{p}unformed"] = backend.skip_counter.unformed / max(backend.skip_counter.entries, 1)
            row[f"{p}value_unformed"] = backend.skip_counter.value_unformed / (row["n"] * row["v"])
        row[f"{p}flops_{'skip' if skip else 'dense'}_over_floor"] = flops / (4 * 2 * row["n"] * row["v"] * row["h"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--v", default="32000")
    ap.add_argument("--kinds", default="js,reverse_kl")
    ap.add_argument("--inputs", default="bench,peaked")
    ap.add_argument("--backends", default="torch,cpp")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    backends = args.backends.split(",")
    rows = []
    for v in map(int, args.v.split(",")):
        for inputs in args.inputs.split(","):
            t = bench_streams(args.n, args.h, v) if inputs == "bench" else peaked_streams(args.n, args.h, v)
            t64 = {k: x.double() for k, x in t.items()}
            for kind in args.kinds.split(","):
                ref = _grads(t64, "reference", kind)
                row = dict(inputs=inputs, kind=kind, n=args.n, h=args.h, v=v)
                for name in backends:
                    contend(row, name, t, ref, kind)
                if "torch" in backends:
                    row.update(group_fractions(t, kind, TorchBackend().vocab_chunk))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if "torch" in backends:
        print("\n| inputs | divergence | V | skipped (row by row) | skipped whole | value sweep left out | 16-row groups | 64-row groups | counted FLOPs / dense floor, dense → skip | max dH err dense → skip | max dW err dense → skip |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['inputs']} | {r['kind']} | {r['v']} | {r['skipped']:.1%} | {r['unformed']:.1%} | "
                  f"{r['value_unformed']:.1%} | {r['rows16']:.1%} | "
                  f"{r['rows64']:.1%} | {r['flops_dense_over_floor']:.2f} → {r['flops_skip_over_floor']:.2f} | "
                  f"{r['dH_err_dense']:.2e} → {r['dH_err_skip']:.2e} | {r['dW_err_dense']:.2e} → {r['dW_err_skip']:.2e} |")
    if "cpp" in backends:
        print("\n| inputs | divergence | V | cpp skipped | skipped whole | value sweep left out | counted FLOPs / dense floor, dense → skip | max dH err dense → skip | max dW err dense → skip |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['inputs']} | {r['kind']} | {r['v']} | {r['cpp_skipped']:.1%} | {r['cpp_unformed']:.1%} | "
                  f"{r['cpp_value_unformed']:.1%} | "
                  f"{r['cpp_flops_dense_over_floor']:.2f} → {r['cpp_flops_skip_over_floor']:.2f} | "
                  f"{r['cpp_dH_err_dense']:.2e} → {r['cpp_dH_err_skip']:.2e} | "
                  f"{r['cpp_dW_err_dense']:.2e} → {r['cpp_dW_err_skip']:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
