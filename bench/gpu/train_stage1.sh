#!/usr/bin/env bash
# Stage-1 training of the QSMGAN generator on the GPU machine, within a wall-time budget (bench/gpu/train_for.py
# around `monai.bundle run training --config_file configs/train.json`), warm-started from the shipped
# bundle/models/model.pt. Run from the repository root, on the device with carry [".gpu_wheels"]:
#
#     bash bench/gpu/train_stage1.sh
#
# Writes to $OUT (or OUT_DIR; default /tmp/qsm_gpu_out here): stage1_model_fp16.pt (best generator on the validation
# brains, float16 state dict; split into .partNN files only if over 15.9 MiB), train_stage1.json (iterations, wall
# time, it/s, validation curve, GPU, versions, log tail), train_stage1.log (whole log), config_used.json.
# All tunables are environment variables (defaults below, printed at start). A CPU dry run:
#     DEVICE=cpu TIME_BUDGET_S=60 BATCH=2 FEATURES="[4,4,8,8,8,4]" ITERS_PER_EPOCH=2 EPOCHS=2 BRAIN_POOL=1 \
#         VAL_CASES=1 VAL_SHAPE="[48,48,48]" PYTHON=python OUT_DIR=/tmp/gpu_out bash bench/gpu/train_stage1.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

DEVICE="${DEVICE:-cuda}"                  # cuda, cuda:0 or cpu
BATCH="${BATCH:-16}"                      # patches per iteration
AUTOCAST="${AUTOCAST:-true}"              # bf16 autocast of the U-Net: true, false or "auto"
LR="${LR:-0.0005}"                        # Adam learning rate (the shipped phase 1b fine-tuned at 5e-4)
EPOCHS="${EPOCHS:-40}"                    # upper bound: the epochs that fit in the budget are run, cosine LR compressed
ITERS_PER_EPOCH="${ITERS_PER_EPOCH:-250}" # iterations between validations
TIME_BUDGET_S="${TIME_BUDGET_S:-500}"     # wall seconds of the python process (imports, data set-up, validations)
PRETRAINED="${PRETRAINED-models/model.pt}" # warm start (relative to bundle/); PRETRAINED= starts from scratch
SEED="${SEED:-3}"                         # stream seed (0 and 2 were used by the shipped phases)
FEATURES="${FEATURES:-}"                  # e.g. "[4,4,8,8,8,4]"; empty: the config's [16,32,64,128,256,16]
BRAIN_POOL="${BRAIN_POOL:-32}"            # whole brains in the training pool (built on the CPU, ~1 s each)
PHANTOM_WEIGHTS="${PHANTOM_WEIGHTS:-[0.3, 0.3, 0.4]}" # random sources, brain crops, realistic heads
HEAD_POOL="${HEAD_POOL:-2}"              # background-removed whole heads in the pool (~60 s each on 1 CPU core)
VAL_CASES="${VAL_CASES:-2}"               # whole validation brains per validation
VAL_SHAPE="${VAL_SHAPE:-}"                # empty: the config's [160,192,160]
SW_BATCH="${SW_BATCH:-16}"                # sliding-window batch in validation
CUDNN_BENCHMARK="${CUDNN_BENCHMARK:-1}"   # cuDNN autotuning (training shapes are fixed)
RUN_DIR="${RUN_DIR:-/tmp/qsm_stage1}"     # the run's output_dir (checkpoints, TensorBoard); emptied first
OUT_DIR="${OUT:-${OUT_DIR:-/tmp/qsm_gpu_out}}"
HARD_TIMEOUT_S="${HARD_TIMEOUT_S:-$((${TIME_BUDGET_S%.*} + 45))}" # kill the python process after this
EXTRA_ARGS="${EXTRA_ARGS:-}"              # more `--key value` overrides, word-split
export PYTHONUNBUFFERED=1

mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/train_stage1.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
echo "train_stage1: $(date -u +%FT%TZ) on $(hostname)"
for v in DEVICE BATCH AUTOCAST LR EPOCHS ITERS_PER_EPOCH TIME_BUDGET_S PRETRAINED SEED FEATURES BRAIN_POOL HEAD_POOL \
    PHANTOM_WEIGHTS VAL_CASES VAL_SHAPE SW_BATCH CUDNN_BENCHMARK RUN_DIR OUT_DIR HARD_TIMEOUT_S EXTRA_ARGS; do
    printf '  %-16s %s\n' "$v" "${!v}"
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader

# shellcheck source=bench/gpu/setup.sh
source bench/gpu/setup.sh || { echo "train_stage1: setup failed"; exit 3; }

rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"
ARGS=(run training --config_file configs/train.json
    --device "\$torch.device('$DEVICE')"
    --output_dir "$RUN_DIR"
    --batch_size "$BATCH"
    --autocast "$AUTOCAST"
    --learning_rate "$LR"
    --epochs "$EPOCHS"
    --iterations_per_epoch "$ITERS_PER_EPOCH"
    --seed "$SEED"
    --brain_pool_size "$BRAIN_POOL"
    --phantom_weights "$PHANTOM_WEIGHTS"
    --head_pool_size "$HEAD_POOL"
    --num_val_cases "$VAL_CASES"
    --sw_batch_size "$SW_BATCH"
    --pretrained "${PRETRAINED:-null}")
[ -n "$FEATURES" ] && ARGS+=(--features "$FEATURES")
[ -n "$VAL_SHAPE" ] && ARGS+=(--val_shape "$VAL_SHAPE")
# shellcheck disable=SC2206
[ -n "$EXTRA_ARGS" ] && ARGS+=($EXTRA_ARGS)

export TIME_BUDGET_S CUDNN_BENCHMARK RESULTS_DIR="$OUT_DIR"
export MODEL_NAME=stage1_model_fp16.pt RESULTS_NAME=train_stage1.json
start=$(date +%s)
(cd bundle && timeout -k 10 "$HARD_TIMEOUT_S" "$PY" ../bench/gpu/train_for.py "${ARGS[@]}")
rc=$?
echo "train_stage1: train_for.py exit status $rc after $(($(date +%s) - start)) s"
cp -f "$RUN_DIR/config_used.json" "$OUT_DIR/config_used.json" 2>/dev/null || true

# the results JSON gets the exit status and the log's tail (also when python was killed)
sleep 1
"$PY" - "$OUT_DIR/train_stage1.json" "$LOG" "$rc" <<'PYEOF'
import json, os, sys
path, log, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = json.load(open(path)) if os.path.isfile(path) else {"status": "no results written"}
data["exit_status"] = rc
if rc in (124, 137):
    data["status"] = "killed by HARD_TIMEOUT_S"
data["log_tail"] = open(log, errors="replace").read().splitlines()[-60:]
json.dump(data, open(path, "w"), indent=2)
best = data.get("best") or {}
print(f"train_stage1: status {data.get('status')}, {data.get('iterations')} iterations, "
      f"{data.get('it_per_s_steady')} it/s steady, best val NRMSE {best.get('val_nrmse')} "
      f"(start {(data.get('validation') or [{}])[0].get('val_nrmse')}), files {data.get('model_files')}")
PYEOF
ls -l "$OUT_DIR"
sleep 1  # let tee write the last lines
exit "$rc"
