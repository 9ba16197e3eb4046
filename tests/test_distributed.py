"""Vocabulary-parallel losses and global-batch routing across gloo processes on CPU.

Each (backend, world size) is one spawn: the workers run every case on their vocabulary shard (or
batch slice) and save what they computed; the parent compares with the single-process result of
the same backend on the same inputs. Inputs come from a seed drawn fresh for every run. The Triton
backend runs interpreted on CPU (the workers set TRITON_INTERPRET before importing it).
"""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dopd_kernels import DOPDConfig, TorchBackend, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss, token_logprobs

N, V, H = 24, 37, 8  # V = 37 splits unevenly over 2 and 4 ranks
OPD_CASES = [dict(divergence=d, granularity=g, top_k=5, topk_renorm=r)
             for d, g, r in [("reverse_kl", "full", True), ("js", "full", True), ("forward_kl", "topk", False),
                             ("reverse_kl", "topk", True), ("js", "sampled", True), ("reverse_kl", "sampled", True)]]


def make_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g)
    ws, bs = torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    ht, wt = torch.randn(N, H, generator=g), ws + 0.7 * torch.randn(V, H, generator=g)
    hp = hs + 0.4 * torch.randn(N, H, generator=g)
    tokens = torch.randint(0, 30, (N,), generator=g)
    tokens[:6] = -100  # the first rank of the routing split (6 tokens each at world 4) is fully masked
    tokens[9] = -100
    # Logits on a grid of 1/4 (exact in any dtype): top-K sets tied at the K-th place, ties across shards.
    tied = [torch.randint(-5, 6, (N, V), generator=g) / 4 for _ in range(2)]
    return dict(hs=hs, ws=ws, bs=bs, ht=ht, wt=wt, hp=hp, tokens=tokens, tied_s=tied[0], tied_t=tied[1])


