#!/usr/bin/env bash
# One-shot check on a lent CUDA machine (written for one H200): the test suite on the GPU, the
# CUDA benchmark sizes, and the report, in about 8 minutes. Installs nothing (no network needed):
# it uses the checkout's .venv if present, else the `python` on PATH.
#
#   benchmarks/gpu_check.sh [OUT_DIR]     OUT_DIR defaults to $OUT, else ./gpu-check-<timestamp>
#
# Writes to OUT_DIR: env.txt, build.log, tests.log, bench-<stage>.json/.log, report/ (report.md +
# PNGs), gpu_check.log; prints a short table last. Every step has its own time limit (120 + 120 +
# 140 + 80 + 20 s at most: 8 minutes) and a failing step does not stop the next one, so whatever
# finished is always written.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
PY=python
[ -x .venv/bin/python ] && PY="$PWD/.venv/bin/python"
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT_DIR/gpu_check.log"; }

# Run "$@" with a time limit (seconds), output to a log file; never aborts the script.
step() {
    local limit=$1 logfile=$2; shift 2
    log "start: $* (limit ${limit}s, log ${logfile##*/})"
    timeout --kill-after=10 "$limit" "$@" > "$logfile" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && log "TIMED OUT after ${limit}s: $*" || log "exit $rc: $*"
    return 0
}

log "output: $OUT_DIR"
{
    date -u
    nvidia-smi || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|liger|cut.cross|pytest)" || true
    git log -1 --oneline 2>/dev/null; git status --short 2>/dev/null | head -20
} > "$OUT_DIR/env.txt" 2>&1
log "$(grep -E '^torch' "$OUT_DIR/env.txt" | head -1)"

# 0. Build (or load from the cache) the compiled backends once, so later steps do not each pay for it.
step 120 "$OUT_DIR/build.log" "$PY" -c "import dopd_kernels as d; print('backends', d.available_backends())"
log "$(tail -n 1 "$OUT_DIR/build.log")"

# 1. The GPU tests of the suite (the Triton and CUDA backends on CUDA tensors; they skip elsewhere).
#    The CPU-only rest (~1000 tests, several minutes) is CI's job; GPU_CHECK_TESTS="" runs all of it.
step 120 "$OUT_DIR/tests.log" "$PY" -m pytest tests -q -rs -p no:cacheprovider -k "${GPU_CHECK_TESTS-cuda or gpu}"
log "tests: $(tail -n 1 "$OUT_DIR/tests.log")"

# 2. Benchmarks at CUDA sizes (bf16), in two stages with their own result files. The in-suite
#    budget skips (and records) contenders once it is spent, so pytest still writes its JSON; the
#    outer timeout is only a safety net. Cases run smallest N first, so each vocabulary gets figures.
export DOPD_BENCH_ROUNDS=3 DOPD_BENCH_NOTE="gpu_check.sh on a lent GPU machine"
DOPD_BENCH_BUDGET_S=105 \
DOPD_BENCH_SIZES="128256:4096:2048,8192;151936:4096:2048,8192,16384;262144:2048:2048,8192,16384" \
    step 140 "$OUT_DIR/bench-dopd.log" "$PY" -m pytest benchmarks/test_bench_dopd.py --benchmark-only \
        --benchmark-json="$OUT_DIR/bench-dopd.json" -q -rs -p no:cacheprovider
DOPD_BENCH_BUDGET_S=55 \
DOPD_BENCH_SIZES="151936:4096:2048,8192;262144:2048:2048,8192" \
    step 80 "$OUT_DIR/bench-peers.log" "$PY" -m pytest benchmarks/test_bench_peers.py --benchmark-only \
        --benchmark-json="$OUT_DIR/bench-peers.json" -q -rs -p no:cacheprovider

# 3. Report (Markdown + PNGs) from whatever JSON was written; its summary table is printed last.
shopt -s nullglob
results=("$OUT_DIR"/bench-*.json)
if [ ${#results[@]} -gt 0 ]; then
    step 20 "$OUT_DIR/report.log" "$PY" benchmarks/report.py "${results[@]}" --out "$OUT_DIR/report"
else
    log "no benchmark JSON was written"
fi
log "done in $(( $(date +%s) - START ))s; files in $OUT_DIR"
echo
echo "== tests: $(tail -n 1 "$OUT_DIR/tests.log" 2>/dev/null)"
echo "== benchmarks (time x / memory x of naive PyTorch; lower is better):"
grep -v "^report:" "$OUT_DIR/report.log" 2>/dev/null || echo "(no report)"
