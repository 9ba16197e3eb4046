"""One run of each GPU path that issues 16 and 17 fixed, checked against the float64 `reference`
backend on fresh random inputs; `benchmarks/gpu_check.sh` runs it on a lent CUDA machine.

    python benchmarks/gpu_paths.py [--out DIR]            CUDA sizes; every check SKIPs without a GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_paths.py --smoke   the same checks on CPU at tiny sizes
                                                          (the interpreted triton backend only)

Checks (each PASS / FAIL / SKIP with its reason; `--only NAME` runs one):

  topk512_linear_bf16   fused-linear DOPD and OPD in bf16 with a top-K of 512 (K > MAX_TOPK: the
                        triton backend runs it on the torch backend), both `topk_from`
  mixed_dtype_full      full-vocabulary passes with a bf16 student, fp32 teacher and fp16 privileged
                        student (DOPD HT rows, full OPD JS), logits and fused-linear, triton and cuda
  device_guard          inputs on cuda:1 while cuda:0 is current (needs two GPUs)
  deterministic         `TritonBackend(deterministic=True)`: two runs give bitwise-equal gradients;
                        its time against the default (atomic) mode at one size
  head_transforms       LMHead scale and soft-cap on every stream, DOPD and full JS, triton and cuda

Accuracy: a backend's error against the reference must not exceed twice the `torch` backend's error
on the same inputs (the naive same-dtype baseline) plus a small margin (1e-4 relative for the loss,
one eps of the input dtype for gradients, which are stored in it); fp32 inputs are held to 1e-5 relative. Writes `gpu_paths.json` (one record per
check and backend: errors, seconds, reason) to `--out`; exits 1 if any check FAILs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import traceback
from typing import Callable, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dopd_kernels as dk  # noqa: E402
from dopd_kernels import LMHead  # noqa: E402

# (N tokens, V vocabulary, H hidden) per mode of the script.
SIZES = {"cuda": dict(n=512, v=32768, h=1024), "smoke": dict(n=24, v=300, h=32)}


class Skip(Exception):
    """A check that cannot run here, with the reason."""


def _rel(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ in float64 (NaN anywhere gives inf)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Paths:
    """The checks; `dev` is the device the inputs live on, `cuda_name` the compiled GPU backend."""

    def __init__(self, smoke: bool, out_dir: str):
        self.smoke = smoke
        self.out_dir = out_dir
        self.dev = torch.device("cpu" if smoke else "cuda")
        self.size = SIZES["smoke" if smoke else "cuda"]
        self.records: List[dict] = []
        # Smoke mode runs the interpreted triton backend only: building the cpp extension (the CPU
        # stand-in for cuda) takes minutes on a small machine and is the CPU test suite's business.
        self.available = ["triton"] if smoke and os.environ.get("TRITON_INTERPRET") == "1" else \
            ([] if smoke else dk.available_backends())
        self.backends = [b for b in ("triton", "cuda") if b in self.available]
        self.missing = {b: "not available here" for b in ("triton", "cuda") if b not in self.available}

    # -- inputs ----------------------------------------------------------------------------------

    def linear(self, dtypes=("bfloat16",) * 3, bias: bool = True, heads=None, v: Optional[int] = None):
        """Fused-linear streams [(hidden [N, H], weight or LMHead)] (student first, correlated with it),
        the student's leaves, and tokens [N]; `heads` = [(scale, softcap)] per stream or None."""
        n, h = self.size["n"], self.size["h"]
        v = v or self.size["v"]
        g = torch.Generator(device="cpu").manual_seed(int(time.time_ns() % 2**31))
        hs = torch.randn(n, h, generator=g, dtype=torch.float64)
        ws = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h ** 0.5)
        streams, leaves = [], []
        for i, dt in enumerate(dtypes):
            dt = getattr(torch, dt)
            hid = hs if i == 0 else hs + 0.5 * torch.randn(n, h, generator=g, dtype=torch.float64)
            w = ws if i == 0 else ws + 0.5 * torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5
            b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
            hid, w = hid.to(self.dev, dt), w.to(self.dev, dt)
            b = b.to(self.dev, dt) if b is not None else None
            if i == 0:
                hid, w = hid.requires_grad_(), w.requires_grad_()
                b = b.requires_grad_() if b is not None else None
                leaves = [t for t in (hid, w, b) if t is not None]
            head = LMHead(w, b, *heads[i]) if heads else (w, b)
            streams.append((hid, head))
        tokens = torch.randint(0, v, (n,), generator=g).to(self.dev)
        return streams, leaves, tokens

    def logits(self, dtypes=("bfloat16",) * 3):
        """Logits [N, V] per stream (student leaf first) and tokens [N]."""
        n, v = self.size["n"], self.size["v"]
        s = 2.0 * torch.randn(n, v, dtype=torch.float64)
        out = []
        for i, dt in enumerate(dtypes):
            z = s if i == 0 else s + 0.8 * torch.randn_like(s)
            z = z.to(self.dev, getattr(torch, dt))
            out.append(z.requires_grad_() if i == 0 else z)
        return out, torch.randint(0, v, (n,)).to(self.dev)

    # -- running and judging -----------------------------------------------------------------------

    @staticmethod
    def _call_linear(fn, streams, tokens, backend, **kw):
        """`fused_linear_{dopd,opd}_loss` on streams from `linear()` (LMHeads or (weight, bias))."""
        args, named = [], {}
        prefixes = ("student", "teacher", "priv_student")
        for (hid, head), prefix in zip(streams, prefixes):
            w, b = (head, None) if isinstance(head, LMHead) else head
            if prefix == "priv_student":
                named.update(priv_student_weight=w, priv_student_bias=b)
                args.insert(4, hid)
            else:
                args += [hid, w]
                named[f"{prefix}_bias"] = b
        if len(streams) == 3:
            args = args[:4] + [streams[2][0]]
        return fn(*args, tokens, backend=backend, **named, **kw)

    def compare(self, check: str, run: Callable[[object], torch.Tensor], leaves, dtype: torch.dtype,
                backends: Optional[List[object]] = None) -> None:
        """Run `run(backend)` (returns the loss; gradients land in `leaves`) for the reference, torch
        and each GPU backend; record each backend's loss and gradient errors against the reference."""
        def once(backend):
            for t in leaves:
                t.grad = None
            t0 = time.time()
            loss = run(backend)
            loss.backward()
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            return loss.detach(), [None if t.grad is None else t.grad.clone() for t in leaves], time.time() - t0

        ref_loss, ref_grads, _ = once("reference")
        base_loss, base_grads, _ = once("torch")
        base = (_rel(base_loss, ref_loss), max(_rel(a, b) for a, b in zip(base_grads, ref_grads)))
        fp32 = dtype == torch.float32
        # Gradients are stored in the input dtype: a bf16 gradient differs from the reference's by
        # whole ulps (2^-8 relative) wherever the fp32 sums differ in their last bits, so the
        # gradient margin is one eps of that dtype.
        tol = (1e-5, 1e-5) if fp32 else (2 * base[0] + 1e-4, 2 * base[1] + torch.finfo(dtype).eps)
        for backend in backends or self.backends:
            name = backend if isinstance(backend, str) else repr(backend)
            rec = dict(check=check, backend=name, torch_err=base)
            try:
                loss, grads, secs = once(backend)
                err = (_rel(loss, ref_loss), max(_rel(a, b) for a, b in zip(grads, ref_grads)))
                rec.update(loss_err=err[0], grad_err=err[1], tol=tol, seconds=round(secs, 3),
                           status="PASS" if err[0] <= tol[0] and err[1] <= tol[1] else "FAIL")
            except Exception as e:  # noqa: BLE001 — a failing path is the finding, recorded with its trace
                rec.update(status="FAIL", reason=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
            self.records.append(rec)
        for name, why in self.missing.items():
            self.records.append(dict(check=check, backend=name, status="SKIP", reason=why))

    # -- the checks --------------------------------------------------------------------------------

    def topk512_linear_bf16(self):
        streams, leaves, tokens = self.linear(v=max(self.size["v"], 600))
        for frm in ("student", "target"):
            cfg = dk.DOPDConfig(top_k=512, topk_from=frm, topk_renorm=frm == "student")
            self.compare(f"topk512_linear_bf16 dopd from={frm}",
                         lambda b: self._call_linear(dk.fused_linear_dopd_loss, streams, tokens, b, config=cfg).loss,
                         leaves, torch.bfloat16, ["triton"] if "triton" in self.backends else [])
        self.compare("topk512_linear_bf16 opd js topk tail",
                     lambda b: self._call_linear(dk.fused_linear_opd_loss, streams[:2], tokens, b, divergence="js",
                                                 granularity="topk", top_k=512, topk_renorm=False).loss,
                     leaves, torch.bfloat16, ["triton"] if "triton" in self.backends else [])

    def mixed_dtype_full(self):
        dts = ("bfloat16", "float32", "float16")
        logits, tokens = self.logits(dts)
        cfg = dk.DOPDConfig(beta_strong=1.0)
        self.compare("mixed_dtype_full logits dopd", lambda b: dk.dopd_loss(*logits, tokens, config=cfg, backend=b).loss,
                     logits[:1], torch.bfloat16)
        self.compare("mixed_dtype_full logits opd js full",
                     lambda b: dk.opd_loss(logits[0], logits[1], tokens, divergence="js", backend=b).loss,
                     logits[:1], torch.bfloat16)
        streams, leaves, tokens = self.linear(dts)
        self.compare("mixed_dtype_full linear dopd",
                     lambda b: self._call_linear(dk.fused_linear_dopd_loss, streams, tokens, b, config=cfg).loss,
                     leaves, torch.bfloat16)
        self.compare("mixed_dtype_full linear opd forward_kl full",
                     lambda b: self._call_linear(dk.fused_linear_opd_loss, streams[:2], tokens, b,
                                                 divergence="forward_kl").loss, leaves, torch.bfloat16)

    def device_guard(self):
        if self.smoke or torch.cuda.device_count() < 2:
            raise Skip(f"needs two CUDA devices, found {torch.cuda.device_count()}")
        self.dev = torch.device("cuda", 1)
        try:
            with torch.cuda.device(0):
                streams, leaves, tokens = self.linear()
                self.compare("device_guard cuda:1 linear dopd",
                             lambda b: self._call_linear(dk.fused_linear_dopd_loss, streams, tokens, b).loss,
                             leaves, torch.bfloat16)
                logits, tokens = self.logits()
                self.compare("device_guard cuda:1 logits opd js full",
                             lambda b: dk.opd_loss(logits[0], logits[1], tokens, divergence="js", backend=b).loss,
                             logits[:1], torch.bfloat16)
        finally:
            self.dev = torch.device("cuda")

    def deterministic(self):
        if "triton" not in self.backends:
            raise Skip("the triton backend is not available")
        from dopd_kernels.backends.triton_backend import TritonBackend
        if "deterministic" not in inspect.signature(TritonBackend).parameters:
            raise Skip("TritonBackend has no deterministic mode in this tree")
        det = TritonBackend(deterministic=True)
        streams, leaves, tokens = self.linear()
        cfg = dk.DOPDConfig(topk_from="target", topk_renorm=False)
        runs = {
            "dopd": lambda b: self._call_linear(dk.fused_linear_dopd_loss, streams, tokens, b, config=cfg).loss,
            "opd js full": lambda b: self._call_linear(dk.fused_linear_opd_loss, streams[:2], tokens, b,
                                                       divergence="js").loss,
        }
        for what, run in runs.items():
            self.compare(f"deterministic linear {what}", run, leaves, torch.bfloat16, [det])
            grads = []
            for _ in range(2):
                for t in leaves:
                    t.grad = None
                run(det).backward()
                grads.append([t.grad.clone() for t in leaves])
            same = all(torch.equal(a, b) for a, b in zip(*grads))
            self.records.append(dict(check=f"deterministic linear {what} bitwise", backend=repr(det),
                                     status="PASS" if same else "FAIL",
                                     reason=None if same else "two runs gave different gradients"))
            self.records.append(dict(check=f"deterministic linear {what} cost", backend="triton", status="INFO",
                                     seconds={name: self._median_time(run, b, leaves)
                                              for name, b in (("atomic", TritonBackend()), ("deterministic", det))}))

    def _median_time(self, run, backend, leaves, rounds: int = 3) -> float:
        """Median forward+backward seconds of `rounds` calls after one warm-up call."""
        times = []
        for i in range(rounds + 1):
            for t in leaves:
                t.grad = None
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            run(backend).backward()
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.time() - t0)
        return round(sorted(times)[len(times) // 2], 4)

    def head_transforms(self):
        heads = [(1.6, 30.0), (0.6, 25.0), (1.3, None)]
        streams, leaves, tokens = self.linear(heads=heads)
        self.compare("head_transforms linear dopd",
                     lambda b: self._call_linear(dk.fused_linear_dopd_loss, streams, tokens, b).loss,
                     leaves, torch.bfloat16)
        self.compare("head_transforms linear opd js full",
                     lambda b: self._call_linear(dk.fused_linear_opd_loss, streams[:2], tokens, b, divergence="js").loss,
                     leaves, torch.bfloat16)
        self.compare("head_transforms linear opd reverse_kl topk tail",
                     lambda b: self._call_linear(dk.fused_linear_opd_loss, streams[:2], tokens, b, granularity="topk",
                                                 topk_renorm=False).loss, leaves, torch.bfloat16)


CHECKS = ("topk512_linear_bf16", "mixed_dtype_full", "device_guard", "deterministic", "head_transforms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_paths.json (default $OUT, else .)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (needs TRITON_INTERPRET=1 for triton)")
    ap.add_argument("--only", choices=CHECKS, help="run one check")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    paths = Paths(args.smoke, args.out)
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, devices=torch.cuda.device_count(),
               backends=paths.available)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print(f"gpu_paths: {env}")
    for name in [args.only] if args.only else CHECKS:
        t0 = time.time()
        try:
            if not args.smoke and not torch.cuda.is_available():
                raise Skip("no CUDA device")
            getattr(paths, name)()
        except Skip as e:
            paths.records.append(dict(check=name, backend="-", status="SKIP", reason=str(e)))
        except Exception as e:  # noqa: BLE001 — one broken check must not hide the others
            paths.records.append(dict(check=name, backend="-", status="FAIL", reason=f"{type(e).__name__}: {e}",
                                      trace=traceback.format_exc()[-2000:]))
        print(f"  {name}: {time.time() - t0:.1f} s", flush=True)
    with open(os.path.join(args.out, "gpu_paths.json"), "w") as f:
        json.dump(dict(env=env, records=paths.records), f, indent=1, default=str)
    for r in paths.records:
        errs = f"loss {r['loss_err']:.2e} grad {r['grad_err']:.2e} (tol {r['tol'][0]:.1e}/{r['tol'][1]:.1e})" \
            if "loss_err" in r else ""
        extra = r.get("reason") or (r.get("seconds") if r["status"] == "INFO" else "") or ""
        print(f"{r['status']:<5} {r['check']:<48} {r['backend']:<28} {errs} {extra}")
    failed = [r for r in paths.records if r["status"] == "FAIL"]
    print(f"gpu_paths: {sum(r['status'] == 'PASS' for r in paths.records)} passed, {len(failed)} failed, "
          f"{sum(r['status'] == 'SKIP' for r in paths.records)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
