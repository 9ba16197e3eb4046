#!/usr/bin/env bash
# One-shot check on a lent CUDA machine (written for one H200 with torch 2.11 + Triton 3.6 already
# installed and no network): each GPU path that issues 16/17 fixed, once, against the float64
# reference (benchmarks/gpu_paths.py); the GPU tests of the suite; the CUDA benchmark sizes; the
# report. About 9 minutes at most.
#
#   benchmarks/gpu_check.sh [OUT_DIR]     OUT_DIR defaults to $OUT, else ./gpu-check-<timestamp>
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh    print the plan and the environment, run nothing
#   GPU_CHECK_STEPS="paths tests"                   run only these steps (default: build paths tests bench report)
#   PYTHON=/path/to/python                          the interpreter (default: the checkout's .venv, else python3)
#
# It installs and upgrades nothing: no pip at all. The checkout is imported from the tree
# (PYTHONPATH), so the machine's torch and Triton stay what they are; env.txt records their versions
# before and after, and the script says so if they changed. What this machine cannot do is skipped
# with the reason (no CUDA device, one GPU only for the device-guard check, no nvcc for the cuda
# backend, no pytest-benchmark for the benchmarks).
#
# Writes to OUT_DIR: env.txt, build.log, paths.log + gpu_paths.json, tests.log,
# bench-<stage>.json/.log, report/ (report.md + PNGs), gpu_check.log; prints a short table last.
# Every step has its own time limit (100 + 90 + 100 + 120 + 70 + 20 s, at most 9 min 20 s with the
# kill grace) and a failing step does not stop the next one, so whatever finished is always written.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR="${1:-${OUT:-$ROOT/gpu-check-$(date +%Y%m%d-%H%M%S)}}"
STEPS=" ${GPU_CHECK_STEPS:-build paths tests bench report} "
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON="$ROOT/.venv/bin/python"
fi
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
mkdir -p "$OUT_DIR"
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT_DIR/gpu_check.log"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }

# Run "$@" with a time limit (seconds), output to a log file; never aborts the script.
step() {
    local limit=$1 logfile=$2; shift 2
    if [ "$DRY" = 1 ]; then
        log "dry run: would run (limit ${limit}s, log ${logfile##*/}): $*"
        return 0
    fi
    log "start: $* (limit ${limit}s, log ${logfile##*/})"
    timeout --kill-after=10 "$limit" "$@" > "$logfile" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && log "TIMED OUT after ${limit}s: $*" || log "exit $rc: $*"
    return 0
}

