# device call 3: seed 0 of the whole proxy study (3 learners x teacher + 7 methods), six runs at a time on GPU 0
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p runs/proxy/backbones $OUT/r
cp .data/backbones/*.pth runs/proxy/backbones/
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/r/gpu.txt
start=$(date +%s)
timeout -s INT 390 python3 -m cdl_lightning.cli sweep .gpu/p/sweep_seed0_dev.yaml --gpus 0,0,0,0,0,0 > $OUT/r/sweep.log 2>&1
echo "sweep rc $? wall: $(( $(date +%s) - start )) s" | tee -a $OUT/r/sweep.log
sleep 3
out=runs/sweeps/proxy
python3 -m cdl_lightning.cli sweep .gpu/p/sweep_seed0_dev.yaml --table-only > $OUT/r/table_only.log 2>&1
cp $out/table.md $out/runs.json $out/runs.csv $OUT/r/ 2>/dev/null
find $out -name metrics.json | while read -r f; do rel=${f#"$out"/}; cp "$f" "$OUT/r/${rel//\//_}"; done
find $out -name sweep.log | while read -r f; do rel=${f#"$out"/}; tail -5 "$f" > "$OUT/r/${rel//\//_}"; done
tail -30 $OUT/r/sweep.log
cd $OUT && tar czf results.tgz r && rm -rf r
