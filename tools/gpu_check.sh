#!/usr/bin/env bash
# First run on a GPU machine, in one command (docs/build.md, "First run on a GPU"):
#
#   tools/gpu_check.sh [--out FILE] [--dry-run]
#
# 1. build hecate._C with its CUDA kernels for this GPU's architecture (+ PTX), in place;
# 2. run the `gpu`-marked tests (pytest -m gpu);
# 3. tools/gpu_check.py: the real spAG / spRS and a few FSSDP training steps on NCCL at world
#    size 1, then the kernels against torch (permute / unpermute, gating, chunk packing,
#    grouped GEMM TFLOP/s against the device's peak, attention);
# and write every result into one JSON file (default runs/gpu_check.json), each step's whole
# log beside it (gpu_check_<step>.log: the JSON keeps only the tail). Sized for < 8 min on one
# GPU: each step has its own time limit. Every step runs even after a failure; the exit
# status is non-zero if any failed.
#
# --dry-run: the same steps on a CPU machine (CPU build, gpu tests collected but skipped,
# gloo, tiny shapes); the test suite runs it (tests/test_gpu_check.py).
# PYTHON (default: .venv/bin/python if present, else python3), HECATE_CUDA_ARCHS (default:
# this GPU's, e.g. "90") and MAX_JOBS override the defaults. The machine needs a CUDA build
# of torch already installed: nothing is downloaded.
set -u
cd "$(dirname "$0")/.."

OUT=runs/gpu_check.json
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out FILE, --dry-run)" >&2; exit 2 ;;
  esac
done
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"  # a file left by an earlier run must not pass for this run's results
LOGDIR="$(dirname "$OUT")"
# Unbuffered: a step stopped at its time limit still leaves everything it printed in its log.
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PRIOR="$(mktemp)"
echo '{}' > "$PRIOR"
trap 'rm -f "$PRIOR"' EXIT

# record NAME RC SECONDS LOGFILE: add one step's result to the JSON of prior steps
record() {
  "$PYTHON" - "$PRIOR" "$1" "$2" "$3" "$4" <<'PY'
import json, sys
path, name, rc, seconds, log = sys.argv[1:6]
with open(path) as f:
    steps = json.load(f)
with open(log, errors="replace") as f:
    tail = f.read()[-4000:]
steps[name] = {"ok": rc == "0", "exit_status": int(rc), "seconds": float(seconds),
               "timed_out": rc in ("124", "137"), "log_tail": tail}
with open(path, "w") as f:
    json.dump(steps, f)
PY
}

# step NAME LIMIT_S COMMAND...: run with a time limit, log to a temp file, record it
step() {
  local name="$1" limit="$2"; shift 2
  local log; log="$(mktemp)"
  local t0; t0=$(date +%s%N)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local t1; t1=$(date +%s%N)
  tail -n 15 "$log"
  record "$name" "$rc" "$(( (t1 - t0) / 1000000 )).0e-3" "$log"
  cp "$log" "$LOGDIR/gpu_check_$name.log"
  rm -f "$log"
  [ "$rc" = 0 ] || echo "== $name FAILED (exit $rc)" >&2
}

# Only the modules that hold gpu-marked tests: collecting all of tests/ takes a minute of the
# two minutes the GPU run gives its tests. The kernel tests (*cuda*) first: quick, and their
# results are in the log even if the multi-process tests after them reach the time limit.
mapfile -t GPU_TESTS < <(grep -l "mark\.gpu" tests/*.py tests/gpu/*.py | grep cuda
                         grep -l "mark\.gpu" tests/*.py tests/gpu/*.py | grep -v cuda)
if [ "$DRY" = 1 ]; then
  # CPU build (a no-op when hecate/_C is up to date), then collect the gpu tests: they must skip.
  step build 600 env HECATE_NO_CUDA=1 flock .build.lock "$PYTHON" setup.py -q build_ext --inplace
  step pytest_gpu 300 "$PYTHON" -m pytest -q -m gpu "${GPU_TESTS[@]}" -p no:cacheprovider
  step gpu_check 300 "$PYTHON" tools/gpu_check.py --dry-run --out "$OUT" --prior "$PRIOR"
else
  if [ -z "${HECATE_CUDA_ARCHS:-}" ]; then
    HECATE_CUDA_ARCHS=$("$PYTHON" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')") || {
      echo "gpu_check.sh: torch sees no CUDA device (is a CUDA build of torch installed?)" >&2; exit 2; }
  fi
  export HECATE_CUDA_ARCHS MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  # Limits add up to 7.7 min: build 4, tests 2, checks and benchmarks 1.7.
  step build 240 "$PYTHON" setup.py -q build_ext --inplace
  # -v: one line per test in the log, so a run stopped at its limit still says which passed.
  step pytest_gpu 120 "$PYTHON" -m pytest -v -m gpu "${GPU_TESTS[@]}" -p no:cacheprovider --timeout 60
  step gpu_check 100 "$PYTHON" tools/gpu_check.py --out "$OUT" --prior "$PRIOR"
fi
# gpu_check.py merges the earlier steps into OUT; if it could not write it, write them alone.
if [ ! -s "$OUT" ]; then cp "$PRIOR" "$OUT"; fi
"$PYTHON" - "$OUT" "$PRIOR" <<'PY'
import json, sys
out, prior = sys.argv[1:3]
with open(out) as f:
    results = json.load(f)
with open(prior) as f:
    steps = json.load(f)
results = results if "steps" in results else {"steps": results}
results["steps"].update({k: v for k, v in steps.items() if k not in results["steps"] or k == "gpu_check"})
results["ok"] = all(s.get("ok") for s in results["steps"].values())
with open(out, "w") as f:
    json.dump(results, f, indent=1)
print(f"gpu_check.sh: {'ok' if results['ok'] else 'FAILED'}: " +
      ", ".join(f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in results["steps"].items()))
sys.exit(0 if results["ok"] else 1)
PY
