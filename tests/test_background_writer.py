"""ContinualEvaluation's background writing thread: the same files as writing in place, complete when
``trainer.fit`` returns, in order, and an error of the thread raised in the main thread."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from test_callback_continual_evaluation import NUM_TASKS, LinearClassifier, ToyTasks, make_trainer

from cdl_lightning.callbacks import _accuracy_writer
from cdl_lightning.callbacks._accuracy_writer import BackgroundWriter
from cdl_lightning.callbacks.continual_evaluation import ContinualEvaluation

FILES = ("accuracy_matrix.csv", "metrics.json", "accuracy_matrix.png")


def _fit(tmp_path, name: str, background: bool, **callback_kwargs) -> tuple[ContinualEvaluation, TensorBoardLogger]:
    torch.manual_seed(0)
    callback = ContinualEvaluation(print_table=False, background_writes=background, **callback_kwargs)
    logger = TensorBoardLogger(str(tmp_path), name=name, version="")
    trainer = make_trainer(tmp_path, [callback], logger=logger)
    trainer.fit(LinearClassifier(), datamodule=ToyTasks(expose=True))
    return callback, logger


def _images(log_dir: str) -> list[tuple[int, bytes]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"images": 0}).Reload()
    return [(event.step, event.encoded_image_string) for event in events.Images("cl/accuracy_matrix")]


def test_background_and_in_place_write_the_same_files(tmp_path, monkeypatch):
    rendered: list[str] = []
    render = _accuracy_writer.render_heatmap

    def slow_render(*args, **kwargs):  # slow like a real heatmap, and note the thread it runs in
        rendered.append(threading.current_thread().name)
        time.sleep(0.3)
        return render(*args, **kwargs)

    monkeypatch.setattr(_accuracy_writer, "render_heatmap", slow_render)
    background, background_logger = _fit(tmp_path, "background", background=True)
    # complete right after fit returns: no writing thread left, every file whole, the last row in metrics.json
    assert not any(thread.name == "cdl-accuracy-writer" for thread in threading.enumerate())
    assert rendered == ["cdl-accuracy-writer"] * NUM_TASKS
    result = json.loads(open(f"{background_logger.log_dir}/metrics.json").read())
    assert result["status"] == "complete" and result["filled_rows"] == [0, 1, 2]

    rendered.clear()
    in_place, in_place_logger = _fit(tmp_path, "in_place", background=False)
    assert rendered == [threading.main_thread().name] * NUM_TASKS
    assert background.matrix.nan_to_num(-1).tolist() == in_place.matrix.nan_to_num(-1).tolist()
    for name in FILES:
        ours = open(f"{background_logger.log_dir}/{name}", "rb").read()
        assert ours == open(f"{in_place_logger.log_dir}/{name}", "rb").read(), name
        assert len(ours) > 100
    # the TensorBoard image of every evaluation, at its step, identical
    images = _images(background_logger.log_dir)
    assert [step for step, _ in images] == [step for step, _ in _images(in_place_logger.log_dir)]
    assert len(images) == NUM_TASKS and images == _images(in_place_logger.log_dir)


def test_an_error_of_the_writing_thread_is_raised_by_fit(tmp_path, monkeypatch):
    def broken_render(*args, **kwargs):
        raise OSError("disk full (test)")

    monkeypatch.setattr(_accuracy_writer, "render_heatmap", broken_render)
    callback = ContinualEvaluation(print_table=False, output_dir=str(tmp_path / "out"))
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(RuntimeError, match="writing the evaluation's files failed") as raised:
        trainer.fit(LinearClassifier(), datamodule=ToyTasks(expose=True))
    assert isinstance(raised.value.__cause__, OSError) and "disk full" in str(raised.value.__cause__)
    # the files written before the failure are there, and the run says it failed
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["status"] == "failed"


def test_queue_runs_jobs_in_order_on_copies_and_reraises_once():
    writer = BackgroundWriter()
    done: list[int] = []
    gate = threading.Event()
    writer.submit(lambda: (gate.wait(5), done.append(0)))
    for i in range(1, 5):
        writer.submit(lambda i=i: done.append(i))
    assert done == []  # the first job waits: submit did not block
    gate.set()
    writer.flush()
    assert done == [0, 1, 2, 3, 4]

    writer.submit(lambda: 1 / 0)
    writer.submit(lambda: done.append(5))  # jobs after a failed one still run
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        writer.flush()
    assert done[-1] == 5
    writer.flush()  # raised once, not again

    writer.submit(lambda: 1 / 0)
    time.sleep(0.2)
    with pytest.raises(RuntimeError):  # surfaces at the next submit too
        writer.submit(lambda: None)


def test_write_copies_the_matrix_and_summary(tmp_path):
    from cdl_lightning.callbacks._accuracy_matrix import AccuracyMatrix

    matrix = AccuracyMatrix(2)
    matrix.fill_row(0, torch.tensor([3, 0]), torch.tensor([4, 0]))
    writer = _accuracy_writer.AccuracyReportWriter(print_table=False, log_image=False)
    gate = threading.Event()
    writer._queue.submit(lambda: gate.wait(5))  # hold the thread while the caller changes its data
    summary = matrix.summary(1)
    writer.write(str(tmp_path), matrix, summary, 0)
    matrix.fill_row(1, torch.tensor([1, 1]), torch.tensor([4, 4]))
    summary["accuracy_matrix"][0][0] = -1.0
    gate.set()
    writer.flush()
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["accuracy_matrix"] == [[75.0, None], [None, None]]
    assert np.isnan(np.genfromtxt(tmp_path / "accuracy_matrix.csv", delimiter=",", skip_header=1)[1, 1:]).all()
