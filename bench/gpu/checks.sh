#!/usr/bin/env bash
# The bundle's GPU checks in one prepared script (≤ 8 min by default), run from the repository root on the device
# with carry [".gpu_wheels"]:
#
#     bash bench/gpu/checks.sh
#
# Steps (each under `timeout`, timed, never stopping the script; a step is skipped when the overall budget
# CHECKS_BUDGET_S is spent):
#   env          GPU, driver, torch/CUDA/cuDNN versions, nvidia-smi
#   tests        the tests whose code paths change on a CUDA machine (CUDA-vs-CPU baselines, GPU-saved
#                checkpoints, autocast resolution, TorchScript/ONNX export and inference with the exported file)
#   demo         the inference demo (`run inference`, simulated 1 mm brain, 160×192×160, four microbleeds) on the
#                GPU, whole pipeline timed with its parts (setup, loading, network, postprocessing incl. the CG
#                refinement and writing, report) by bench/gpu/time_inference.py
#   infer_bench  bench/bench_inference.py: network-only time of a 200³ brain (float32 channels-last as shipped,
#                bf16 autocast, naive reference), best of INF_REPEATS
#   train_bench  bench/bench_training.py: iterations/s of stage 1 and stage 2 (WGAN-GP) under bf16 autocast at
#                batch BATCH, data share
#   ddp          `torchrun --standalone --nproc_per_node=1` stage-1 smoke with configs/multi_gpu_train.json (nccl
#                on CUDA), 2 iterations, tiny features
# Results: $OUT/gpu_checks.json (one file: GPU, each step's status, seconds and figures) and $OUT/gpu_checks.log
# (everything printed). Tunables (environment, printed at start): see the defaults below. A CPU dry run:
#     DEVICE=cpu TINY=1 PYTHON=python OUT_DIR=/tmp/gpu_checks bash bench/gpu/checks.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
T_START=$(date +%s)

CHECKS_BUDGET_S="${CHECKS_BUDGET_S:-450}"  # the whole script, setup included
STEPS="${STEPS:-env tests demo infer_bench train_bench ddp}"
DEVICE="${DEVICE:-cuda}"
BATCH="${BATCH:-16}"                        # training benchmark batch
TRAIN_ITERS="${TRAIN_ITERS:-10}"            # timed iterations per stage (after TRAIN_WARMUP)
TRAIN_WARMUP="${TRAIN_WARMUP:-3}"
INF_SHAPE="${INF_SHAPE:-200 200 200}"       # network-only benchmark volume (the model card's CPU figure is at 200³)
INF_REPEATS="${INF_REPEATS:-3}"
DEMO_SHAPE="${DEMO_SHAPE:-}"                # empty: the demo's 160×192×160 (as the model card's CPU figure)
SW_BATCH="${SW_BATCH:-16}"                  # sliding-window batch for the demo and the benchmark
PYTEST_ARGS="${PYTEST_ARGS:-tests/test_baselines.py tests/test_inference.py tests/test_networks.py \
tests/test_export.py}"
PYTEST_K="${PYTEST_K:-cuda or gpu or autocast or export}"
TINY="${TINY:-0}"                           # 1: tiny networks and volumes (CPU dry runs)
WORK="${WORK_DIR:-/tmp/qsm_checks}"
OUT_DIR="${OUT:-${OUT_DIR:-/tmp/qsm_gpu_out}}"
T_TESTS="${T_TESTS:-150}" T_DEMO="${T_DEMO:-150}" T_INFER="${T_INFER:-120}" T_TRAIN="${T_TRAIN:-180}"
T_DDP="${T_DDP:-120}"
export PYTHONUNBUFFERED=1

mkdir -p "$OUT_DIR"
rm -rf "$WORK"
mkdir -p "$WORK"
LOG="$OUT_DIR/gpu_checks.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
echo "gpu_checks: $(date -u +%FT%TZ) on $(hostname), $(nproc) CPUs"
for v in CHECKS_BUDGET_S STEPS DEVICE BATCH TRAIN_ITERS TRAIN_WARMUP INF_SHAPE INF_REPEATS DEMO_SHAPE SW_BATCH \
    PYTEST_ARGS PYTEST_K TINY WORK OUT_DIR T_TESTS T_DEMO T_INFER T_TRAIN T_DDP; do
    printf '  %-16s %s\n' "$v" "${!v}"
done

setup_t0=$(date +%s.%N)
# shellcheck source=bench/gpu/setup.sh
source bench/gpu/setup.sh
SETUP_RC=$?
printf 'setup\t%s\t%s\t%s\n' "$([ $SETUP_RC = 0 ] && echo ok || echo failed)" "$SETUP_RC" \
    "$(awk -v a="$setup_t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')" >"$WORK/steps.tsv"
PY="${PY:-python3}"
export PY DEVICE WORK

want() { [[ " $STEPS " == *" $1 "* ]]; }

