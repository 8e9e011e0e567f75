#!/usr/bin/env bash
# The GPU check of the speed issues, in one go and in about 8 minutes on one card.
#
#   bash bench/gpu_check.sh            on a CUDA machine, from anywhere; results in $OUT (or a temp folder)
#   bash bench/gpu_check.sh --dry-run  the same runs on the CPU with builtin:tiny-sd / tiny-sdxl, to check the
#                                      plumbing (the cuda_graphs runs then show their CPU fallback)
#
# Runs `python -m bench` once per configuration, each in its own process with its own time limit, so that a
# failure or a timeout loses that configuration only: SD 1.5 architecture (random weights) at 512 px batch 1 and
# batch 16, SDXL, SD 3.5 Medium and FLUX.1-dev architectures at 1024 px batch 1, bf16, rank 16, each eager, with compile_unet on (regional
# compilation of the repeated blocks) and, at batch 1, with cuda_graphs (the regionally compiled blocks under
# torch.compile mode reduce-overhead); the trainer and, for SD 1.5, the floor. `1st win +s` in the summary is
# what each run's first window took beyond its steps: the first compile, with the inductor cache cold for the
# first run of each model and shape (the check uses a cache folder of its own, fresh unless
# TORCHINDUCTOR_CACHE_DIR is set). Then, while the budget lasts, the price of one host sync per step and of
# dropping channels-last (batch 16 floor).
# Writes three files to $OUT: gpu_log.txt (everything printed), gpu_results.json (every figure, the card, driver
# and versions) and gpu_summary.txt (a table and the issue's targets, met or missed).
set -uo pipefail
export PYTHONUNBUFFERED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d -t gpu-check-XXXX)}"
mkdir -p "$OUT"
RUNS="$(mktemp -d -t gpu-check-runs-XXXX)"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$RUNS/inductor-cache}"
DRY=0
for arg in "$@"; do
    [[ "$arg" == "--dry-run" ]] && DRY=1
done
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"  # for the runs; the environment and the summary take a few seconds more
SCALE=1  # the dry run's tiny models compile for minutes on a 2-core CPU: its limits are this many times longer
[[ $DRY == 1 ]] && BUDGET_S="${GPU_CHECK_BUDGET_S:-2400}" && SCALE=6

if [[ $DRY == 1 ]]; then
    SD15=(--model builtin:tiny-sd --resolution 64 --device cpu --precision no --image-size 64)
    SDXL=(--model builtin:tiny-sdxl --resolution 64 --device cpu --precision no --image-size 64)
    FLUX=(--model builtin:tiny-flux --resolution 64 --device cpu --precision no --image-size 64)
    SD35M=(--model builtin:tiny-sd3 --resolution 64 --device cpu --precision no --image-size 64)
    BIG_BATCH=(--batch 4 --images 8)
    STEPS=(--steps 1 --windows 2)
    GRAPHS=(--device auto --cuda-graphs)  # cuda_graphs refuses device cpu; auto shows the run-time fallback
    OFFLOAD=(1 2)  # tiny-flux has 3 blocks (on the CPU offloading is a no-op: the plumbing only)
else
    SD15=(--model builtin:sd15-arch --resolution 512 --device cuda --precision bf16)
    SDXL=(--model builtin:sdxl-arch --resolution 1024 --device cuda --precision bf16)
    FLUX=(--model builtin:flux-dev-arch --resolution 1024 --device cuda --precision bf16)
    SD35M=(--model builtin:sd35m-arch --resolution 1024 --device cuda --precision bf16)
    BIG_BATCH=(--batch 16 --images 32)
    STEPS=()
    GRAPHS=(--cuda-graphs)
    OFFLOAD=(8 16)  # of FLUX.1-dev's 57 blocks
fi

# run NAME CAP_S MIN_S ARGS...: one configuration, skipped when less than MIN_S seconds of the budget are left.
run() {
    local name=$1 cap=$(($2 * SCALE)) min=$(($3 * SCALE))
    shift 3
    local left=$((BUDGET_S - SECONDS))
    if ((left < min)); then
        echo "== $name: skipped ($left s of the budget left, it needs about $min s)"
        return
    fi
    local limit=$((cap < left ? cap : left))
    echo "== $name (limit ${limit}s, ${SECONDS}s into the check): python -m bench $*"
    timeout -k 10 "$limit" "$PY" -m bench --label "$name" --rank 16 --json "$RUNS/$name.json" "$@"
    local code=$?
    echo "$code" >"$RUNS/$name.status"
    echo "== $name: exit code $code after ${SECONDS}s"
}

