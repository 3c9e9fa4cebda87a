#!/usr/bin/env bash
# The GPU checks of a change, as run on the project's GPU machine (one or two H200s), in as few calls as possible:
#
#   bash benchmarks/gpu_checks.sh PACK.npz OUT_DIR [PART ...]
#
# PART (default: all, in this order):
#   tests   the GPU test suite (pytest -m gpu tests/gpu): fast paths bitwise equal to eager, graph counters, exact
#           resume and validate on GPU, 1-GPU == 2-GPU DDP evaluation (skips with fewer than 2 GPUs)
#   e2e1    benchmarks/e2e.py on 1 GPU: the ViT-B CODA teacher, then the ViT-B -> ViT-S KDP student taught by it
#   e2e2    benchmarks/e2e.py on 2 GPUs (DDP): the same teacher run, with the 1-GPU step rate from e2e1
#   e2e2s   e2e2 with Lightning's per-step DDP SIGTERM check (a host sync) thinned to every 50 steps
#           (cdl_lightning.callbacks.SigtermCheck): the same matrix is expected, the speed is the question
#   prof1   e2e1 as 2 tasks of 50 classes, each run with --profile-steps 20 --profile-at 100 (torch.profiler inside the
#           real loop: per-step wall / GPU kernel / GPU idle ms, host-device calls, top host ops; Chrome traces .json.gz)
#   paths   the default fast paths: check_fast_paths.py (bitwise against eager), then throughput.py train-learner +
#           train-distill b-s bf16 with the defaults, with --no-concurrent-teacher and with --graph-prompts
#   gemm    the opt-in patch_embed_gemm (patch-embedding convolution as reshape + one GEMM): ops.py (the two alone),
#           check_fast_paths.py --patch-embed-gemm (deviation from the convolution, nothing asserted),
#           tests/gpu/test_gpu_patch_embed_gemm.py (fast paths == eager bitwise with the flag on in both), and
#           throughput.py train-learner + train-distill b-s bf16 without, then with --patch-embed-gemm (same machine)
#   e2e1v   the e2e1 student again with concurrent_teacher off (the default before 2026-12-01), then with
#           graph_prompts on (opt-in): the two levers' effect on the real run (needs e2e1 first, for its teacher)
#   e2e1a   the e2e1 teacher and student again with the training batches' augmentation run eagerly
#           (--data.cuda_graphs false): its graph's effect on the real run; the accuracy matrices must equal e2e1's
#           bitwise (needs e2e1 first)
#   ckpt1   the e2e1 teacher twice, with checkpoints written in place and in the background (--checkpoint.background)
#   deploy  benchmarks/deploy.py --random vit_base/vit_small --device cuda (teacher vs student, checkpoint and .pt2)
#   levers  the opt-in speed levers on the step: ops.py (single ops alone), throughput.py train-learner +
#           train-distill b-s bf16 with the defaults and with --compile (compiled + graphed), then
#           check_fast_paths.py --compile (the measured deviation from eager)
#   e2e1c   e2e1 with --model.init_args.compile true (teacher, then the student taught by it), and its projection to
#           the paper's 20 epochs per task (projection.py)
#   e2e1cg  e2e1c with --model.init_args.patch_embed_gemm true too
#   compile the compile lever after the 2026-12-07 fix (static shapes, smaller batches padded): its GPU test, then
#           throughput.py train-learner + train-distill b-s bf16 with the defaults, --compile, --compile
#           --compile-training-pass (experimental) and that with --patch-embed-gemm, then check_fast_paths.py --compile
#           --compile-training-pass (the measured deviation); then e2e1c / e2e1cg for the real run
#   lowp    the opt-in teacher_low_precision (the distiller's frozen teacher entirely in bf16 outside autocast): ops.py
#           (its bf16 add and LayerNorm against the fp32 ones, and the prefix join as cat vs copies), its GPU
#           test (fast paths == eager bitwise with the flag on in both; within bf16 of the autocast teacher),
#           check_fast_paths.py --teacher-low-precision (measured deviation), then throughput.py train-distill b-s bf16
#           with the defaults, --teacher-low-precision, + --patch-embed-gemm, + --compile (same machine). In the real
#           run: LEVERS='--model.init_args.teacher_low_precision true' TAG=lowp TEACHER=... e2e1x
#   e2e1x   e2e1 with the cdl fit arguments in $LEVERS, its results named by $TAG (OUT/e2e_*_1gpu_$TAG.json); with
#           $TEACHER (a teacher run's last.ckpt) the student alone (so do e2e1c and e2e1cg), e.g.
#           LEVERS='--model.init_args.patch_embed_gemm true' TAG=gemm bash benchmarks/gpu_checks.sh PACK OUT e2e1x
#
# e2e1 and e2e1c end with benchmarks/projection.py on their two runs (the paper-protocol projection,
# OUT/projection*.log; with EPOCHS_PER_TASK >= 2 also --epoch-starts, OUT/projection*_epoch_starts.log).
#
# Data: the Tiny-ImageNet proxy's 100 continual-learning classes of PACK (tiny-imagenet-32.npz), i.e. entries 102..201
# of numpy.random.default_rng(0).permutation(202): 50,000 train / 5,000 test images, 32 px upscaled to 224, 10 tasks x
# EPOCHS_PER_TASK (default 1) epochs, batch 64, bf16-mixed, random ViT weights. Every result lands in OUT_DIR as flat
# files (logs and JSON lines). The exit status is that of the first failing part.
set -uo pipefail
PACK=${1:?usage: gpu_checks.sh PACK.npz OUT_DIR [PART ...]}
OUT=${2:?usage: gpu_checks.sh PACK.npz OUT_DIR [PART ...]}
shift 2
PARTS=${*:-tests e2e1 e2e2 deploy}
EPOCHS_PER_TASK=${EPOCHS_PER_TASK:-1}
RUNS=${RUNS:-/tmp/cdl-gpu-runs}
CLASSES='{seed: 0, start: 102}'
DATA=(--npz "$PACK" --epochs-per-task "$EPOCHS_PER_TASK")
CLI=(-- --data.source.classes "$CLASSES" --data.source.decode_workers 8)
mkdir -p "$OUT" "$RUNS"
status=0
note() { echo "== $(date -u +%H:%M:%S) $*"; }
keep() { local rc=$?; [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc; note "exit $rc"; }

# e2e_two_gpus NAME RUNDIR METRICS TITLE [cdl args...]: the ViT-B CODA teacher on 2 GPUs (DDP), with the 1-GPU step
# rate of e2e1 when there is one; OUT/NAME.{json,log} and the run's matrix as OUT/METRICS (to compare with 1 GPU's)
e2e_two_gpus() {
  local name=$1 dir=$2 metrics=$3 title=$4; shift 4
  local rate
  rate=$(python3 -c "import json; print(json.load(open('$OUT/e2e_teacher_1gpu.json'))['step_img_per_s'])" \
         2>/dev/null || echo "")
  note "e2e: ViT-B CODA teacher, $title (step rate ${rate:-measured})"
  python3 benchmarks/e2e.py "${DATA[@]}" --model coda-b --devices 2 --out "$RUNS/$dir" \
    ${rate:+--step-rate "$rate"} --json "$OUT/$name.json" --no-progress-bar "${CLI[@]}" "$@" > "$OUT/$name.log" 2>&1
  keep; tail -12 "$OUT/$name.log"
  cp "$RUNS/$dir/coda-b/metrics.json" "$OUT/$metrics" 2>/dev/null || true
}

# e2e_one_gpu NAME TITLE [e2e.py args...] [-- cdl fit args...]: benchmarks/e2e.py on GPU 0 on the data above;
# OUT/NAME.{json,log}
e2e_one_gpu() {
  local name=$1 title=$2; shift 2
  local args=() extra=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do args+=("$1"); shift; done
  [ $# -gt 0 ] && shift && extra=("$@")
  note "e2e: $title"
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/e2e.py "${DATA[@]}" "${args[@]}" --json "$OUT/$name.json" \
    --no-progress-bar "${CLI[@]}" "${extra[@]}" > "$OUT/$name.log" 2>&1
  keep; tail -12 "$OUT/$name.log"
}

# e2e_levers TAG [cdl fit args...]: e2e1 with those arguments, the teacher, then the student it taught, and their
# projection (OUT/e2e_{teacher,student}_1gpu_TAG.json, OUT/projection_TAG.log); with $TEACHER (a teacher run's
# last.ckpt) the student alone, taught by it
e2e_levers() {
  local tag=$1; shift
  if [ -z "${TEACHER:-}" ]; then
    e2e_one_gpu "e2e_teacher_1gpu_$tag" "ViT-B CODA teacher, 1 GPU, $tag" --model coda-b --out "$RUNS/$tag" -- "$@"
  fi
  e2e_one_gpu "e2e_student_1gpu_$tag" "ViT-B -> ViT-S KDP student, 1 GPU, $tag" --model kdp-b-s --out "$RUNS/$tag" \
    --teacher "${TEACHER:-$RUNS/$tag/coda-b/checkpoints/last.ckpt}" -- "$@"
  if [ -z "${TEACHER:-}" ]; then project "projection_$tag" "e2e_teacher_1gpu_$tag" "e2e_student_1gpu_$tag"; fi
}

# throughput NAME [throughput.py flags...]: throughput.py train-learner + train-distill b-s bf16 -> OUT/NAME.log
throughput() {
  local name=$1; shift
  note "throughput b-s bf16 ${*:-(defaults)}"
  # shellcheck disable=SC2086  # $CASES: several words
  python3 benchmarks/throughput.py --cases ${CASES:-train-learner train-distill} --pairs b-s --precision bf16 "$@" \
    > "$OUT/$name.log" 2>&1
  keep; tail -6 "$OUT/$name.log"
}

# project NAME TEACHER STUDENT: benchmarks/projection.py on OUT/TEACHER.json and OUT/STUDENT.json -> OUT/NAME.log
project() {
  note "projection to 20 epochs per task: $2 + $3"
  python3 benchmarks/projection.py "$OUT/$2.json" "$OUT/$3.json" > "$OUT/$1.log" 2>&1
  keep; grep -v '^{' "$OUT/$1.log"
  if [ "$EPOCHS_PER_TASK" -ge 2 ]; then  # each epoch's start cost counted per kind of epoch (needs later epochs)
    python3 benchmarks/projection.py "$OUT/$2.json" "$OUT/$3.json" --epoch-starts > "$OUT/$1_epoch_starts.log" 2>&1
    keep; grep -v '^{' "$OUT/$1_epoch_starts.log"
  fi
}

nvidia-smi -L || true
python3 -c 'import torch, lightning, timm; print("torch", torch.__version__, "lightning", lightning.__version__,
"timm", timm.__version__, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0))'

