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
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from .errors import UsageError

_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """`write(f)` into a temporary sibling, flushed and fsynced to disk, then renamed over `path`: a
    crash (or power loss) leaves either the old file or the complete new one, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it, so a record reported as logged survives a crash."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file this package appended to. A last line cut short by a kill (no
    newline, or not JSON) is dropped with a warning; a damaged line before it is an error."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # `tail` is "" when the file ends with a newline
    records = []
    for lineno, line in enumerate(complete, 1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if lineno == len(complete) and not tail:
                warnings.warn(f"{path}:{lineno}: dropping a damaged last line ({exc})", stacklevel=2)
                break
            raise UsageError(f"{path}:{lineno}: not a JSON record ({exc}); the file is damaged") from exc
    if tail:
        warnings.warn(f"{path}:{len(complete) + 1}: dropping a partial last line (no newline; the writer was "
                      "interrupted)", stacklevel=2)
    return records


def rng_state() -> dict:
    """This process's sampling RNG state (torch, and CUDA where present)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(arm_dir: Path, step: int, student, optimizer, scheduler, rng_states: list[dict],
                    keep: int = 2, priv=None) -> Path:
    """Write `ckpt-<step>.pt` (to a temporary name, then rename) and keep the newest `keep`.
    `rng_states`: every rank's `rng_state()`, in rank order; `priv`: a privileged student that is a
    model of its own (frozen or EMA), saved with the rest."""
    state = {
        "step": step,
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
    }
    if priv is not None:
        state["priv_student"] = priv.state_dict()
    path = arm_dir / f"ckpt-{step:06d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    for old in sorted(checkpoints(arm_dir))[:-keep]:
        old.unlink()
    return path


def checkpoints(arm_dir: Path) -> list[Path]:
    return [p for p in arm_dir.iterdir() if _CKPT.match(p.name)] if arm_dir.is_dir() else []


CHECKPOINT_KEYS = ("step", "student", "optimizer", "scheduler", "rng")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's state; raises (any exception) if the file is truncated or otherwise unreadable."""
    state = torch.load(path, weights_only=False, map_location="cpu")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return state


def load_latest(arm_dir: Path, student, optimizer, scheduler, rank: int = 0, world: int = 1,
                priv=None) -> Optional[int]:
    """Restore the newest intact checkpoint into the given objects and rank `rank`'s RNG; return its
    step (None if there is no checkpoint). An unreadable newer checkpoint (a file damaged after it was
    written: the writes themselves are atomic) is skipped with a message naming the one used."""
    found = sorted(checkpoints(arm_dir))
    if not found:
        return None
    skipped = []
    for path in reversed(found):
        try:
            state = read_checkpoint(path)
            break
        except Exception as exc:  # torch.load raises many types on a torn file: all mean "unreadable"
            skipped.append(f"{path.name} ({type(exc).__name__}: {exc})")
    else:
        raise UsageError(f"--resume: no readable checkpoint in {arm_dir}: " + "; ".join(skipped))
    if rank == 0:
        note = f" (skipped the unreadable {', '.join(skipped)})" if skipped else ""
        print(f"resuming {arm_dir} from {path.name}, step {state['step']}{note}", file=sys.stderr)
    if len(state["rng"]) != world:
        raise UsageError(f"--resume: {path} was written by {len(state['rng'])} process(es); "
                         f"resume it with as many (this run has {world})")
    if (priv is not None) != ("priv_student" in state):
        raise UsageError(f"--resume: {path} was written with a different --priv-student")
    student.load_state_dict(state["student"])
    if priv is not None:
        priv.load_state_dict(state["priv_student"])
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
    kept = [r for r in read_jsonl(path) if r["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def save_pretrained_atomic(model, tokenizer, path: Path) -> None:
    """`save_pretrained` into a temporary sibling folder, then swap it in by renames."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder` and the folder itself (before it is renamed into place)."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)
