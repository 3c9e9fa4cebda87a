#!/usr/bin/env bash
# session-local driver (untracked): per-step timeouts, logs in /tmp/res, tar to $OUT at the end
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
step() { local name=$1 t=$2; shift 2; echo "== $(date -u +%H:%M:%S) $name: $*"; timeout -k 10 $t "$@" > $R/$name.log 2>&1; echo "== $(date -u +%H:%M:%S) $name exit $?"; grep -v '^{' $R/$name.log | tail -${TAIL:-10}; tar czf $OUT/res.tgz -C /tmp res; }
finish() { tar czf $OUT/res.tgz -C /tmp res; }
trap finish EXIT
{ nvidia-smi --query-gpu=name,uuid,driver_version --format=csv; git log --oneline -1; git status --short | head; } > $R/gpu.txt 2>&1; cat $R/gpu.txt
TP=(python3 benchmarks/throughput.py --cases train-learner train-distill --pairs b-s --precision bf16)
case ${1:-A} in
A)
  step tp_default 120 "${TP[@]}"
  step tp_gemm 120 "${TP[@]}" --patch-embed-gemm
  step tp_compile 300 "${TP[@]}" --compile
  step ops 100 python3 benchmarks/ops.py
  ;;
B)
  step gpu_tests 330 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA --durations=15
  step cfp_default 120 python3 benchmarks/check_fast_paths.py
  step cfp_gemm 120 python3 benchmarks/check_fast_paths.py --patch-embed-gemm
  ;;
C)
  step tp_compile_gemm 200 "${TP[@]}" --compile --patch-embed-gemm
  TAIL=30 step e2e1 260 bash benchmarks/gpu_checks.sh .data/tiny-imagenet-32.npz $R/e2e e2e1
  TAIL=30 step e2e1cg 330 bash benchmarks/gpu_checks.sh .data/tiny-imagenet-32.npz $R/e2ecg e2e1cg
  ;;
D)
  export RUNS=/tmp/runs
  LEVERS='--model.init_args.patch_embed_gemm true' TAG=gemm TAIL=30 step e2e1g 200 bash benchmarks/gpu_checks.sh .data/tiny-imagenet-32.npz $R/e2eg e2e1x
  LEVERS='--model.init_args.compile true --model.init_args.patch_embed_gemm true' TAG=cg3 TEACHER=/tmp/runs/gemm/coda-b/checkpoints/last.ckpt EPOCHS_PER_TASK=3 TAIL=30 step e2e_s_cg3 330 bash benchmarks/gpu_checks.sh .data/tiny-imagenet-32.npz $R/e2ecg3 e2e1x
  ;;
esac
