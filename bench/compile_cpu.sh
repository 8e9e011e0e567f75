#!/usr/bin/env bash
# The CPU figures for compile_unet, in one go: first-compile time and s/step for eager, whole-model compile and
# regional compile (the UNet's repeated blocks), with a cold and then a warm inductor cache.
#
#   bash bench/compile_cpu.sh [OUT_DIR]      (default bench/results/compile-cpu; the cold round takes the longest)
#
# One `python -m bench` process per round, the floor (the UNet step exactly as the trainer prepares it, compiled
# by lora_core.compile as the trainer compiles it) three ways one after another: eager, regional, whole. The JSON
# is written after each phase, so a round cut by its time limit keeps what it finished. `first_window_extra_s`
# of a phase is what its first window took beyond the same steps at its median speed: the first compile. The
# first round runs with a fresh TORCHINDUCTOR_CACHE_DIR (cold), the REPEATS after it with the same folder (warm).
# One thread (OMP_NUM_THREADS=1 unless set): on this shared, oversubscribed 2-core VM two threads ran up to 10x
# slower with 100-300 % spread between windows. The load average is logged before and after every round.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${1:-$REPO/bench/results/compile-cpu}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
COMMON=(--model builtin:small-sd --resolution 128 --batch 4 --rank 16 --steps 3 --windows 4
        --phases floor_eager,floor_regional,floor_whole)

one() {  # one NAME CACHE_DIR ARGS...
    local name=$1 cache=$2
    shift 2
    echo "== $name $(date -u +%T) load: $(uptime | sed 's/.*load average: //')"
    TORCHINDUCTOR_CACHE_DIR="$cache" timeout -k 10 "${ROUND_LIMIT_S:-1800}" "$PY" -m bench "${COMMON[@]}" --label "$name" \
        --json "$OUT/$name.json" "$@"
    echo "== $name: exit code $? at $(date -u +%T) load: $(uptime | sed 's/.*load average: //')"
}

CACHE="$(mktemp -d -t inductor-cold-XXXX)"
one cold "$CACHE"
for repeat in $(seq 1 "${REPEATS:-2}"); do
    one "warm_$repeat" "$CACHE"
done
rm -rf "$CACHE"
"$PY" -m bench.compile_summary "$OUT" | tee "$OUT/summary.txt"