for part in $PARTS; do
  case $part in
    tests)
      note "GPU test suite"
      python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
      keep ;;
    e2e1)
      e2e_one_gpu e2e_teacher_1gpu "ViT-B CODA teacher, 1 GPU" --model coda-b --out "$RUNS/gpu1"
      e2e_one_gpu e2e_student_1gpu "ViT-B -> ViT-S KDP student, 1 GPU" --model kdp-b-s --out "$RUNS/gpu1" \
        --teacher "$RUNS/gpu1/coda-b/checkpoints/last.ckpt"
      project projection e2e_teacher_1gpu e2e_student_1gpu ;;
    e2e1c)
      e2e_levers compile --model.init_args.compile true ;;
    e2e1cg)
      e2e_levers compile_gemm --model.init_args.compile true --model.init_args.patch_embed_gemm true ;;
    e2e1x)
      read -ra lev <<< "${LEVERS:?e2e1x needs LEVERS, e.g. LEVERS='--model.init_args.patch_embed_gemm true'}"
      e2e_levers "${TAG:?e2e1x needs TAG}" "${lev[@]}" ;;
    compile)
      note "GPU test: compiled passes through CUDA graphs (plain / compiled training pass), a padded remainder batch"
      python3 -m pytest -m gpu tests/gpu/test_gpu_compile_graphs.py -q -p no:cacheprovider -rA \
        > "$OUT/gpu_tests_compile.log" 2>&1
      keep; tail -8 "$OUT/gpu_tests_compile.log"
      for flags in "" "--compile" "--compile --compile-training-pass" \
                   "--compile --compile-training-pass --patch-embed-gemm"; do
        # shellcheck disable=SC2086
        throughput "throughput_bf16${flags:+_$(echo "$flags" | tr -d ' -' )}" $flags
      done
      note "check_fast_paths --compile --compile-training-pass (measured deviation from eager)"
      python3 benchmarks/check_fast_paths.py --compile --compile-training-pass \
        > "$OUT/check_fast_paths_compile_training_pass.log" 2>&1
      keep; tail -25 "$OUT/check_fast_paths_compile_training_pass.log" ;;
    lowp)
      note "ops.py (single ops alone: the bf16 residual stream's add and LayerNorm, the prefix join)"
      python3 benchmarks/ops.py > "$OUT/ops.log" 2>&1
      keep; grep -v '^{' "$OUT/ops.log"
      note "GPU test: a low-precision teacher, fast paths == eager with it; within bf16 of the autocast teacher"
      python3 -m pytest -m gpu tests/gpu/test_gpu_teacher_low_precision.py -q -p no:cacheprovider -rA \
        > "$OUT/gpu_tests_teacher_low_precision.log" 2>&1
      keep; tail -8 "$OUT/gpu_tests_teacher_low_precision.log"
      note "check_fast_paths --teacher-low-precision (measured deviation from the autocast teacher)"
      python3 benchmarks/check_fast_paths.py --teacher-low-precision > "$OUT/check_fast_paths_lowp.log" 2>&1
      keep; tail -20 "$OUT/check_fast_paths_lowp.log"
      for flags in "" "--teacher-low-precision" "--teacher-low-precision --patch-embed-gemm" \
                   "--teacher-low-precision --patch-embed-gemm --compile"; do
        # shellcheck disable=SC2086
        CASES=train-distill throughput "throughput_distill_bf16${flags:+_$(echo "$flags" | tr -d ' -')}" $flags
      done ;;
    levers)
      note "ops.py (single ops alone on the GPU)"
      python3 benchmarks/ops.py > "$OUT/ops.log" 2>&1
      keep; grep -v '^{' "$OUT/ops.log"
      for flag in "" --compile; do
        throughput "throughput_bf16${flag:+_${flag#--}}" $flag
      done
      note "check_fast_paths --compile (measured deviation from eager)"
      python3 benchmarks/check_fast_paths.py --compile > "$OUT/check_fast_paths_compile.log" 2>&1
      keep; tail -25 "$OUT/check_fast_paths_compile.log" ;;
    prof1)
      for model in coda-b kdp-b-s; do
        teacher=(); [ "$model" = kdp-b-s ] && teacher=(--teacher "$RUNS/prof1/coda-b/checkpoints/last.ckpt")
        e2e_one_gpu "profile_$model" "profile: $model, 1 GPU, 2 tasks" --num-tasks 2 --model "$model" \
          --out "$RUNS/prof1" "${teacher[@]}" --no-step --profile-steps 20 --profile-at 100 \
          --profile-trace "$OUT/profile_$model.json.gz"
      done ;;
    paths)
      note "check_fast_paths (the default fast paths against eager)"
      python3 benchmarks/check_fast_paths.py > "$OUT/check_fast_paths.log" 2>&1
      keep; tail -6 "$OUT/check_fast_paths.log"
      for flag in "" --no-concurrent-teacher --graph-prompts; do
        throughput "throughput_bf16${flag:+_${flag#--}}" $flag
      done ;;
    gemm)
      note "ops.py: the patch-embedding convolution vs reshape + GEMM, alone"
      python3 benchmarks/ops.py > "$OUT/ops.log" 2>&1
      keep; grep patch-embed "$OUT/ops.log" | grep -v '^{'
      note "check_fast_paths --patch-embed-gemm (measured deviation from the convolution)"
      python3 benchmarks/check_fast_paths.py --patch-embed-gemm > "$OUT/check_fast_paths_patch_embed_gemm.log" 2>&1
      keep; tail -20 "$OUT/check_fast_paths_patch_embed_gemm.log"
      note "GPU test: fast paths bitwise equal to eager with patch_embed_gemm on in both"
      python3 -m pytest -m gpu tests/gpu/test_gpu_patch_embed_gemm.py -q -p no:cacheprovider -rA -s \
        > "$OUT/gpu_tests_patch_embed_gemm.log" 2>&1
      keep; tail -12 "$OUT/gpu_tests_patch_embed_gemm.log"
      for flag in "" --patch-embed-gemm; do
        throughput "throughput_gemm_part_bf16${flag:+_${flag#--}}" $flag  # (levers writes throughput_bf16*)
      done ;;
    e2e1v)
      for setting in "concurrent_teacher false" "graph_prompts true"; do
        name=e2e_student_1gpu_${setting// /_}
        e2e_one_gpu "$name" "ViT-B -> ViT-S KDP student, 1 GPU, $setting" --model kdp-b-s --out "$RUNS/${name}" \
          --teacher "$RUNS/gpu1/coda-b/checkpoints/last.ckpt" -- --model.init_args.$setting
      done ;;
    e2e1a)
      e2e_one_gpu e2e_teacher_1gpu_augment_eager "ViT-B CODA teacher, 1 GPU, data.cuda_graphs false" --model coda-b \
        --out "$RUNS/augment_eager" -- --data.cuda_graphs false
      e2e_one_gpu e2e_student_1gpu_augment_eager "ViT-B -> ViT-S KDP student, 1 GPU, data.cuda_graphs false" \
        --model kdp-b-s --out "$RUNS/augment_eager" --teacher "$RUNS/gpu1/coda-b/checkpoints/last.ckpt" \
        -- --data.cuda_graphs false
      note "accuracy matrices, augmentation graphed (e2e1) vs eager (e2e1a)"
      python3 - "$RUNS" <<'PY'
