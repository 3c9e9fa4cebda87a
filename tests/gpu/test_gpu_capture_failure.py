"""A CUDA-graph capture that fails inside (an operation a capture cannot hold) leaves the process usable: the caller's
stream is current again, the device's default generator is out of capture mode (torch 2.11 raises before taking it
out: every later draw would fail), and the pass runs eagerly from then on, drawing what a plain eager run draws.

Run in a subprocess: if the recovery did not work, the broken CUDA state must not spill into the other GPU tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from _gpu import GPU

pytestmark = GPU

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    from cdl_lightning.nn.graphs import GraphedFunction

    def noisy(x):
        # a random draw, then a host read of a device value: illegal while capturing (the capture fails inside)
        y = x + torch.rand_like(x)
        return (y * (1.0 if y.sum().item() > -1 else 0.0),)

    x = torch.ones(1000, device="cuda")
    stream = torch.cuda.current_stream()

    def calls(function):
        torch.cuda.manual_seed(7)
        with torch.no_grad():
            out = [function(x)[0] for _ in range(4)]
        return out, torch.rand(3, device="cuda")

    eager_out, eager_next = calls(noisy)
    graphed = GraphedFunction(noisy, warmup=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed_out, graphed_next = calls(graphed)
    assert graphed.disabled_reason is not None and graphed.captures == 0, graphed.disabled_reason
    messages = [str(w.message) for w in caught]
    assert any("capture of a gradient-free pass failed" in m for m in messages), messages
    assert torch.cuda.current_stream() == stream, "the capture stream stayed current"
    for a, b in zip(graphed_out, eager_out, strict=True):
        assert torch.equal(a, b), "the eager fallback drew other numbers than the plain eager run"
    assert torch.equal(graphed_next, eager_next), "the generator moved on differently"
    print("RECOVERED", graphed.disabled_reason.splitlines()[0][:200])
    """
)


def test_a_failed_capture_leaves_stream_and_generator_usable_and_runs_eagerly():
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    assert run.returncode == 0, f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert "RECOVERED" in run.stdout
