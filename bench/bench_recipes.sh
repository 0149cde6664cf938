#!/usr/bin/env bash
# Equal-time comparison of stage-1 training recipes (issue 16), from the shipped weights or from scratch (per arm,
# below), one after another.
#
# Every arm is the bundle's own training workflow run through bench/gpu/train_for.py with the same wall-time budget
# (TIME_BUDGET_S, default 1800 s, set-up and validations included), the same seed (SEED, default 4), learning rate,
# phantom mix and validation interval (ITERATIONS_PER_EPOCH, default 100); the
# best generator on the two validation brains (seeds 10000-10001) and its curve are kept per arm in
# $OUT/<arm>/train_results.json. Run from the repository root; pin it to cores with taskset and set THREADS so that
# other work does not share them, e.g.
#     THREADS=1 taskset -c 1 bash bench/bench_recipes.sh /tmp/recipes baseline dipole tkd
# Arms: baseline (field only, L1: today's recipe), dipole (+ dipole model loss and gradient difference),
# tkd (a TKD estimate of the whole region as a second input channel, widened from the field-only weights),
# tkdres (the same input, residual output: chi = TKD + backbone; the widened weights with the final convolution zeroed,
# so it starts at the TKD map),
# tkdalone (the TKD estimate alone as input, residual output: chi = TKD + backbone(TKD); the field-only weights with the
# final convolution zeroed, so it also starts at the TKD map),
# batch4 (today's recipe from the shipped weights with 4 patches per step instead of 2: half the steps, steadier
# gradients and BatchNorm statistics),
# small (features 8-16-32-64-128 from scratch: more samples per hour),
# scratch (today's network from scratch: the reference for small and curriculum),
# curriculum (today's network from scratch on 32³ patches for 1,500 iterations, 48³ for 1,000, then 64³).
set -euo pipefail
out=${1:?usage: bench_recipes.sh OUT_DIR ARM [ARM ...]}
shift
out=$(realpath -m "$out")
budget=${TIME_BUDGET_S:-1800}
threads=${THREADS:-2}
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
cd "$(dirname "$0")/../bundle"
mkdir -p "$out"
common=(--seed "${SEED:-4}" --learning_rate 0.0003 --iterations_per_epoch "${ITERATIONS_PER_EPOCH:-100}" --epochs 40
    --brain_pool_size 16)
start_weights() {  # FILE IN_CHANNELS ZERO_FINAL: models/model.pt widened (new inputs zero) to IN_CHANNELS inputs;
    # ZERO_FINAL=1 zeroes the final convolution, so that a residual generator starts exactly at its estimate
    python -c "import sys, torch; sys.path.insert(0, '.'); from scripts.networks import expand_input_channels; \
s = expand_input_channels(torch.load('models/model.pt'), int(sys.argv[2])); \
final = ('backbone.final_conv.weight', 'backbone.final_conv.bias') if sys.argv[3] == '1' else (); \
s.update({k: torch.zeros_like(s[k]) for k in final}); torch.save(s, sys.argv[1])" "$1" "$2" "$3"
}
for arm in "$@"; do
    case $arm in
        baseline) extra=(--pretrained models/model.pt) ;;
        dipole) extra=(--pretrained models/model.pt --loss#dipole_weight 1.0 --loss#gdl_weight 0.1) ;;
        tkd)
            start_weights "$out/model_2ch.pt" 2 0
            extra=(--pretrained "$out/model_2ch.pt" --estimate tkd) ;;
        tkdres)
            start_weights "$out/model_2ch_res.pt" 2 1
            extra=(--pretrained "$out/model_2ch_res.pt" --estimate tkd --residual true) ;;
        tkdalone)
            start_weights "$out/model_alone_res.pt" 1 1
            extra=(--pretrained "$out/model_alone_res.pt" --estimate tkd --residual true --field_channel false) ;;
        batch4) extra=(--pretrained models/model.pt --batch_size 4) ;;
        small) extra=(--features "[8,16,32,64,128,8]" --learning_rate 0.001) ;;
        scratch) extra=(--learning_rate 0.001) ;;
        curriculum) extra=(--learning_rate 0.001 --patch_schedule "[[0, 32], [1500, 48], [2500, 64]]") ;;
        *) echo "unknown arm $arm" >&2; exit 2 ;;
    esac
    echo "== $arm: budget ${budget}s, ${threads} thread(s), $(date -u +%FT%TZ)"
    TIME_BUDGET_S=$budget RESULTS_DIR="$out/$arm" python ../bench/gpu/train_for.py run training \
        --config_file configs/train.json --output_dir "$out/$arm/run" "${common[@]}" "${extra[@]}" \
        > "$out/$arm.log" 2>&1 || echo "$arm failed: see $out/$arm.log"
    python -c "import json, sys; r = json.load(open(sys.argv[1])); \
print(sys.argv[2], 'best', r['best'], 'curve', [v.get('val_nrmse') for v in r['validation']], 'iterations', r['validation'][-1]['trained_iterations'])" \
        "$out/$arm/train_results.json" "$arm" || true
done