main() {
    echo "== GPU check $(date -u +%FT%TZ) in $REPO; results in $OUT; dry run: $DRY"
    nvidia-smi || echo "(no nvidia-smi)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    "$PY" - <<'EOF' || echo "(the environment check failed)"
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("diffusers", "transformers", "peft", "accelerate", "pydantic", "safetensors"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "MISSING", error)
EOF
    full_check
    echo "== runs done after ${SECONDS}s"
    "$PY" -m bench.collect "$RUNS" "$OUT" || echo "(collecting the results failed; the per-run JSON is in $RUNS)"
    echo "== GPU check done after ${SECONDS}s; files in $OUT"
}

full_check() {
    # name                  cap  min  arguments (the eager baselines first, then compile, graphs, the extras)
    run sd15_b1              70  40  "${SD15[@]}" --batch 1 --steps 10 --windows 4 "${STEPS[@]}" --phases trainer,floor
    run sd15_b16             60  35  "${SD15[@]}" "${BIG_BATCH[@]}" --steps 3 --windows 4 "${STEPS[@]}" --phases trainer,floor
    run sdxl_b1              75  45  "${SDXL[@]}" --batch 1 --steps 4 --windows 4 "${STEPS[@]}" --phases trainer
    run sd15_b1_regional    110  60  "${SD15[@]}" --batch 1 --steps 10 --windows 4 "${STEPS[@]}" --compile on \
        --phases trainer,floor
    run sd15_b1_graphs      100  50  "${SD15[@]}" --batch 1 --steps 10 --windows 4 "${STEPS[@]}" --compile on \
        "${GRAPHS[@]}" --phases trainer,floor
    run sdxl_b1_regional    120  70  "${SDXL[@]}" --batch 1 --steps 4 --windows 4 "${STEPS[@]}" --compile on \
        --phases trainer
    run sdxl_b1_graphs      100  60  "${SDXL[@]}" --batch 1 --steps 4 --windows 4 "${STEPS[@]}" --compile on \
        "${GRAPHS[@]}" --phases trainer
    run sd15_b16_regional    90  50  "${SD15[@]}" "${BIG_BATCH[@]}" --steps 3 --windows 4 "${STEPS[@]}" --compile on \
        --phases trainer
    # the flow-matching transformers at full size (random weights; building FLUX.1-dev's 12B parameters on the
    # host takes a while, hence the caps): eager, batch 1, gradient checkpointing as auto decides
    run sd35m_b1            150  90  "${SD35M[@]}" --batch 1 --steps 3 --windows 3 "${STEPS[@]}" --phases trainer
    run flux_dev_b1         240 150  "${FLUX[@]}" --batch 1 --steps 3 --windows 3 "${STEPS[@]}" --phases trainer
    # FLUX.1-dev on a small card's budget: an fp8 base and checkpointing, with 0, 8 and 16 of its 57
    # blocks offloaded to the CPU (offload_blocks; memory_mode auto picks 16 for 12 GiB free), at 1024 px: the
    # peak against the estimate and the s/step offloading costs (the issue's target: at most 2x). Not yet run on
    # a GPU; with the rows above they need more than the default budget (GPU_CHECK_BUDGET_S=1200). AdamW (not
    # 8-bit: bitsandbytes 0.50's state_dict nests a dict the checkpoint writer refuses, on the CPU at least)
    run flux_dev_fp8_ckpt   240 150  "${FLUX[@]}" --batch 1 --steps 3 --windows 3 "${STEPS[@]}" --phases trainer \
        --gradient-checkpointing --base-quantization fp8
    run flux_dev_fp8_off8   240 150  "${FLUX[@]}" --batch 1 --steps 3 --windows 3 "${STEPS[@]}" --phases trainer \
        --gradient-checkpointing --base-quantization fp8 --offload-blocks "${OFFLOAD[0]}"
    run flux_dev_fp8_off16  240 150  "${FLUX[@]}" --batch 1 --steps 3 --windows 3 "${STEPS[@]}" --phases trainer \
        --gradient-checkpointing --base-quantization fp8 --offload-blocks "${OFFLOAD[1]}"
    run sd15_b1_sync         40  25  "${SD15[@]}" --batch 1 --steps 10 --windows 4 "${STEPS[@]}" --phases floor --floor-sync
    run sd15_b16_nchw        45  30  "${SD15[@]}" "${BIG_BATCH[@]}" --steps 3 --windows 4 "${STEPS[@]}" --phases floor \
        --floor-contiguous
}

main 2>&1 | tee -a "$OUT/gpu_log.txt"
