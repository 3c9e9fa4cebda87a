#!/usr/bin/env bash
# The whole proxy study on one GPU, from the repository root: pretrain the two backbones (cached), pack the 100
# continual classes, then the sweep (resumable: run again to continue). SEEDS picks a slice of the sweep file's
# seeds (cdl sweep --seeds, e.g. SEEDS=0 for seed 0 only; the full study is the default); RUNS_AT_ONCE runs that many at a time on GPU 0;
# STOP_AFTER=SECONDS starts no run after that long (cdl sweep --stop-after; the same command continues).
#   bash configs/proxy/study.sh
set -euo pipefail
NPZ=${NPZ:-../shared/data/tiny-imagenet-32.npz}
CDL=${CDL:-cdl}
RUNS_AT_ONCE=${RUNS_AT_ONCE:-8}
PACKED=runs/proxy/tiny-imagenet-proxy-cl.npz
${PYTHON:-python3} -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    echo "study.sh: warning: no CUDA GPU here; the pretraining and the 72 runs take many hours on a CPU" >&2
start=$(date +%s)
NPZ=$NPZ CDL=$CDL bash configs/proxy/pretrain.sh
echo "pretraining: $(( $(date +%s) - start )) s"
[ -f "$PACKED" ] || $CDL pack "$NPZ" "$PACKED" --classes '{seed: 0, start: 102}'
start=$(date +%s)
$CDL sweep configs/proxy/sweep_packed.yaml --gpus 0 --runs-per-gpu "$RUNS_AT_ONCE" ${SEEDS:+--seeds "$SEEDS"} \
    ${STOP_AFTER:+--stop-after "$STOP_AFTER"}
echo "sweep: $(( $(date +%s) - start )) s"
