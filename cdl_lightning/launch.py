"""Start the local DDP ranks of ``cdl fit|validate|test`` at once, in parallel, before the heavy imports.

Lightning's default launcher (``_SubprocessScriptLauncher``) starts ranks 1..N-1 only inside ``trainer.fit``, after
rank 0 has imported torch and Lightning, parsed the config and built the model (and loaded a teacher); then rank 0
waits at the first collective while every other rank does all of that again: the run's startup doubles. Here rank 0
reads the few trainer options that fix the number of local processes from the command line and the config files
(``trainer.devices``, ``accelerator``, ``strategy``, ``num_nodes``, ``seed_everything``) and starts the other ranks
first, with the environment Lightning's own launcher gives them (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, one ``PL_GLOBAL_SEED`` for a random seed). Lightning's ``LightningEnvironment`` then
sees ``LOCAL_RANK`` (``creates_processes_externally``) and starts nothing; everything else (rank assignment, devices,
process group) is Lightning's.

It applies to one node, several devices and a strategy that Lightning runs with its subprocess launcher (``auto``,
``ddp``, ``ddp_find_unused_parameters_*``, a ``DDPStrategy`` with the default start method), when no launcher
started the process (no ``LOCAL_RANK`` / ``RANK`` / ``WORLD_SIZE``, torchrun, SLURM, MPI or LSF variables). Anything
else, or a config it cannot read, is left to Lightning (same result, slower start). ``CDL_EARLY_LAUNCH=0`` turns it
off.

Rank 0 keeps the console (the other ranks' user-error messages are not repeated; Lightning prints on rank 0 only).
The other ranks die with rank 0 (``PR_SET_PDEATHSIG`` on Linux, and a watch on the parent process); when one of
them exits with an error, rank 0 stops the others, stops itself (its ``metrics.json`` says ``failed``) and exits
with status 1.

``CDL_STARTUP_LOG=FILE``: every process appends ``EVENT LOCAL_RANK PID UNIX_TIME`` lines to ``FILE`` (``main`` when
``cdl`` starts, ``fit`` when the trainer's fit begins), to measure the startup.

Only the standard library and ``yaml`` are imported here (``torch`` only to count the GPUs of ``devices: -1`` /
``auto``), so the ranks start before the seconds of importing torch, Lightning and timm.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["local_process_count", "local_ranks", "main", "startup_mark"]

OPT_OUT = "CDL_EARLY_LAUNCH"
"""Environment variable: ``0`` leaves starting the local ranks to Lightning."""
STARTUP_LOG = "CDL_STARTUP_LOG"
"""Environment variable: a file every process appends its startup events to (`startup_mark`)."""
PARENT = "CDL_LAUNCH_PARENT"
"""Set in the ranks started here: the process id of rank 0."""

SUBCOMMANDS = ("fit", "validate", "test")
EXTERNAL = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS",
            "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JSM_NAMESPACE_SIZE", "LSB_DJOB_RANKFILE")
"""Variables set by a launcher (torchrun, SLURM, MPI, LSF, Lightning's own): the processes exist already."""
SUBPROCESS_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")
"""Strategy names Lightning runs with ``_SubprocessScriptLauncher`` (one process started per device)."""
_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED", PARENT)
_GRACE_S = 30.0
_marked: set[str] = set()


def startup_mark(event: str) -> None:
    """Append ``EVENT LOCAL_RANK PID TIME`` to the file named by ``CDL_STARTUP_LOG`` (once per event and process)."""
    path = os.environ.get(STARTUP_LOG)
    if not path or event in _marked:
        return
    _marked.add(event)
    line = f"{event} {os.environ.get('LOCAL_RANK', '0')} {os.getpid()} {time.time():.6f}\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------- how many local processes the run will have
def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "class_path" not in value:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _config_file(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A config file with its ``_base_`` files merged under it (as `cdl_lightning.cli.expand_config` applies them)."""
    import yaml

    file = Path(path)
    key = str(file.resolve())
    if key in seen:
        raise ValueError(f"{path} includes itself")
    content = yaml.safe_load(file.read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a mapping")
    bases = content.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _config_file(str(file.parent / base), (*seen, key)))
    return _merge(merged, content)


_READ = ("devices", "accelerator", "strategy", "num_nodes")


def _options(args: list[str]) -> dict:
    """The options of a ``cdl`` command line that matter here: config files merged in order, then
    ``--trainer.{devices,accelerator,strategy,num_nodes}`` and ``--seed_everything``; other arguments are skipped."""
    config: dict = {}
    for i, arg in enumerate(args):
        name, has_value, value = arg.partition("=")
        if not has_value:
            value = args[i + 1] if i + 1 < len(args) else ""
        keys = name[2:].split(".") if name.startswith("--") else []
        if name in ("--config", "-c"):
            config = _merge(config, _config_file(value))
        elif name == "--trainer" and Path(value).is_file():
            config = _merge(config, {"trainer": _config_file(value)})
        elif keys == ["seed_everything"]:
            config = _merge(config, {"seed_everything": _value(value)})
        elif len(keys) >= 2 and keys[0] == "trainer" and keys[1] in _READ:
            if len(keys) > 2:
                raise ValueError(f"{name}: a nested strategy option")  # e.g. --trainer.strategy.init_args.x
            config = _merge(config, {"trainer": {keys[1]: _value(value)}})
    return config


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_count(accelerator: Any, devices: Any) -> int:
    """Local processes for ``accelerator`` and ``devices`` as Lightning counts them; 1 when unsure."""
    if isinstance(devices, str):
        devices = devices.strip()
        if "," in devices:  # "0,1" (GPU indices)
            return len([part for part in devices.split(",") if part.strip()])
        devices = int(devices) if devices.lstrip("-").isdigit() else devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, bool):
        return 1
    if isinstance(devices, int) and devices > 0:
        return devices
    if devices in (-1, "auto") and accelerator in ("gpu", "cuda", "auto"):
        count = _cuda_count()
        return count if count or accelerator != "auto" else 1  # auto without a GPU: one CPU process
    return 1  # cpu with devices -1 (all cores) and other accelerators: Lightning decides


def _subprocess_strategy(strategy: Any) -> bool:
    if isinstance(strategy, str):
        return strategy in SUBPROCESS_STRATEGIES
    if isinstance(strategy, dict) and str(strategy.get("class_path", "")).endswith("DDPStrategy"):
        return (strategy.get("init_args") or {}).get("start_method", "popen") == "popen"
    return False


def local_process_count(argv: list[str]) -> tuple[int, dict]:
    """How many processes the run ``cdl ARGV`` has on this node when it is started here, and its merged options.

    Returns ``(1, {})`` when this module should start nothing: not ``fit``/``validate``/``test``, ``--help``,
    ``--print_config``, a process started by a launcher, ``CDL_EARLY_LAUNCH=0``, several nodes, a strategy Lightning
    does not run with its subprocess launcher, or a config this reader does not understand.
    """
    if not argv or argv[0] not in SUBCOMMANDS or os.environ.get(OPT_OUT, "1") == "0":
        return 1, {}
    if any(name in os.environ for name in EXTERNAL):
        return 1, {}
    if any(arg in ("-h", "--help") or arg.startswith("--print_config") for arg in argv):
        return 1, {}
    try:
        options = _options(argv[1:])
        trainer = options.get("trainer") or {}
        if not isinstance(trainer, dict) or int(trainer.get("num_nodes", 1) or 1) != 1:
            return 1, {}
        if not _subprocess_strategy(trainer.get("strategy", "auto")):
            return 1, {}
        if trainer.get("accelerator", "auto") not in ("auto", "cpu", "gpu", "cuda"):
            return 1, {}
        count = _device_count(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))
    except Exception:  # noqa: BLE001 - whatever this reader gets wrong, the CLI reports; Lightning launches
        return 1, {}
    return count, options


# ---------------------------------------------------------------- rank 0: start, watch and stop the others
class LocalRankFailed(KeyboardInterrupt):
    """Raised in rank 0's main thread when another local rank exited with an error: stops the trainer like an
    interrupt (Lightning runs ``on_exception`` and exits with status 1); ``metrics.json`` records ``failed``."""

    run_status = "failed"


class Terminated(SystemExit):
    """Raised in rank 0 by SIGTERM (``kill``, ``timeout``, a batch system's time limit) while it runs its local ranks:
    exit status 143 (128 + SIGTERM), ``metrics.json`` records ``interrupted``; the other ranks get the SIGTERM too."""

    run_status = "interrupted"

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


USER_ERROR = 2
"""Exit status of a user error (`cdl_lightning.cli`): every rank hits the same one, and rank 0 reports it."""
_USER_ERROR_WAIT_S = 30.0
"""How long rank 0 may take to reach (and report) the user error another rank exited with, before it is stopped."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))  # the kernel picks a free port: two runs on one machine get different ports
        return sock.getsockname()[1]


def _stop(processes: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
        if process.poll() is None:
            process.kill()
            process.wait()


def _child_command() -> list[str]:
    """How to start another rank so that it imports the same code as rank 0: ``python -m`` puts the working directory
    first on ``sys.path``, the ``cdl`` console script does not (a ``yaml.py`` there would reach one rank only)."""
    if Path(sys.argv[0]).name in ("cdl", "cdl.exe") and getattr(sys.modules.get("__main__"), "__spec__", None) is None:
        # the installed console script: nothing of the working directory, like rank 0
        return [sys.executable, "-c", "import sys; del sys.path[0]; from cdl_lightning.launch import main; main()"]
    return [sys.executable, "-m", "cdl_lightning.launch"]  # `python -m ...` or a script calling the CLI in process


class _Watch(threading.Thread):
    """Rank 0's watch on the other ranks: the first that exits with an error stops the others and rank 0. It also
    passes a SIGTERM that reached rank 0 on to them (read from the signal wake-up pipe ``wakeup``, so before any
    Python handler runs: Lightning's own SIGTERM handler waits in a collective for them)."""

    def __init__(self, processes: list[subprocess.Popen], wakeup: int | None = None) -> None:
        super().__init__(name="cdl-rank-watch", daemon=True)
        self.processes, self.failed = processes, None
        self.interrupted = False  # rank 0 got SIGINT (Ctrl+C reaches every rank): the others' exit is no failure
        self.terminated = False  # rank 0 got SIGTERM, passed on to the others: their exit is no failure either
        self._wakeup = wakeup
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._fired = False
        self._main = threading.main_thread().ident

    def run(self) -> None:
        while not self._done.is_set():
            self._read_signals(0.5)
            for rank, process in enumerate(self.processes, start=1):
                code = process.poll()
                if code and not (self._done.is_set() or self.interrupted or self.terminated):
                    if code == USER_ERROR and self._done.wait(_USER_ERROR_WAIT_S):
                        return  # rank 0 hit the same mistake and reports it
                    self._fail(rank, process, code)
                    return

    def _read_signals(self, timeout: float) -> None:
        if self._wakeup is None:
            self._done.wait(timeout)
            return
        ready, _, _ = select.select([self._wakeup], [], [], timeout)
        if not ready:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            received = os.read(self._wakeup, 512)
            if signal.SIGINT in received:
                self.interrupted = True
            if signal.SIGTERM in received and not self.terminated:
                self.terminated = True
                for process in self.processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)

    def _fail(self, rank: int, process: subprocess.Popen, code: int) -> None:
        if self._done.is_set():  # rank 0 ended meanwhile (and stopped the others itself)
            return
        self.failed = (rank, process.pid, code)
        print(f"cdl: local rank {rank} (pid {process.pid}) exited with status {code}; stopping the run",
              file=sys.stderr, flush=True)
        _stop([other for other in self.processes if other is not process])
        with self._lock:  # never after `stop`: rank 0's cleanup must not be cut by this exception
            if self._done.is_set() or self.interrupted or self.terminated:
                return
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._main), ctypes.py_object(LocalRankFailed))
            self._fired = True
        if not self._done.wait(_GRACE_S):  # rank 0 is stuck in a collective that will not return
            print("cdl: rank 0 did not stop; ending it", file=sys.stderr, flush=True)
            os._exit(1)

    def stop(self) -> None:
        """Called by rank 0's main thread when its run ends: no stop after this; an undelivered one is withdrawn."""
        with self._lock:
            self._done.set()
            if self._fired and threading.get_ident() == self._main:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._main), None)


