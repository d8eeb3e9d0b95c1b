#!/usr/bin/env bash
# The GPU check in one command (about 5 of its 8-minute budget on one H200):
#
#   benchmarks/gpu/run.sh            # on the GPU machine: results into $OUT
#   benchmarks/gpu/run.sh --dry-run  # here, on the CPU: every step, a stand-in model
#
# Steps: install the wheelhouse (.whl/cp312, from benchmarks/gpu/wheels.py download)
# into a target folder and put it and the repository on PYTHONPATH; record the
# machine (nvidia-smi, /dev/shm, versions and where each package was imported from);
# check every requirement of featstore against what is importable (preflight); run
# the `gpu`-marked tests; a 2-worker --cluster extract checked byte-identical to one
# process (cluster_check.py); benchmarks/gpu_extract.py (ViT-S/B/L shapes, 224 and
# 512 px, both --preprocess-on placements). Every step's output goes to
# $OUT/run.log; results.py gathers all of it into $OUT/gpu-results.json and .md.
# A step that fails is recorded and the next one still runs; the exit status is 1
# if any failed. Each step's timeout is cut to the time left of BUDGET seconds.
#
# The dry run uses this machine's Python (the project's .venv, 3.11) in the image's
# place: it installs the cp311 wheelhouse (.whl/cp311, the same pins) into a scratch
# target, and image_like.py hides every package of the .venv that the device image
# lacks unless it comes from that target, so a wheel missing from the wheelhouse
# fails here as it would there. gpu_extract.py and cluster_check.py run with
# --stand-in (a tiny DINOv3 on the CPU, small sizes), and the gpu-marked tests run on
# the CPU (FEATSTORE_GPU_STANDIN=cpu): their code runs, nothing about CUDA is checked.
set -u
MODE=gpu
[ "${1:-}" = "--dry-run" ] && MODE=dry-run
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 1
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/featstore-gpu.XXXXXX")
WORK=$SCRATCH/work
mkdir -p "$WORK"
if [ "$MODE" = gpu ]; then
  PY=${PYTHON:-python3}
  OUTDIR=${OUT:?set OUT to the folder for the results}
  BUDGET=${BUDGET:-470}
  LIMITS=(180 60 60 150 330 150)  # install env preflight tests bench cluster, at most
  BENCH_ARGS=()
  CLUSTER_ARGS=()
else
  PY=${PYTHON:-$REPO/.venv/bin/python}
  OUTDIR=${OUT:-$REPO/results/gpu-dry-run}
  BUDGET=${BUDGET:-1500}  # 2 shared cores, slower than the GPU machine's 16
  LIMITS=(300 200 100 500 600 400)
  BENCH_ARGS=(--stand-in --models vits16,vitl16 --sizes 224,512 --seconds 0.3 --max-gb 0.01 --min-units 3 --workers 2 --pool 16
    --batch-size 8 --unit-items 16)
  CLUSTER_ARGS=(--stand-in --n 48)
  export FEATSTORE_GPU_STANDIN=cpu
fi
TAG=cp$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS=${WHEELS:-$REPO/.whl/$TAG}
TARGET=$SCRATCH/site
export MODE PY WHEELS TARGET SCRATCH WORK
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FEATSTORE_HOME=$SCRATCH/home
echo "mode $MODE, python $PY ($TAG), wheels $WHEELS, scratch $SCRATCH"

# step NAME MAX_SECONDS CMD...: run CMD with a timeout (MAX_SECONDS or the time left),
# its output into NAME.log and this log, its exit status and seconds beside it.
step() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  local limit=$((max < left ? max : left))
  echo "$name" >>"$WORK/steps.txt"
  echo "=== $name (timeout ${limit}s, ${left}s of the budget left)"
  local t0=$SECONDS
  if [ "$limit" -le 0 ]; then
    echo "no time left for $name" | tee "$WORK/$name.log"
    echo 124 >"$WORK/$name.rc"
  else
    # functions of this script run in a child bash that is given their definitions
    timeout -k 10 "$limit" bash -c "$(declare -f install machine tests); \"\$@\"" bash "$@" \
      2>&1 | tee "$WORK/$name.log"
    echo "${PIPESTATUS[0]}" >"$WORK/$name.rc"
  fi
  echo $((SECONDS - t0)) >"$WORK/$name.sec"
  echo "=== $name: exit $(cat "$WORK/$name.rc") after $((SECONDS - t0))s"
}

install() {
  ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS: run wheels.py download"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$TARGET" "$WHEELS"/*.whl || return 1
  if [ "$MODE" = dry-run ]; then
    "$PY" benchmarks/gpu/image_like.py "$TARGET" "$SCRATCH/image" || return 1
  fi
}

machine() {
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not here"
  nproc
  free -g | head -2
  df -h /dev/shm "$SCRATCH" | cat
  "$PY" benchmarks/gpu/versions.py
}

tests() {
  local files
  files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
  echo "gpu-marked tests in: $files"
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -m gpu --junitxml="$WORK/tests.xml" $files
}

step install "${LIMITS[0]}" install
export PYTHONPATH=$TARGET:$REPO
[ "$MODE" = dry-run ] && export PYTHONPATH=$SCRATCH/image:$PYTHONPATH
"$PY" -c 'import json, socket, sys, time; json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": socket.gethostname(), "python": sys.version.split()[0]}, open(sys.argv[1], "w"))' "$WORK/info.json"
step env "${LIMITS[1]}" machine
step preflight "${LIMITS[2]}" "$PY" benchmarks/gpu/wheels.py check --installed
step tests "${LIMITS[3]}" tests
step cluster "${LIMITS[5]}" "$PY" benchmarks/gpu/cluster_check.py --json "$WORK/cluster.json" "${CLUSTER_ARGS[@]}"
# last: it writes its rows as it goes, so a cut-off run keeps the cases done
step bench "${LIMITS[4]}" "$PY" benchmarks/gpu_extract.py --json "$WORK/bench.json" "${BENCH_ARGS[@]}"
echo "=== results ($SECONDS s in all)"
"$PY" benchmarks/gpu/results.py --work "$WORK" --out "$OUTDIR" --mode "$MODE" >/dev/null
failed=$(for f in "$WORK"/*.rc; do [ "$(cat "$f")" = 0 ] || basename "$f" .rc; done)
echo "results: $OUTDIR/gpu-results.md, $OUTDIR/gpu-results.json; failed steps: ${failed:-none}"
rm -rf "$SCRATCH"
[ -z "$failed" ]
