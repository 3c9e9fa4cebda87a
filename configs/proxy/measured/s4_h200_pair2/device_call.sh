# device call 2: the pair (teacher ViT-Ti/4 40 ep, student w128 d6 10 ep), then the CODA-P seed-0 slice
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p runs/proxy/backbones $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/r/gpu.txt
start=$(date +%s); start0=${start0:-$start}
NPZ=.data/tiny-imagenet-32.npz CDL="timeout 400 python3 -m cdl_lightning.cli" bash configs/proxy/pretrain.sh > $OUT/r/pretrain.log 2>&1
echo "pretraining wall: $(( $(date +%s) - start )) s" | tee -a $OUT/r/pretrain.log
grep -h "saved" $OUT/r/pretrain.log
cp runs/proxy/backbones/*.pth $OUT/; cp runs/proxy/backbones/*.json $OUT/r/
start=$(date +%s); start0=${start0:-$start}
timeout $(( 560 - $(date +%s) + start0 )) python3 -m cdl_lightning.cli sweep .gpu/p/sweep_coda_seed0_dev.yaml --gpus 0,0,0 > $OUT/r/sweep.log 2>&1
echo "sweep rc $? wall: $(( $(date +%s) - start )) s" | tee -a $OUT/r/sweep.log
out=runs/sweeps/proxy
cp $out/table.md $out/runs.json $out/runs.csv $OUT/r/ 2>/dev/null
find $out -name metrics.json | while read -r f; do rel=${f#"$out"/}; cp "$f" "$OUT/r/${rel//\//_}"; done
tail -25 $OUT/r/sweep.log
cd $OUT && tar czf results.tgz r && rm -rf r
