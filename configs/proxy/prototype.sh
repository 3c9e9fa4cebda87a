#!/usr/bin/env bash
# The one-GPU prototype of the proxy study (what session h12 ran): pretrain the student and two teacher recipes
# (light: label smoothing + jitter; strong: + mixup/CutMix) at the same time, keep the teacher with the better
# linear probe on the held-out classes as runs/proxy/backbones/teacher.pth, then run the CODA-P seed-0 slice of the
# sweep (teacher + none/KD/KDP students, three at a time on GPU 0). Results are copied to $RESULTS (default
# runs/proxy/results). Run from the repository root.
set -euo pipefail
NPZ=${NPZ:-../shared/data/tiny-imagenet-32.npz}
EPOCHS=${EPOCHS:-40}
CDL=${CDL:-cdl}
RESULTS=${RESULTS:-runs/proxy/results}
SWEEP=${SWEEP:-configs/proxy/sweep_coda_seed0.yaml}
mkdir -p "$RESULTS" runs/proxy/backbones
start=$(date +%s)
NPZ=$NPZ EPOCHS=$EPOCHS CDL=$CDL bash configs/proxy/pretrain.sh > "$RESULTS/pretrain.log" 2>&1 &
both=$!
$CDL pretrain --out runs/proxy/backbones/teacher_mix.pth --name vit_small_patch16_224 --source npz --npz "$NPZ" \
    --decode-workers 4 --class-split 102 --split-seed 0 --probe --precision bf16 --batch-size 256 --lr 1e-3 \
    --weight-decay 0.05 --warmup-epochs 3 --epochs "$EPOCHS" --label-smoothing 0.1 --jitter 0.3 --mixup 0.8 \
    --cutmix 1.0 --model-kwargs '{"img_size": 32, "patch_size": 4, "drop_path_rate": 0.1}' \
    > "$RESULTS/pretrain_teacher_mix.log" 2>&1
wait $both
echo "pretraining: $(( $(date +%s) - start )) s"
cp runs/proxy/backbones/*.json "$RESULTS/"
${PYTHON:-python3} - <<'PY'
import json, shutil
light = json.load(open("runs/proxy/backbones/teacher.pth.json"))["result"]
mix = json.load(open("runs/proxy/backbones/teacher_mix.pth.json"))["result"]
print("teacher light:", light, "\nteacher mix:", mix)
if mix["probe_acc"] > light["probe_acc"]:
    shutil.move("runs/proxy/backbones/teacher.pth", "runs/proxy/backbones/teacher_light.pth")
    shutil.move("runs/proxy/backbones/teacher.pth.json", "runs/proxy/backbones/teacher_light.pth.json")
    shutil.copy("runs/proxy/backbones/teacher_mix.pth", "runs/proxy/backbones/teacher.pth")
    shutil.copy("runs/proxy/backbones/teacher_mix.pth.json", "runs/proxy/backbones/teacher.pth.json")
    print("teacher: the mixup/CutMix recipe")
else:
    print("teacher: the light recipe")
PY
start=$(date +%s)
$CDL sweep "$SWEEP" --gpus 0,0,0 || echo "sweep exit $?"
echo "sweep: $(( $(date +%s) - start )) s"
out=$(${PYTHON:-python3} -c "import yaml,sys; print(yaml.safe_load(open('$SWEEP'))['out'])")
for f in table.md runs.json runs.csv; do if [ -f "$out/$f" ]; then cp "$out/$f" "$RESULTS/"; fi; done
find "$out" -name metrics.json | while read -r f; do rel=${f#"$out"/}; cp "$f" "$RESULTS/${rel//\//_}"; done