step() {  # step NAME TIMEOUT_S "COMMAND" (run with bash -c from the repository root; output in $WORK/NAME.log)
    local name=$1 limit=$2 command=$3 left t0 rc status
    if ! want "$name"; then
        printf '%s\tnot run (not in STEPS)\t\t0\n' "$name" >>"$WORK/steps.tsv"
        return
    fi
    left=$((T_START + CHECKS_BUDGET_S - $(date +%s) - 10))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "===== step $name: skipped, the budget of $CHECKS_BUDGET_S s is spent"
        printf '%s\tskipped (budget spent)\t\t0\n' "$name" >>"$WORK/steps.tsv"
        return
    fi
    echo "===== step $name (timeout $limit s) at $(date -u +%T): $(echo "$command" | grep -m1 .)"
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" bash -c "$command" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="timeout after $limit s" ;;
        *) status=failed ;;
    esac
    local seconds
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    echo "===== step $name: $status (exit $rc) in $seconds s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" >>"$WORK/steps.tsv"
}

if [ "$SETUP_RC" != 0 ]; then
    echo "gpu_checks: setup failed; the steps that need the bundle's packages will fail too"
fi

# ------------------------------------------------------------------ env
step env 60 '
command -v nvidia-smi >/dev/null && nvidia-smi
"$PY" - <<PYEOF
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                nccl=".".join(map(str, torch.cuda.nccl.version())))
try:
    import monai, ignite, nibabel
    info.update(monai=monai.__version__, ignite=ignite.__version__, nibabel=nibabel.__version__)
except ImportError as e:
    info["import_error"] = str(e)
print("ENV " + json.dumps(info))
PYEOF'

# ------------------------------------------------------------------ tests
step tests "$T_TESTS" "\"\$PY\" -m pytest -q -rs -p no:cacheprovider $PYTEST_ARGS -k \"$PYTEST_K\""

# ------------------------------------------------------------------ demo: whole inference pipeline
DEMO_ARGS="--device \"\\\$torch.device('$DEVICE')\" --sw_batch_size $SW_BATCH --output_dir $WORK/demo"
[ -n "$DEMO_SHAPE" ] && DEMO_ARGS+=" --demo_case#shape \"$DEMO_SHAPE\""
if [ "$TINY" = 1 ]; then
    "$PY" - "$WORK/tiny.pt" <<'PYEOF'
import sys, torch
sys.path.insert(0, "bundle")
from scripts.networks import QSMGenerator, qsmgan_unet
torch.manual_seed(0)
torch.save(QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).state_dict(), sys.argv[1])
PYEOF
    DEMO_ARGS+=" --features \"[4,4,8,8,8,4]\" --checkpoint $WORK/tiny.pt --dc_iterations 3"
    [ -z "$DEMO_SHAPE" ] && DEMO_ARGS+=" --demo_case#shape \"[48,48,48]\""
fi
step demo "$T_DEMO" "cd bundle && \"\$PY\" ../bench/gpu/time_inference.py run inference \
--config_file configs/inference.json $DEMO_ARGS"

# ------------------------------------------------------------------ network-only inference benchmark
INF_CMD="\"\$PY\" bench/bench_inference.py --device $DEVICE --shape $INF_SHAPE --repeats $INF_REPEATS"
INF_CMD+=" --sw_batch_size $SW_BATCH --bf16"
[ "$TINY" = 1 ] && INF_CMD="\"\$PY\" bench/bench_inference.py --device $DEVICE --shape 48 48 48 --repeats 1"
step infer_bench "$T_INFER" "$INF_CMD"

# ------------------------------------------------------------------ training throughput, both stages, bf16
TRAIN_OVERRIDE='{"brain_pool_size": 4}'
TRAIN_AUTOCAST=true
if [ "$TINY" = 1 ]; then
    TRAIN_OVERRIDE='{"brain_pool_size": 1, "features": [4,4,8,8,8,4]}'
    TRAIN_AUTOCAST=false  # bf16 is emulated (slow) on most CPUs
fi
step train_bench "$T_TRAIN" "\"\$PY\" bench/bench_training.py --device $DEVICE --autocast $TRAIN_AUTOCAST \
--batch_size $BATCH --iterations $TRAIN_ITERS --warmup $TRAIN_WARMUP --stages 1 2 --override '$TRAIN_OVERRIDE'"

# ------------------------------------------------------------------ one-GPU torchrun smoke (nccl on CUDA)
cat >"$WORK/ddp_report.json" <<'EOF'
{
    "finalize": [
        "$print('DDP backend', dist.get_backend(), 'world', dist.get_world_size(), 'device', @device, flush=True)",
        "$dist.is_initialized() and dist.destroy_process_group()"
    ]
}
EOF
step ddp "$T_DDP" "cd bundle && \"\$PY\" -m torch.distributed.run --standalone --nproc_per_node=1 -m monai.bundle \
run training --config_file \"['configs/train.json','configs/multi_gpu_train.json','$WORK/ddp_report.json']\" \
--output_dir $WORK/ddp --features '[4,4,8,8,8,4]' --brain_pool_size 1 --epochs 1 --iterations_per_epoch 2 \
--batch_size 2 --num_val_cases 1 --val_shape '[40,36,30]' && ls -l $WORK/ddp/checkpoints"

# ------------------------------------------------------------------ one results file
"$PY" bench/gpu/summarise_checks.py "$WORK" "$OUT_DIR/gpu_checks.json" "$T_START"
echo "gpu_checks: done in $(($(date +%s) - T_START)) s; $OUT_DIR/gpu_checks.json"
sleep 1  # let tee write the last lines
