#!/usr/bin/env bash
# A baseline checkout against this one, end to end on one GPU: a ViT-B CODA teacher run, then a B->S KDP student run
# from that teacher, each through `benchmarks/e2e.py` (the real `cdl fit`, timed per phase), then the two checkouts'
# accuracy matrices compared (the speed levers must not change a number).
# Usage: bash benchmarks/e2e_compare.sh PACK.npz BASELINE_REPO OUT [EPOCHS_PER_TASK] [extra e2e.py arguments...]
#   BASELINE_REPO: a checkout of the baseline (e.g. `git worktree add /tmp/base main`); this script's e2e.py runs
#   both (it imports cdl_lightning from PYTHONPATH).
set -uo pipefail
pack=$1; base=$(cd "$2" && pwd); out=$3; epochs=${4:-1}; shift $(( $# < 4 ? $# : 4 ))
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
run() {  # label code-dir model [args...]
  local label=$1 code=$2 model=$3; shift 3
  PYTHONPATH="$code:${PYTHONPATH:-}" python "$here/benchmarks/e2e.py" --npz "$pack" --model "$model" \
    --epochs-per-task "$epochs" --out "$out/$label" --json "$out/$label.json" "$@" > "$out/$label.log" 2>&1
  echo "== $label (exit $?)"; grep -A9 "^phase " "$out/$label.log" | sed 's/^/   /'
}
for side in base new; do
  code=$([ $side = base ] && echo "$base" || echo "$here")
  run "$side-teacher" "$code" coda-b "$@"
  run "$side-student" "$code" kdp-b-s --teacher "$out/$side-teacher/coda-b/checkpoints/last.ckpt" "$@"
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for run, name in (("teacher", "coda-b"), ("student", "kdp-b-s")):
    try:
        m = [json.load(open(f"{out}/{side}-{run}/{name}/metrics.json"))["accuracy_matrix"] for side in ("base", "new")]
    except (OSError, KeyError) as err:
        print(f"{run}: no matrix to compare ({err})"); continue
    print(f"{run}: accuracy matrices of baseline and this checkout identical: {m[0] == m[1]}; last row {m[1][-1]}")
PY
