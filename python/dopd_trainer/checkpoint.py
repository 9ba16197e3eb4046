"""Run-folder files written so that a kill at any moment leaves a resumable state.

A checkpoint holds everything the loop's future depends on: student weights, optimizer and schedule
state, the step, and the torch RNG state that drives sampling (one per data-parallel rank). The data
order is a pure function of the step (see `train.batch_indices`), so restoring these reproduces an
uninterrupted run exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .errors import UsageError

_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rng_state() -> dict:
    """This process's sampling RNG state (torch, and CUDA where present)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(arm_dir: Path, step: int, student, optimizer, scheduler, rng_states: list[dict],
                    keep: int = 2) -> Path:
    """Write `ckpt-<step>.pt` (to a temporary name, then rename) and keep the newest `keep`.
    `rng_states`: every rank's `rng_state()`, in rank order."""
    state = {
        "step": step,
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
    }
    path = arm_dir / f"ckpt-{step:06d}.pt"
    tmp = arm_dir / f".ckpt-{step:06d}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(checkpoints(arm_dir))[:-keep]:
        old.unlink()
    return path


def checkpoints(arm_dir: Path) -> list[Path]:
    return [p for p in arm_dir.iterdir() if _CKPT.match(p.name)] if arm_dir.is_dir() else []


def load_latest(arm_dir: Path, student, optimizer, scheduler, rank: int = 0, world: int = 1) -> Optional[int]:
    """Restore the newest checkpoint into the given objects and rank `rank`'s RNG; return its step
    (None if none)."""
    found = sorted(checkpoints(arm_dir))
    if not found:
        return None
    state = torch.load(found[-1], weights_only=False)
    if len(state["rng"]) != world:
        raise UsageError(f"--resume: {found[-1]} was written by {len(state['rng'])} process(es); "
                         f"resume it with as many (this run has {world})")
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"][rank]["torch"])
    if state["rng"][rank]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"][rank]["cuda"])
    return state["step"]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (written before a kill, past the checkpoint being resumed)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def save_pretrained_atomic(model, tokenizer, path: Path) -> None:
    """`save_pretrained` into a temporary sibling folder, then swap it in by renames."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
