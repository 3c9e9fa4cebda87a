#!/usr/bin/env bash
# One call of the proxy study (README, "Tiny-ImageNet proxy") on the project's GPU machine, where `cdl` is not
# installed and the files come back only from $OUT (at most 8 files, so the results come back as one results.tgz).
# Carry `.whl` (jsonargparse wheels) and `.data` holding:
#   .data/proxy-cl.npz              cdl pack ../shared/data/tiny-imagenet-32.npz .data/proxy-cl.npz --classes '{seed: 0, start: 102}'
#   .data/backbones/teacher.pth     the pretrained backbones (configs/proxy/pretrain.sh, float16: 11 MB + 2.4 MB)
#   .data/backbones/student.pth
# usage: [LEARNERS=l2p] bash benchmarks/proxy_device_call.sh SEEDS [RUNS_AT_ONCE=8] [STOP_AFTER=380]
#        (SEEDS e.g. "1" or "1, 2"; LEARNERS: only those learners of the sweep, e.g. to finish one group)
# The sweep starts no run after STOP_AFTER seconds (cdl sweep --stop-after), so the call ends between runs; its run
# folders live on the machine only while it stays warm: give each call whole (learner, seed) groups to finish.
set -uo pipefail
SEEDS=${1:?usage: proxy_device_call.sh SEEDS [RUNS_AT_ONCE] [STOP_AFTER]}
RUNS_AT_ONCE=${2:-8}
STOP_AFTER=${3:-380}
OUT=${OUT:-runs/proxy/out}
export PYTHONUNBUFFERED=1
mkdir -p runs/proxy/backbones "$OUT/r"
cp .data/backbones/*.pth runs/proxy/backbones/
cp .data/proxy-cl.npz runs/proxy/tiny-imagenet-proxy-cl.npz
(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "no GPU") | tee "$OUT/r/gpu.txt"
sha256sum runs/proxy/backbones/*.pth | tee "$OUT/r/backbones.sha256"
start=$(date +%s)
${PYTHON:-python3} -m cdl_lightning.cli sweep configs/proxy/sweep_packed.yaml --seeds "${SEEDS// /}" \
    ${LEARNERS:+--learners "$LEARNERS"} --gpus 0 --runs-per-gpu "$RUNS_AT_ONCE" --stop-after "$STOP_AFTER" \
    ${SWEEP_ARGS:-} > "$OUT/r/sweep.log" 2>&1
echo "sweep exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/r/sweep.log"
out=runs/sweeps/proxy
cp "$out"/table.md "$out"/runs.json "$out"/runs.csv "$OUT/r/" 2>/dev/null
# only this call's seeds: on a machine still warm from an earlier call, $out also holds that call's runs
for seed in ${SEEDS//,/ }; do
    find "$out" -path "*/seed$seed/*" -name metrics.json | while read -r f; do rel=${f#"$out"/}; cp "$f" "$OUT/r/${rel//\//_}"; done
done
tail -30 "$OUT/r/sweep.log"
(cd "$OUT" && tar czf results.tgz r && rm -rf r)
