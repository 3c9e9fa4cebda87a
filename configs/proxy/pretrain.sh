#!/usr/bin/env bash
# Pretrain the proxy's two backbones on the 102 pretraining classes of Tiny-ImageNet (32 px), each on its own,
# supervised, with a linear probe on the 100 held-out (continual) classes. Cached: a rerun with the same recipe is
# skipped. Run from the repository root; NPZ defaults to the pack next to the repository.
#   bash configs/proxy/pretrain.sh            # both backbones, at the same time on one GPU
# Teacher: ViT-Ti/4 (width 192, 12 blocks, 5.5 M parameters); student: a ViT/4 of width 128 and 6 blocks (1.2 M),
# the same 8 x 8 patch grid (FitNets and ReviewKD compare tokens one to one). Weights are saved as float16
# (training runs on float32 master weights) so both files and the continual data fit one device-machine transfer.
set -euo pipefail
NPZ=${NPZ:-../shared/data/tiny-imagenet-32.npz}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-40}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-10}
CDL=${CDL:-cdl}
CLASS_SPLIT=${CLASS_SPLIT:-102}  # the first K classes of the seed-0 permutation pretrain; the rest are continual
COMMON=(--source npz --npz "$NPZ" --decode-workers 4 --class-split "$CLASS_SPLIT" --split-seed 0 --probe --precision bf16
        --batch-size 256 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 3 --label-smoothing 0.1 --jitter 0.3
        --save-dtype float16 ${PRETRAIN_EXTRA:-})
pids=()
$CDL pretrain --out runs/proxy/backbones/teacher.pth --name vit_tiny_patch16_224 "${COMMON[@]}" \
    --epochs "$TEACHER_EPOCHS" --model-kwargs '{"img_size": 32, "patch_size": 4, "drop_path_rate": 0.1}' &
pids+=($!)
$CDL pretrain --out runs/proxy/backbones/student.pth --name vit_tiny_patch16_224 "${COMMON[@]}" \
    --epochs "$STUDENT_EPOCHS" \
    --model-kwargs '{"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 2, "drop_path_rate": 0.05}' &
pids+=($!)
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done  # both finish (or fail) before this script returns
exit $status
