#!/usr/bin/env bash
# Run every benchmark, the main job (bench_figures: the quick tier of the paper figures
# from empty stores) included, on one device;
# write the outputs under results/bench-<device>/ (one log per benchmark,
# bench_figures.md holds the quick tier's seconds per figure and in all).
#
# Usage: benchmarks/run_all.sh [--device cpu|gpu] [--python PYTHON]
# On a GPU machine first: pip install -e ".[cuda,bench]"
set -euo pipefail
device=cpu
py=${PYTHON:-python}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    *) echo "run_all.sh: unknown argument $1 (allowed: --device cpu|gpu, --python PYTHON)" >&2; exit 2 ;;
  esac
done
case "$device" in cpu|gpu) ;; *) echo "run_all.sh: --device must be cpu or gpu, not $device" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
out="results/bench-$device"
mkdir -p "$out"
# fail early, with one line, when the device has no JAX backend
"$py" -c "import sys; sys.path.insert(0, 'benchmarks'); import common; common.use_device('$device')" | tee "$out/device.txt"
"$py" -c "import jax; print('jax', jax.__version__, [d.device_kind for d in jax.devices()])" | tee -a "$out/device.txt"
status=0
for b in meanfield freeprob spectra training sweep probe kernels figures; do
  echo "== bench_$b --device $device" >&2
  if ! "$py" "benchmarks/bench_$b.py" --device "$device" > "$out/bench_$b.md" 2> "$out/bench_$b.err"; then
    echo "bench_$b failed: see $out/bench_$b.err" >&2
    status=1
  fi
done
echo "outputs in $out/" >&2
exit $status
