"""Put the flat ``LEARNER_seedS_METHOD_metrics.json`` files that `proxy_device_call.sh` brings back (its
``results.tgz``, or a folder of them such as ``configs/proxy/measured/s5_h200_seed0``) into a sweep's run folders
``OUT/LEARNER/seedS/METHOD/metrics.json``, so that ``cdl sweep SWEEP --table-only --out OUT`` tables them with the
others. Unfinished runs (``status`` not ``complete``) are skipped. OUT is a folder of its own (default
``runs/sweeps/proxy-gathered``), not the sweep's run folders: there a teacher with a metrics.json but no checkpoint
would count as finished and its students could not start.

    python benchmarks/proxy_unpack_results.py /work/.device/5/results.tgz
    cdl sweep configs/proxy/sweep_packed.yaml --table-only --out runs/sweeps/proxy-gathered
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import tempfile
from pathlib import Path

NAME = re.compile(r"^(?P<learner>[A-Za-z0-9]+)_seed(?P<seed>\d+)_(?P<method>[A-Za-z0-9]+)_metrics\.json$")


def unpack(source: Path, out: Path) -> list[Path]:
    """Copy every finished run's metrics.json found in ``source`` (a folder or a .tgz) under ``out``; returns them."""
    with tempfile.TemporaryDirectory() as scratch:
        if source.is_file():
            with tarfile.open(source) as archive:
                archive.extractall(scratch, filter="data")
            folder = Path(scratch)
        else:
            folder = source
        written = []
        for path in sorted(folder.rglob("*_metrics.json")):
            match = NAME.match(path.name)
            metrics = json.loads(path.read_text())
            if match is None or metrics.get("status") != "complete":
                continue
            target = out / match["learner"] / f"seed{match['seed']}" / match["method"] / "metrics.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(metrics))
            written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="results.tgz or a folder of LEARNER_seedS_METHOD_metrics.json")
    parser.add_argument("--out", type=Path, default=Path("runs/sweeps/proxy-gathered"),
                        help="where to gather them (not the sweep's own run folders)")
    args = parser.parse_args()
    written = unpack(args.source, args.out)
    print(f"{len(written)} finished runs under {args.out}")


if __name__ == "__main__":
    main()
