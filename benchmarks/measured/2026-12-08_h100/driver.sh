#!/usr/bin/env bash
# session-local driver (untracked): per-step timeouts, logs in /tmp/res, tar to $OUT after each step
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
step() { local name=$1 t=$2; shift 2; echo "== $(date -u +%H:%M:%S) $name: $*"; timeout -k 10 $t "$@" > $R/$name.log 2>&1; echo "== $(date -u +%H:%M:%S) $name exit $?"; grep -v '^{' $R/$name.log | tail -${TAIL:-10}; tar czf $OUT/res.tgz -C /tmp res; }
finish() { tar czf $OUT/res.tgz -C /tmp res; }
trap finish EXIT
{ nvidia-smi --query-gpu=name,uuid,driver_version --format=csv; git log --oneline -1; git status --short | head; } > $R/gpu.txt 2>&1; cat $R/gpu.txt
TD=(python3 benchmarks/throughput.py --cases train-distill --pairs b-s --precision bf16)
TP=(python3 benchmarks/throughput.py --cases train-learner train-distill --pairs b-s --precision bf16)
G=".data/tiny-imagenet-32.npz"
case ${1:-A} in
A)
  step tp_d_ctp_gemm 170 "${TD[@]}" --compile --compile-training-pass --patch-embed-gemm
  step tp_d_c_gemm 130 "${TD[@]}" --compile --patch-embed-gemm
  TAIL=25 step gpu_test_compile 170 python3 -m pytest -m gpu tests/gpu/test_gpu_compile_graphs.py -q -p no:cacheprovider -rA
  TAIL=30 step cfp_ctp 110 python3 benchmarks/check_fast_paths.py --compile --compile-training-pass
  ;;
B)
  export RUNS=/tmp/runs
  TAIL=30 step e2e1cg 560 bash benchmarks/gpu_checks.sh $G $R/e2ecg e2e1cg
  ;;
C)
  export RUNS=/tmp/runs
  TAIL=30 step e2e1 300 bash benchmarks/gpu_checks.sh $G $R/e2e e2e1
  ;;
esac
