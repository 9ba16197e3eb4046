"""The compiled extension never breaks the library (issue 15, point 1).

A cache directory that cannot be created, a build lock held too long, a failed build or load: the
`cpp` backend becomes unavailable with one warning saying why and how to fix it, and `backend="auto"`
falls back to `torch`. The build lock is an `flock`, released when its holder dies: a builder killed
with `kill -9` (which leaves torch's own lock file behind) does not block the next process. Two
first builds at once are safe.

Each case runs in a fresh Python process (the extension is loaded once per process). Only the
concurrency test builds from scratch; the others fail before building or reuse a copy of the
extension this session has built.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dopd_kernels import _build

ROOT = Path(__file__).resolve().parent.parent

# Loads the library, lists the backends, resolves "auto", runs a loss forward and backward through
# it and forces "cpp"; prints what it saw (and the dopd_kernels warnings) as one JSON line.
PROBE = r"""
import json, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from dopd_kernels import opd_loss
    from dopd_kernels.backends import available_backends, resolve_backend
    names = available_backends()
    auto = resolve_backend("auto", torch.device("cpu")).name
    g = torch.Generator().manual_seed(7)
    zs = torch.randn(6, 11, generator=g, requires_grad=True)
    zt, y = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)
    out = opd_loss(zs, zt, y, divergence="js", backend="auto")
    out.loss.backward()
    try:
        resolve_backend("cpp", torch.device("cpu"))
        forced = None
    except RuntimeError as e:
        forced = str(e)
warned = [str(w.message) for w in caught if "dopd_kernels" in str(w.message)]
print(json.dumps({"names": names, "auto": auto, "warnings": warned, "forced": forced, "loss": float(out.loss),
                  "grad_finite": bool(torch.isfinite(zs.grad).all())}))
"""

# Takes the build lock of the `cpu` cache entry, leaves torch's lock file inside it as a build in
# progress does, says so, and sleeps (until killed).
HOLD_LOCK = r"""
import sys, time
from dopd_kernels._build import build_lock, build_spec
d = build_spec("cpu").directory
with build_lock(d, 10.0):
    (d / "lock").touch()
    print("held", flush=True)
    time.sleep(600)
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOPD_KERNELS_CACHE", "DOPD_KERNELS_NO_BUILD", "DOPD_KERNELS_BUILD_TIMEOUT", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _probe(timeout: float = 300, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], env=_env(**env), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_fell_back(seen: dict, *needles: str) -> None:
    assert "cpp" not in seen["names"] and "torch" in seen["names"]
    assert seen["auto"] == "torch"
    assert seen["grad_finite"]
    assert len(seen["warnings"]) == 1, seen["warnings"]  # one warning, however many calls
    for needle in needles:
        assert needle in seen["warnings"][0], seen["warnings"][0]
        assert needle in seen["forced"]


@pytest.fixture
def regular_file(tmp_path: Path) -> Path:
    f = tmp_path / "not-a-directory"
    f.write_text("a file where a directory is expected\n")
    return f


def test_cache_path_under_a_regular_file_falls_back(regular_file):
    _assert_fell_back(_probe(DOPD_KERNELS_CACHE=str(regular_file / "cache")), "DOPD_KERNELS_CACHE", str(regular_file))


def test_home_under_a_regular_file_falls_back(regular_file):
    _assert_fell_back(_probe(HOME=str(regular_file / "home")), "DOPD_KERNELS_CACHE")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories; the regular-file cases cover the failure")
def test_read_only_cache_dir_falls_back(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _assert_fell_back(_probe(DOPD_KERNELS_CACHE=str(ro)), "DOPD_KERNELS_CACHE")
    finally:
        ro.chmod(0o700)


@pytest.fixture(scope="module")
def built_entry() -> Path:
    """The `cpu` cache entry of the current sources, built (or found) by this process."""
    try:
        import dopd_kernels._C_cpu  # noqa: F401
        pytest.skip("an ahead-of-time build is installed: the JIT cache is not used")
    except ImportError:
        pass
    if os.environ.get("DOPD_KERNELS_NO_BUILD", "0") not in ("", "0"):
        pytest.skip("compiled extension disabled (DOPD_KERNELS_NO_BUILD)")
    _build.load_extension("cpu")
    return _build.build_spec("cpu").directory


def _copy_entry(entry: Path, root: Path) -> Path:
    target = root / entry.name
    shutil.copytree(entry, target, ignore=shutil.ignore_patterns("lock", _build.LOCK_NAME))
    return target


def _hold_lock(root: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK], env=_env(DOPD_KERNELS_CACHE=str(root)),
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout.readline().strip() == "held"
    return child


def test_lock_of_a_killed_builder_does_not_block(built_entry, tmp_path):
    """A builder killed with SIGKILL mid-build leaves torch's `lock` file behind (before the fix every
    later process waited on it forever); the flock died with it, and the next load goes through."""
    root = tmp_path / "cache"
    entry = _copy_entry(built_entry, root)
    child = _hold_lock(root)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    assert (entry / "lock").exists()  # what a killed build leaves
    seen = _probe(timeout=300, DOPD_KERNELS_CACHE=str(root))
    assert seen["warnings"] == [] and seen["auto"] == "cpp" and "cpp" in seen["names"]
    assert not (entry / "lock").exists()


def test_lock_held_by_a_live_process_times_out_with_a_message(tmp_path):
    root = tmp_path / "cache"
    child = _hold_lock(root)
    try:
        seen = _probe(DOPD_KERNELS_CACHE=str(root), DOPD_KERNELS_BUILD_TIMEOUT="1")
    finally:
        child.kill()
        child.wait(timeout=60)
    _assert_fell_back(seen, "build lock", "DOPD_KERNELS_BUILD_TIMEOUT")


def test_two_concurrent_first_builds(tmp_path):
    """Two processes start on an empty cache at once: one builds, the other waits for the lock and
    loads the result; both run the `cpp` backend with the same result and no warning."""
    if os.environ.get("DOPD_KERNELS_NO_BUILD", "0") not in ("", "0"):
        pytest.skip("compiled extension disabled (DOPD_KERNELS_NO_BUILD)")
    root = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=_env(DOPD_KERNELS_CACHE=str(root)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    seen = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        seen.append(json.loads(out.strip().splitlines()[-1]))
    for s in seen:
        assert s["warnings"] == [] and s["auto"] == "cpp" and s["forced"] is None and s["grad_finite"]
    assert seen[0]["loss"] == seen[1]["loss"]
    assert len([p for p in root.iterdir() if p.is_dir()]) == 1  # one cache entry, built once