def _note_interrupts(watch: _Watch) -> Any:
    """Note rank 0's SIGINT in ``watch``, then handle it as before; returns the handler to restore (``None`` off the
    main thread, where handlers cannot be set)."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        watch.interrupted = True
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None
    return previous


@contextlib.contextmanager
def _signal_pipe() -> Iterator[int | None]:
    """A non-blocking pipe that receives the number of every signal rank 0 gets (``signal.set_wakeup_fd``) and a
    SIGTERM handler raising `Terminated`, for the duration; ``None`` off the main thread."""
    try:
        read, write = os.pipe()
    except OSError:
        yield None
        return
    for fd in (read, write):
        os.set_blocking(fd, False)
    try:
        previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        os.close(read)
        os.close(write)
        yield None
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous_term = signal.signal(signal.SIGTERM, terminate)
    try:
        yield read
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.set_wakeup_fd(previous_fd)
        os.close(read)
        os.close(write)


@contextlib.contextmanager
def local_ranks(argv: list[str]) -> Iterator[int]:
    """Around rank 0's run of ``cdl ARGV``: start the other local ranks first (`local_process_count`); at the end,
    wait for them (stop them when rank 0 failed) and exit with status 1 when one of them failed. Yields the number of
    local processes (1: nothing started). The environment is restored afterwards."""
    count, options = local_process_count(argv)
    if count <= 1:
        yield 1
        return
    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update({"NODE_RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(count), PARENT: str(os.getpid())})
    if options.get("seed_everything", True) is True and "PL_GLOBAL_SEED" not in os.environ:
        # LightningCLI draws a random seed for `seed_everything: true` from PL_GLOBAL_SEED when set: one for all ranks
        os.environ["PL_GLOBAL_SEED"] = str(random.randint(0, 2**32 - 1))
    command = _child_command()
    processes = [subprocess.Popen([*command, *argv], stdin=subprocess.DEVNULL,
                                  env={**os.environ, "LOCAL_RANK": str(rank)}) for rank in range(1, count)]
    finished, user_error = False, False
    with _signal_pipe() as wakeup:
        watch = _Watch(processes, wakeup)
        watch.start()
        previous_handler = _note_interrupts(watch)
        try:
            yield count
            finished = True
        except SystemExit as stop:
            finished, user_error = stop.code in (None, 0), stop.code == USER_ERROR
            raise
        except LocalRankFailed:
            raise SystemExit(1) from None
        finally:
            watch.stop()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            # finished: the ranks left the last collective with rank 0 and end within seconds; a user error: they
            # hit the same mistake, let them end
            wait_s = 120 if finished else 10 if user_error else None
            if wait_s is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    for process in processes:
                        process.wait(timeout=wait_s)
            exited = [process.poll() for process in processes]  # before rank 0 stops them: which failed on their own
            _stop(processes)
            watch.join(timeout=5)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            failed = [(rank, code) for rank, code in enumerate(exited, start=1) if code]
            quiet = user_error or watch.failed is not None or watch.interrupted or watch.terminated
            if failed and not quiet:  # (rank 0's user error, the watch's stop or a signal is reported already)
                print(f"cdl: local rank {failed[0][0]} exited with status {failed[0][1]}", file=sys.stderr, flush=True)
    if failed or any(process.returncode for process in processes):
        raise SystemExit(1)


# ---------------------------------------------------------------- ranks > 0: die with rank 0
def is_started_rank() -> bool:
    """True in a rank started by `local_ranks` (not rank 0)."""
    return PARENT in os.environ and os.environ.get("LOCAL_RANK", "0") != "0"


def _follow_parent() -> None:
    parent = int(os.environ[PARENT])
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # the kernel kills us when rank 0 dies, whatever we are doing
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)  # rank 0 died before we got here

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="cdl-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """The ``cdl`` console script: the local ranks first (when the run has several), then `cdl_lightning.cli.main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    startup_mark("main")
    if is_started_rank():
        _follow_parent()
    with local_ranks(argv):  # before importing torch and Lightning (`cdl_lightning.cli.main` then starts nothing)
        from cdl_lightning.cli import main as cli_main

        cli_main(argv)


if __name__ == "__main__":
    from cdl_lightning import launch  # one copy of this module (its startup marks), not a second one as __main__

    launch.main()