import json, sys
for name in ("coda-b", "kdp-b-s"):
    m = [json.load(open(f"{sys.argv[1]}/{run}/{name}/metrics.json"))["accuracy_matrix"] for run in ("gpu1", "augment_eager")]
    print(f"{name}: accuracy matrices {'bitwise equal' if m[0] == m[1] else 'DIFFER'}; last row {m[0][-1]}")
    if m[0] != m[1]:
        print(f"  graphed {m[0][-1]}\n  eager   {m[1][-1]}"); sys.exit(1)
PY
      keep ;;
    e2e2)
      e2e_two_gpus e2e_teacher_2gpu gpu2 metrics_teacher_2gpu.json "2 GPUs DDP"
      cp "$RUNS/gpu1/coda-b/metrics.json" "$OUT/metrics_teacher_1gpu.json" 2>/dev/null || true ;;
    e2e2s)
      e2e_two_gpus e2e_teacher_2gpu_sigterm50 gpu2s metrics_teacher_2gpu_sigterm50.json \
        "2 GPUs DDP, SIGTERM check every 50 steps" \
        --trainer.callbacks+=cdl_lightning.callbacks.SigtermCheck --trainer.callbacks.every_n_steps=50 ;;
    ckpt1)
      for background in false true; do
        e2e_one_gpu "e2e_teacher_1gpu_ckpt_background_$background" "ViT-B CODA teacher, 1 GPU, checkpoint.background \
$background" --model coda-b --out "$RUNS/ckpt_$background" -- --checkpoint.background "$background"
      done ;;
    deploy)
      note "deploy: ViT-B teacher vs ViT-S student (random weights), CUDA"
      CUDA_VISIBLE_DEVICES=0 python3 benchmarks/deploy.py --random vit_base/vit_small --device cuda \
        --forms checkpoint pt2 > "$OUT/deploy_cuda.log" 2>&1
      keep; tail -12 "$OUT/deploy_cuda.log" ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
exit $status
