#!/usr/bin/env bash
# Exact DDP evaluation on GPUs, through the real CLI, on the offline demo (configs/demo.yaml):
#  1. train the demo learner on 1 GPU;
#  2. evaluate that checkpoint with `cdl validate` on 1 GPU and on 2 GPUs (DDP) -> the matrices must be identical;
#  3. also train it with 2 GPUs (DDP) and print that run's matrix (DDP training is not bitwise equal to 1 process:
#     the batches split differently, so this one is shown, not compared).
# Usage: bash benchmarks/ddp_demo.sh [WORKDIR]   (needs 2 GPUs; `python -m cdl_lightning.cli` must import)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work" && cd "$work"
cdl() { python -m cdl_lightning.cli "$@"; }
gpu=(--trainer.accelerator gpu --evaluation.print_table false)

cdl pretrain --out runs/demo/backbones/teacher.pth --classes 20 40 --epochs 4 \
    --model-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}'
cdl fit --config "$repo/configs/demo.yaml" "${gpu[@]}" --trainer.devices 1 --trainer.logger.init_args.save_dir one
ckpt=one/teacher/checkpoints/last.ckpt
cdl validate --config "$repo/configs/demo.yaml" "${gpu[@]}" --trainer.devices 1 --ckpt_path "$ckpt" \
    --evaluation.output_dir validate_1gpu --trainer.logger false
cdl validate --config "$repo/configs/demo.yaml" "${gpu[@]}" --trainer.devices 2 --trainer.strategy ddp \
    --ckpt_path "$ckpt" --evaluation.output_dir validate_2gpu --trainer.logger false
cdl fit --config "$repo/configs/demo.yaml" "${gpu[@]}" --trainer.devices 2 --trainer.strategy ddp \
    --trainer.logger.init_args.save_dir two

python - <<'PY'
import json
load = lambda p: json.load(open(p))
fit1, v1, v2, fit2 = (load(p) for p in ("one/teacher/metrics.json", "validate_1gpu/metrics.json",
                                        "validate_2gpu/metrics.json", "two/teacher/metrics.json"))
show = lambda m: "\n".join("  " + " ".join("  -  " if v is None else f"{v:6.2f}" for v in row) for row in m)
print("fit, 1 GPU: accuracy matrix (%)\n" + show(fit1["accuracy_matrix"]))
print("validate last.ckpt, 1 GPU: last row", v1["accuracy_matrix"][v1["final"]["task"]], v1["last_evaluation"])
print("validate last.ckpt, 2 GPUs DDP: last row", v2["accuracy_matrix"][v2["final"]["task"]], v2["last_evaluation"])
same = v1["accuracy_matrix"] == v2["accuracy_matrix"] and v1["last_evaluation"] == v2["last_evaluation"]
print("1-GPU and 2-GPU evaluation identical:", same)
print("fit, 2 GPUs DDP: accuracy matrix (%)\n" + show(fit2["accuracy_matrix"]))
raise SystemExit(0 if same else 1)
PY
