#!/usr/bin/env bash
# Proves the lower bounds that pyproject.toml declares for the libraries whose APIs the code leans on (timm, lightning,
# torchmetrics, jsonargparse): a virtual environment that sees this machine's torch/torchvision (system site packages;
# torch itself cannot be swapped here) gets exactly the declared minimum of each, then runs a slice of the suite
# (ViT wrapping, prompts, metrics, exact resume, the CLI's errors and subcommands).
# Not part of .ci/run: it downloads packages and takes a few minutes. Usage: bash .ci/check_min_deps.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$(mktemp -d)/venv}
mins=$("$PYTHON" - <<'PY'
import re
import tomllib

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([^,; ]+)", dep)
    if match and match.group(1) in {"timm", "lightning", "torchmetrics", "jsonargparse"}:
        print(f"{match.group(1)}{match.group(2) or ''}=={match.group(3)}")
PY
)
echo "declared minimums: $(echo $mins)"
"$PYTHON" -m venv --system-site-packages "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $mins
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -Ei "^(timm|lightning|pytorch-lightning|torchmetrics|jsonargparse|torch|torchvision) "
OMP_NUM_THREADS=1 PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -p no:warnings \
    tests/test_nn_vit.py tests/test_nn_prompts.py tests/test_metrics.py tests/test_resume.py \
    tests/test_cli_errors.py tests/test_cli_subcommands.py "$@"
