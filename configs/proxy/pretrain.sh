#!/usr/bin/env bash
# Pretrain the proxy's two backbones on the 102 pretraining classes of Tiny-ImageNet (32 px), each on its own,
# supervised, with a linear probe on the 100 held-out (continual) classes. Cached: a rerun with the same recipe is
# skipped. Run from the repository root; NPZ defaults to the pack next to the repository.
#   bash configs/proxy/pretrain.sh            # both backbones, at the same time on one GPU
set -euo pipefail
NPZ=${NPZ:-../shared/data/tiny-imagenet-32.npz}
EPOCHS=${EPOCHS:-40}
CDL=${CDL:-cdl}
COMMON=(--source npz --npz "$NPZ" --decode-workers 4 --class-split 102 --split-seed 0 --probe --precision bf16
        --batch-size 256 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 3 --epochs "$EPOCHS" --label-smoothing 0.1
        --jitter 0.3 ${PRETRAIN_EXTRA:-})
$CDL pretrain --out runs/proxy/backbones/teacher.pth --name vit_small_patch16_224 "${COMMON[@]}" \
    --model-kwargs '{"img_size": 32, "patch_size": 4, "drop_path_rate": 0.1}' ${TEACHER_EXTRA:-} &
$CDL pretrain --out runs/proxy/backbones/student.pth --name vit_tiny_patch16_224 "${COMMON[@]}" \
    --model-kwargs '{"img_size": 32, "patch_size": 8, "drop_path_rate": 0.1}' ${STUDENT_EXTRA:-} &
wait -n && wait -n
