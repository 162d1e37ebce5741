#!/usr/bin/env bash
# The prepared GPU check (issue 23, deliverable 5): one call on a lent device machine, inside
# its 10-minute command limit. Here, first: `bash bench/prepare_device_wheels.sh` (the packages
# the machine's image lacks, into .whl/). Then the device tool:
#
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=600)
#
# It runs, each step under its own share of the time left and logged into $OUT (what comes
# back from the machine):
#   1. env.txt: the GPU (nvidia-smi), torch, CUDA, the CPU;
#   2. bench_all_auto.txt: `bench_all.py --device cuda --precision auto --quick` (the presets
#      against their bare encoders at the precision auto picks there, bf16 on a GPU that has
#      it) and the folder throughput of `crane` at batch 1, 4 and 16;
#   3. bench_all_fp32.txt: the same presets in fp32, no throughput (while time is left).
# A step that fails or runs out of time leaves its partial log and the next step still runs;
# the exit status is the first failing step's.
#
# zsdense runs from this working tree, laid out as the wheel installs it (pyproject's
# package-dir: prompts/ and cli/ become zsdense.prompts and zsdense.cli) under a scratch folder,
# so the machine runs exactly the code that travelled. The carried wheels go to another scratch
# folder first on PYTHONPATH, without their dependencies (the image has them).
#
# For a dry run on any machine (what tests/test_bench.py does on the CPU):
#   ZSDENSE_CHECK_DEVICE=cpu ZSDENSE_CHECK_MODELS=tiny ZSDENSE_CHECK_PRESETS=crane \
#     OUT=/tmp/out bash bench/device_check.sh
set -u
CALLER=$(pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
case "$PY" in /*) ;; */*) PY="$CALLER/$PY" ;; esac  # a relative path: from the caller's folder
command -v "$PY" >/dev/null || { echo "device_check: no python at $PY" >&2; exit 4; }
DEVICE=${ZSDENSE_CHECK_DEVICE:-cuda}
MODELS=${ZSDENSE_CHECK_MODELS:-random}
PRESETS=${ZSDENSE_CHECK_PRESETS:-crane,crane+,anomalydino,musc,trident,proxyclip,hybridgl+}
BATCHES=${ZSDENSE_CHECK_BATCHES:-1,4,16}
TP_IMAGES=${ZSDENSE_CHECK_THROUGHPUT_IMAGES:-32}
MIN_SECONDS=${ZSDENSE_CHECK_MIN_SECONDS:-5}
BUDGET=${ZSDENSE_CHECK_SECONDS:-560}
START=$(date +%s)
LOG="$OUT/device_check.log"

log() { echo "[device_check +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
# the package as installed: zsdense/, with prompts/ and cli/ in it
mkdir -p "$SCRATCH/src"
cp -r "$ROOT/zsdense" "$SCRATCH/src/zsdense"
rm -rf "$SCRATCH/src/zsdense/prompts" "$SCRATCH/src/zsdense/cli"
cp -r "$ROOT/prompts" "$SCRATCH/src/zsdense/prompts"
cp -r "$ROOT/cli" "$SCRATCH/src/zsdense/cli"
SITE="$SCRATCH/src"
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SCRATCH/site" "$ROOT"/.whl/*.whl >>"$LOG" 2>&1; then
    log "installing the carried wheels failed (see above)"
    exit 3
  fi
  SITE="$SITE:$SCRATCH/site"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 \
    || echo "nvidia-smi: not available"
  # from the scratch folder: the working tree's own zsdense/ must not shadow the assembled one
  (cd "$SCRATCH" && "$PY" - <<'EOF'
import importlib.resources, os, platform, torch, zsdense
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
print(f"zsdense {zsdense.__version__} from {os.path.dirname(zsdense.__file__)}")
prompts = importlib.resources.files("zsdense.prompts")
assert prompts.joinpath("anomaly_prompts.json").is_file(), "zsdense.prompts has no data"
import open_clip, segment_anything  # noqa: F401  (carried where the image lacks them)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
print(f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
EOF
  )
} >"$OUT/env.txt" 2>&1
rc_env=$?
tee -a "$LOG" <"$OUT/env.txt"
if [ "$rc_env" -ne 0 ]; then
  log "the environment check failed: zsdense or torch does not import"
  exit 4
fi

status=0
step() {  # step NAME SHARE(percent of the time left) ARGS...
  local name=$1 share=$2
  shift 2
  local t=$(( $(left) * share / 100 ))
  if [ "$t" -lt 30 ]; then
    log "$name: skipped, ${t}s left for it"
    [ "$status" -eq 0 ] && status=5
    return
  fi
  log "$name: bench_all.py $* (at most ${t}s)"
  timeout --kill-after=10 "$t" "$PY" "$ROOT/bench/bench_all.py" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  log "$name: exit status $rc$([ "$rc" -eq 124 ] && echo ' (out of time: the log is partial)')"
  tail -n 25 "$OUT/$name.txt" | tee -a "$LOG"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

COMMON=(--device "$DEVICE" --quick --models "$MODELS" --presets "$PRESETS"
  --min-seconds "$MIN_SECONDS")
step bench_all_auto 70 "${COMMON[@]}" --precision auto --throughput-batches "$BATCHES" \
  --throughput-images "$TP_IMAGES"
step bench_all_fp32 100 "${COMMON[@]}" --precision fp32 --skip-throughput
log "done, exit status $status"
exit "$status"
