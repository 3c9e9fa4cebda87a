# device call 1 of the proxy study: both backbones + a half-depth ViT-Ti/4 student candidate, all at once on GPU 0
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p runs/proxy/backbones
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
start=$(date +%s)
NPZ=.data/tiny-imagenet-32.npz CDL="timeout 560 python3 -m cdl_lightning.cli" bash configs/proxy/pretrain.sh > $OUT/pretrain.log 2>&1 &
both=$!
timeout 560 python3 -m cdl_lightning.cli pretrain --out runs/proxy/backbones/student_w192d6.pth --name vit_tiny_patch16_224 \
  --source npz --npz .data/tiny-imagenet-32.npz --decode-workers 4 --class-split 102 --split-seed 0 --probe --precision bf16 \
  --batch-size 256 --lr 1e-3 --weight-decay 0.05 --warmup-epochs 3 --label-smoothing 0.1 --jitter 0.3 --save-dtype float16 \
  --epochs 60 --model-kwargs '{"img_size": 32, "patch_size": 4, "depth": 6, "drop_path_rate": 0.05}' > $OUT/pretrain_w192d6.log 2>&1
wait $both
echo "pretraining wall: $(( $(date +%s) - start )) s" | tee -a $OUT/pretrain.log
cp runs/proxy/backbones/*.pth runs/proxy/backbones/*.json $OUT/ 2>/dev/null
ls -la $OUT
grep -h "saved\|Error\|error" $OUT/*.log