def shard_bounds(world: int):
    sizes = [V // world + (1 if r < V % world else 0) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def make_backend(name: str):
    """The backend under test, with tiles small enough that a shard spans several of them."""
    if name == "torch":
        return TorchBackend(row_chunk=5, vocab_chunk=6)
    if name == "cpp":
        from dopd_kernels.backends.compiled import CppBackend

        return CppBackend(row_chunk=5, vocab_chunk=6)
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported in this process
    from dopd_kernels.backends.triton_backend import TritonBackend

    return TritonBackend(block_n=16, block_v=16, block_h=16, vocab_splits=2)


def compute_all(x, backend, lo=0, hi=V, group=None, routing_rows=None, routing_group=None):
    """Every case on columns [lo, hi) (and rows `routing_rows` for the routing case)."""
    out = {}
    cfg = DOPDConfig(top_k=6, temperature=0.9, valid_vocab=33)
    hs, ws, bs = (x[k].clone().requires_grad_() for k in ("hs", "ws", "bs"))
    res = fused_linear_dopd_loss(hs, ws[lo:hi], x["ht"], x["wt"][lo:hi], x["hp"], x["tokens"], student_bias=bs[lo:hi],
                                 config=cfg, backend=backend, vocab_parallel_group=group)
    res.loss.backward()
    out["linear"] = (res.loss.detach(), res.per_token_loss, res.regime, hs.grad, ws.grad[lo:hi], bs.grad[lo:hi])

    zs = (x["hs"] @ x["ws"].T).requires_grad_()
    zt, zp = x["ht"] @ x["wt"].T, x["hp"] @ x["ws"].T
    with torch.no_grad():
        zs_local = zs[:, lo:hi].clone()
    zs_local.requires_grad_()
    res = dopd_loss(zs_local, zt[:, lo:hi], zp[:, lo:hi], x["tokens"], config=cfg.replace(topk_renorm=False),
                    backend=backend, vocab_parallel_group=group)
    res.loss.backward()
    out["logits"] = (res.loss.detach(), res.per_token_loss, res.regime, zs_local.grad)

    for i, case in enumerate(OPD_CASES):
        hs = x["hs"].clone().requires_grad_()
        res = fused_linear_opd_loss(hs, x["ws"][lo:hi], x["ht"], x["wt"][lo:hi], x["tokens"], backend=backend,
                                    vocab_parallel_group=group, **case)
        res.loss.backward()
        out[f"opd{i}"] = (res.loss.detach(), res.per_token_loss, hs.grad)
        res = opd_loss(zs_local.detach(), zt[:, lo:hi], x["tokens"], backend=backend, vocab_parallel_group=group, **case)
        out[f"opd_logits{i}"] = (res.loss.detach(), res.per_token_loss)

    for source in ("student", "target"):  # equal values go to the lower column, whichever shard holds it
        res = opd_loss(x["tied_s"][:, lo:hi], x["tied_t"][:, lo:hi], x["tokens"], granularity="topk", top_k=5,
                       topk_from=source, backend=backend, vocab_parallel_group=group)
        out[f"opd_ties_{source}"] = (res.loss.detach(), res.per_token_loss)

    out["logprobs"] = (token_logprobs(x["hs"], x["tokens"], x["ws"][lo:hi], x["bs"][lo:hi], backend=backend,
                                      vocab_parallel_group=group),)

    rows = slice(None) if routing_rows is None else routing_rows
    res = dopd_loss(zs.detach()[rows], zt[rows], zp[rows], x["tokens"][rows], config=DOPDConfig(top_k=6),
                    backend=backend, routing_group=routing_group)
    out["routing"] = (torch.stack(list(res.thresholds)), res.regime, res.per_token_loss)
    return out


def worker(rank: int, world: int, port: int, seed: int, path: str, backend_name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    lo, hi = shard_bounds(world)[rank]
    per_rank = N // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    out = compute_all(make_inputs(seed), make_backend(backend_name), lo, hi, dist.group.WORLD, rows, dist.group.WORLD)
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))
    # Leave together: a rank that destroys its group while a peer still talks to it makes the peer
    # abort at exit (half of the runs without this barrier, with any backend).
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend_name, world", [("torch", 2), ("torch", 4), ("cpp", 2), ("triton", 2)])
def test_sharded_equals_single_process(backend_name, world, tmp_path, monkeypatch):
    if backend_name == "triton" and not torch.cuda.is_available():
        # make_backend sets TRITON_INTERPRET for the workers; in this process it is restored after the test,
        # so that later modules' backend="auto" still picks a CPU backend.
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        backend = make_backend(backend_name)
    except (ImportError, RuntimeError) as err:  # no compiler / no triton in this environment
        pytest.skip(f"backend {backend_name!r} unavailable: {err}")
    seed = random.randrange(2**31)
    mp.spawn(worker, args=(world, free_port(), seed, str(tmp_path), backend_name), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    want = compute_all(make_inputs(seed), backend)
    # fp32 sums taken in another order; the tail-bucket mass 1 − Σ_K p cancels, hence atol 1e-5.
    close = dict(rtol=2e-5, atol=1e-5)
    msg = f"seed={seed} world={world} backend={backend_name}"
    bounds = shard_bounds(world)
    for rank, out in enumerate(got):
        lo, hi = bounds[rank]
        loss, per_tok, regime, dh, dw, db = out["linear"]
        w = want["linear"]
        torch.testing.assert_close(loss, w[0], **close, msg=msg)
        torch.testing.assert_close(per_tok, w[1], **close, msg=msg)
        assert torch.equal(regime, w[2]), msg
        torch.testing.assert_close(dh, w[3], **close, msg=msg)  # reduced over the group
        torch.testing.assert_close(dw, w[4][lo:hi], **close, msg=msg)
        torch.testing.assert_close(db, w[5][lo:hi], **close, msg=msg)
        loss, per_tok, regime, dz = out["logits"]
        w = want["logits"]
        torch.testing.assert_close(loss, w[0], **close, msg=msg)
        torch.testing.assert_close(per_tok, w[1], **close, msg=msg)
        assert torch.equal(regime, w[2]), msg
        torch.testing.assert_close(dz, w[3][:, lo:hi], **close, msg=msg)
        for key in [k for k in want if k.startswith("opd") or k == "logprobs"]:
            for a, b in zip(out[key], want[key]):
                torch.testing.assert_close(a, b, **close, msg=f"{msg} {key}")
    # Routing over the data-parallel group equals routing the whole batch in one process.
    thresholds, regime, per_tok = want["routing"]
    for rank, out in enumerate(got):
        torch.testing.assert_close(out["routing"][0], thresholds, rtol=1e-12, atol=0, msg=msg)
    torch.testing.assert_close(torch.cat([o["routing"][1] for o in got]), regime, rtol=0, atol=0, msg=msg)
    torch.testing.assert_close(torch.cat([o["routing"][2] for o in got]), per_tok, **close, msg=msg)
    if world == 4:  # rank 0's tokens are all masked: it still joined the collective and has loss 0
        assert bool((got[0]["routing"][1] == -1).all()) and float(got[0]["routing"][2].abs().sum()) == 0.0
