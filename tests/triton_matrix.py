"""The sm_90a / sm_80 compile check of `triton_sm90.py` under several Triton versions (issue 16).

A user's Triton is the one their CUDA build of torch pins (torch 2.8 → 3.4.0, 2.9 → 3.5.x,
2.10 → 3.6.0, 2.11 → 3.6.0, ... 2.13 → 3.9.0), not the newest, and each version's compiler
accepts different tiles. This script records the kernel launches once, with the Triton of the
running environment under the interpreter, and compiles that one recording with each version's own
compiler, each in its own virtual environment that holds nothing but `triton==<version>` (the
compile step needs no torch):

    python tests/triton_matrix.py                        # versions 3.4.0 3.6.0 3.9.0, sm_90a and sm_80
    python tests/triton_matrix.py --versions 3.5.1 3.8.0 --capabilities 90

The environments live under `--envs` (default `$DOPD_TRITON_ENVS`, else `/tmp/triton-envs`, outside
the repository); a missing one is created with `python -m venv` and `pip install triton==<version>`
(about 10 s each from PyPI). Prints one table row per version × capability and every failing
variant with its error and the API call that produced it; exits 1 when any variant fails to compile
or exceeds shared memory, or spills registers on sm_90a (on other capabilities spills are reported
only: the tile defaults are chosen for Hopper).

After a tile-rule change, `--skip-known SPECS RESULTS` (the recording and the `--json` output of an
earlier run) compiles only the launches that are new: a launch whose `spec_key` (kernel, dtypes,
constexprs, warps, stages) matches one that compiled cleanly under the same version and capability
in RESULTS is taken from there, since identical inputs give an identical compile:

    python tests/triton_matrix.py --capabilities 90 --specs NEW.json --skip-known OLD_SPECS.json OLD_RESULTS.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_sm90 as sm90  # noqa: E402

# The floor is the Triton of the oldest torch this project supports (torch 2.8 pins triton 3.4.0),
# 3.6.0 is what torch 2.10/2.11 (and the lent H200 machines) bring, 3.9.0 the newest.
DEFAULT_VERSIONS = ("3.4.0", "3.6.0", "3.9.0")
DEFAULT_CAPABILITIES = (90, 80)


def env_python(envs: str, version: str, setup: bool = True) -> str:
    """The python of the environment holding `triton==version`, created when missing and `setup`."""
    path = os.path.join(envs, version)
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        if not setup:
            raise FileNotFoundError(f"no environment {path} (run without --no-setup to create it)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", path], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"triton=={version}"], check=True)
    found = subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    if found != version:
        raise RuntimeError(f"{path} holds triton {found}, not {version}")
    return python


def summarize(results: List[dict], capability: int) -> dict:
    """Counts of one version × capability: variants, errors, spills, shared memory over the limit."""
    errors = [r for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    return dict(variants=len(results), errors=len(errors),
                spills=sum(1 for r in ok if r["spill_stores"]),
                smem_over=sum(1 for r in ok if r["shared"] > sm90.SHARED_LIMITS[capability]),
                max_regs=max((r["registers"] or 0 for r in ok), default=0),
                max_smem=max((r["shared"] for r in ok), default=0))


def known_clean(specs_path: str, results_path: str) -> Dict[str, Dict[str, dict]]:
    """"<version> <arch>" -> {spec_key: result} of the launches that compiled cleanly (no error, no
    spills, shared memory within the block limit) in an earlier run: `results_path` is its `--json`
    output, `specs_path` the recording it compiled (results are in the recording's order)."""
    with open(specs_path) as f:
        specs = json.load(f)["specs"]
    with open(results_path) as f:
        details = json.load(f)["results"]
    known = {}
    for key, results in details.items():
        cap = int(key.split("sm_")[1].rstrip("a"))
        if len(results) != len(specs) or any(r["kernel"] != s["kernel"] or r["options"] != s["options"]
                                             for r, s in zip(results, specs)):
            raise ValueError(f"{results_path} ({key}) is not a compile of every launch of {specs_path}")
        known[key] = {sm90.spec_key(s): r for s, r in zip(specs, results) if not sm90.problems(r, cap, spills=True)}
    return known


def failing(results: List[dict], capability: int) -> List[dict]:
    """The variants that fail the check on `capability` (spills count on sm_90a only)."""
    return [r for r in results if sm90.problems(r, capability, spills=capability == 90)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS), help="Triton versions to compile with")
    ap.add_argument("--capabilities", nargs="+", type=int, default=list(DEFAULT_CAPABILITIES),
                    choices=sorted(sm90.SHARED_LIMITS))
    ap.add_argument("--envs", default=os.environ.get("DOPD_TRITON_ENVS", "/tmp/triton-envs"),
                    help="folder of the per-version virtual environments")
    ap.add_argument("--no-setup", action="store_true", help="fail instead of creating a missing environment")
    ap.add_argument("--specs", help="reuse this recording (written by a previous run or by triton_sm90.py --step record)")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--cases", choices=sorted(sm90.CASE_SETS), default="full", help="API calls to record (default: all)")
    ap.add_argument("--representatives", action="store_true", help="compile one launch per tile class only")
    ap.add_argument("--skip-known", nargs=2, metavar=("SPECS", "RESULTS"),
                    help="take each launch that compiled cleanly in an earlier run (its recording and --json output) "
                         "from there instead of compiling it again")
    args = ap.parse_args()

    t_start = time.time()
    pythons = {v: env_python(args.envs, v, not args.no_setup) for v in args.versions}
    t_setup = time.time() - t_start
    with tempfile.TemporaryDirectory() as tmp:
        specs = args.specs or os.path.join(tmp, "specs.json")
        if args.specs and os.path.exists(args.specs):
            with open(specs) as f:
                rec = json.load(f)
        else:
            rec = sm90.record_subprocess(specs, cases=args.cases)
        selected = sm90.representatives(rec["specs"]) if args.representatives else rec["specs"]
        known = known_clean(*args.skip_known) if args.skip_known else {}
        rows, details = [], {}
        for version in args.versions:
            for cap in args.capabilities:
                t0 = time.time()
                reuse = known.get(f"{version} {sm90.arch(cap)}", {})
                todo = [s for s in selected if sm90.spec_key(s) not in reuse]
                results = []
                if todo:
                    todo_path = os.path.join(tmp, f"todo-{version}-{cap}.json")
                    with open(todo_path, "w") as f:
                        json.dump(todo, f)
                    with open(os.path.join(tmp, f"compile-{version}-{cap}.log"), "w") as log:
                        results = sm90.compile_subprocess(todo_path, os.path.join(tmp, f"{version}-{cap}.json"), cap,
                                                          pythons[version], log=log)
                fresh = iter(results)
                # In the recording's order; a reused result keeps its own fields, marked `reused`.
                results = [dict(reuse[k], case=s.get("case"), reused=True) if k in reuse else next(fresh)
                           for s, k in ((s, sm90.spec_key(s)) for s in selected)]
                rows.append(dict(triton=version, arch=sm90.arch(cap), seconds=round(time.time() - t0, 1),
                                 reused=len(selected) - len(todo), **summarize(results, cap)))
                details[f"{version} {sm90.arch(cap)}"] = results
                bad = failing(results, cap)
                rows[-1]["failing"] = len(bad)
    raised = [c for c in rec["cases"] if c["error"]]
    print(f"\nrecorded with Triton {rec['triton']}: {len(rec['cases'])} API calls ({len(raised)} raised), "
          f"{len(rec['specs'])} distinct kernel launches, in {rec.get('record_s', '?')} s")
    for c in raised:
        print(f"  raised: {c['label']}: {c['error']}")
    header = ("triton", "arch", "variants", "reused", "errors", "spills", "smem_over", "max_regs", "max_smem", "failing", "seconds")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    for key, results in details.items():
        cap = int(key.split("sm_")[1].rstrip("a"))
        groups = collections.defaultdict(list)
        for r in results:
            for p in sm90.problems(r, cap, spills=True):
                groups[p if "error" in r else p.split(" at ")[0].split(" B")[0]].append(r)
        for problem, rs in groups.items():
            print(f"\n{key}: {len(rs)} variant(s): {problem}")
            for r in rs[:6]:
                print(f"    {sm90.variant_name(r)}  ({sm90.problems(r, cap)[0] if 'error' not in r else 'error'}; from: {r.get('case')})")
            if len(rs) > 6:
                print(f"    ... and {len(rs) - 6} more")
    total = time.time() - t_start
    print(f"\nwall time {total:.0f} s (environment setup {t_setup:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(recording={k: v for k, v in rec.items() if k != "specs"}, table=rows, results=details,
                           wall_s=round(total, 1)), f, indent=1)
    return 1 if any(row["failing"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