versions() {
    "$PYTHON" - <<'EOF' 2>&1
import importlib.metadata as md
for name in ("torch", "triton", "pytest", "pytest-benchmark", "numpy"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
}

log "output: $OUT_DIR; python: $PYTHON; steps:$STEPS"
BEFORE=$(versions)
{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 || echo "nvidia-smi: not on PATH"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH (the cuda backend cannot be built)"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1
    echo "$BEFORE"
    git log -1 --oneline 2>/dev/null; git status --short 2>/dev/null | head -20
} > "$OUT_DIR/env.txt" 2>&1
log "$(grep -E '^torch ' "$OUT_DIR/env.txt" | head -1)"
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$HAS_CUDA" = 1 ] || log "no CUDA device visible: the GPU paths skip, the benchmark steps are skipped"

# 0. Build (or load from the cache) the compiled backends once, so later steps do not each pay for it.
if want build; then
    step 100 "$OUT_DIR/build.log" "$PYTHON" -c "import dopd_kernels as d; print('backends', d.available_backends())"
    [ "$DRY" = 1 ] || log "$(tail -n 1 "$OUT_DIR/build.log")"
fi

# 1. Each fixed GPU path once, against the float64 reference (issue 16 point 5, issue 17 point 6):
#    top-K 512 fused-linear bf16, mixed-dtype full passes (cuda + triton), the device guard on
#    cuda:1 (skipped with one GPU), the deterministic mode (bitwise-equal reruns, its cost), head
#    transforms. Every check says PASS, FAIL or SKIP with its reason.
if want paths; then
    step 90 "$OUT_DIR/paths.log" "$PYTHON" benchmarks/gpu_paths.py --out "$OUT_DIR"
    [ "$DRY" = 1 ] || log "paths: $(tail -n 1 "$OUT_DIR/paths.log")"
fi

# 2. The GPU tests of the suite (the Triton and CUDA backends on CUDA tensors; they skip elsewhere), and
#    the stats kernel's int64 top-K offsets, which run on the GPU when there is one (issue 17 point 5).
#    The CPU-only rest (~1000 tests, several minutes) is CI's job; GPU_CHECK_TESTS="" runs all of it.
if want tests; then
    if "$PYTHON" -c "import pytest" 2>/dev/null; then
        step 100 "$OUT_DIR/tests.log" "$PYTHON" -m pytest tests -q -rs -p no:cacheprovider -k "${GPU_CHECK_TESTS-cuda or gpu or int64}"
        [ "$DRY" = 1 ] || log "tests: $(tail -n 1 "$OUT_DIR/tests.log")"
    else
        log "skipped tests: pytest is not installed here"
    fi
fi

# 3. Benchmarks at CUDA sizes (bf16), in two stages with their own result files. The in-suite
#    budget skips (and records) contenders once it is spent, so pytest still writes its JSON; the
#    outer timeout is only a safety net. Cases run smallest N first, so each vocabulary gets figures.
if want bench; then
    if [ "$HAS_CUDA" != 1 ] && [ "$DRY" != 1 ]; then
        log "skipped benchmarks: no CUDA device (the CPU sizes are benchmarks/README.md's suite)"
    elif ! "$PYTHON" -c "import pytest_benchmark" 2>/dev/null; then
        log "skipped benchmarks: pytest-benchmark is not installed here"
    else
        export DOPD_BENCH_ROUNDS=3 DOPD_BENCH_NOTE="gpu_check.sh on a lent GPU machine"
        DOPD_BENCH_BUDGET_S=100 \
        DOPD_BENCH_SIZES="128256:4096:2048,8192;151936:4096:2048,8192,16384;262144:2048:2048,8192,16384" \
            step 120 "$OUT_DIR/bench-dopd.log" "$PYTHON" -m pytest benchmarks/test_bench_dopd.py --benchmark-only \
                --benchmark-json="$OUT_DIR/bench-dopd.json" -q -rs -p no:cacheprovider
        DOPD_BENCH_BUDGET_S=50 \
        DOPD_BENCH_SIZES="151936:4096:2048,8192;262144:2048:2048,8192" \
            step 70 "$OUT_DIR/bench-peers.log" "$PYTHON" -m pytest benchmarks/test_bench_peers.py --benchmark-only \
                --benchmark-json="$OUT_DIR/bench-peers.json" -q -rs -p no:cacheprovider
    fi
fi

# 4. Report (Markdown + PNGs) from whatever JSON was written; its summary table is printed last.
if want report; then
    shopt -s nullglob
    results=("$OUT_DIR"/bench-*.json)
    if [ ${#results[@]} -gt 0 ]; then
        step 20 "$OUT_DIR/report.log" "$PYTHON" benchmarks/report.py "${results[@]}" --out "$OUT_DIR/report"
    else
        log "no benchmark JSON was written: no report"
    fi
fi

AFTER=$(versions)
if [ "$BEFORE" != "$AFTER" ]; then
    log "WARNING: installed packages changed during the run:"; diff <(echo "$BEFORE") <(echo "$AFTER") | tee -a "$OUT_DIR/env.txt"
fi
log "done in $(( $(date +%s) - START ))s; files in $OUT_DIR"
[ "$DRY" = 1 ] && exit 0
echo
echo "== paths: $(tail -n 1 "$OUT_DIR/paths.log" 2>/dev/null)"
grep -E "^(PASS|FAIL|SKIP|INFO) " "$OUT_DIR/paths.log" 2>/dev/null
echo "== tests: $(tail -n 1 "$OUT_DIR/tests.log" 2>/dev/null)"
echo "== benchmarks (time x / memory x of naive PyTorch; lower is better):"
grep -v "^report:" "$OUT_DIR/report.log" 2>/dev/null || echo "(no report)"
