"""`PromptLearner` over a real ``trainer.fit`` (`cdl_lightning.models.learner`): task loop, CODA slices, optimizer
reset, LR schedule, frozen backbone, checkpoints and class masking, all checked against values."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _model_helpers import EPOCHS_PER_TASK, NUM_TASKS, assert_full_matrix, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

import cdl_lightning.nn.kd as kd_module
from cdl_lightning.callbacks import ContinualEvaluation
from cdl_lightning.data import ContinualDataModule, SyntheticShapes
from cdl_lightning.models import PromptLearner, checkpoint_snapshots, quarter_cosine
from cdl_lightning.models.optimizer_state import unpack_optimizer_states
from cdl_lightning.nn import BackboneConfig, CodaPrompt

CLASSES = 8  # 2 tasks x 4 classes
TEACHER_KWARGS = dict(img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=2)  # 4 patches + CLS = 5 tokens
STUDENT_KWARGS = dict(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2)
CODA = functools.partial(CodaPrompt, pool_size=20, length=8, layers=(0, 1, 2))  # 10 components per task
SEED = 0


def backbone(kwargs: dict = TEACHER_KWARGS) -> BackboneConfig:
    return BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=dict(kwargs))


def make_data(epochs_per_task: int = EPOCHS_PER_TASK, **kwargs: Any) -> ContinualDataModule:
    source = SyntheticShapes(num_classes=CLASSES, train_per_class=8, test_per_class=4)
    return ContinualDataModule(
        source=source, num_tasks=NUM_TASKS, epochs_per_task=epochs_per_task, batch_size=8, image_size=32, **kwargs
    )


def make_learner(data: ContinualDataModule, seed: int = SEED, **kwargs: Any) -> PromptLearner:
    torch.manual_seed(seed)  # random-init backbone and head: the same seed builds the same network
    args: dict[str, Any] = dict(
        backbone=backbone(),
        prompt=CODA,
        task_sizes=data.task_sizes,
        epochs_per_task=data.epochs_per_task,
        class_order=data.class_order,
    )
    args.update(kwargs)
    return PromptLearner(**args)






def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(Callback):
    """Backbone mode and loss in every training step, LR at every epoch start, eval logit widths."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.backbone_training: list[bool] = []
        self.module_training: list[bool] = []
        self.val_widths: dict[int, set[int]] = {}
        self.val_label_max: dict[int, int] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.losses.append(loss.item())
        self.module_training.append(pl_module.training)
        self.backbone_training.append(any(m.training for m in pl_module.classifier.backbone.modules()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        epoch = trainer.current_epoch
        self.val_widths.setdefault(epoch, set()).add(outputs["logits"].shape[1])
        self.val_label_max[epoch] = max(self.val_label_max.get(epoch, -1), int(batch[1].max()))


def spy_open_task(model: PromptLearner) -> list[dict[str, Any]]:
    """Wrap ``model.open_task``: record the trainable state and Adam's state size around every call."""
    calls: list[dict[str, Any]] = []
    original = model.open_task

    def open_task(task: int) -> None:
        optimizer = model.trainer.optimizers[0]
        record = {
            "task": task,
            "epoch": model.trainer.current_epoch,
            "before": model.trainable_state(),
            "adam_before": len(optimizer.state),
        }
        original(task)
        record.update(after=model.trainable_state(), adam_after=len(optimizer.state))
        calls.append(record)

    model.open_task = open_task  # instance attribute: `on_train_batch_start` calls `self.open_task`
    return calls


# ============================================================================ one real fit, shared by several tests
@pytest.fixture(scope="module")
def coda_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("coda_run")
    data = make_data()
    model = make_learner(data)
    initial = model.trainable_state()
    frozen_before = {k: v.clone() for k, v in model.classifier.backbone.state_dict().items()}
    calls = spy_open_task(model)
    recorder = Recorder()
    evaluation = ContinualEvaluation(print_table=False, log_image=False)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    trainer = make_trainer(root, callbacks=[evaluation, recorder, checkpoint])
    optimizer_param_ids: list[int] = []
    original_configure = model.configure_optimizers

    def configure_optimizers() -> Any:
        config = original_configure()
        optimizer_param_ids.extend(id(p) for group in config["optimizer"].param_groups for p in group["params"])
        return config

    model.configure_optimizers = configure_optimizers
    trainer.fit(model, data)
    return SimpleNamespace(
        root=root,
        data=data,
        model=model,
        trainer=trainer,
        initial=initial,
        calls=calls,
        recorder=recorder,
        evaluation=evaluation,
        frozen_before=frozen_before,
        optimizer_param_ids=optimizer_param_ids,
        last=root / "checkpoints" / "last.ckpt",
        final=model.trainable_state(),
    )


def test_fit_opens_each_task_once_and_snapshots_each_task(coda_run):
    calls, model = coda_run.calls, coda_run.model
    assert [(c["task"], c["epoch"]) for c in calls] == [(0, 0), (1, EPOCHS_PER_TASK)]
    assert model.opened_task == 1 and model.current_task == 1
    assert len(model.task_snapshots) == NUM_TASKS
    snap0, snap1 = model.task_snapshots
    # snapshot t = trainable state at the end of task t
    assert states_equal(snap0, calls[1]["before"])
    assert states_equal(snap1, coda_run.final)
    assert set(snap0) == {
        "classifier.prompt.keys",
        "classifier.prompt.attention",
        "classifier.prompt.components",
        "classifier.head.weight",
        "classifier.head.bias",
    }
    for key in snap0:
        assert not torch.equal(snap0[key], snap1[key]), key
    assert_full_matrix(coda_run.evaluation.matrix, coda_run.model, coda_run.data)
    assert all(math.isfinite(loss) for loss in coda_run.recorder.losses)
    assert len(coda_run.recorder.losses) == NUM_TASKS * EPOCHS_PER_TASK * 4  # 32 images per task, batch 8


def test_checkpoint_holds_the_snapshots(coda_run):
    checkpoint = torch.load(coda_run.last, map_location="cpu", weights_only=False)
    snapshots = checkpoint_snapshots(checkpoint["cdl"])
    assert len(snapshots) == NUM_TASKS
    # stored as the rows task 1 changed: CODA components 10..19 of every prompted layer (length 8 rows each)
    packed = checkpoint["cdl"]["task_snapshot_rows"][1]["classifier.prompt.components"]
    rows = torch.tensor([(layer * 20 + c) * 8 + i for layer in range(3) for c in range(10, 20) for i in range(8)])
    assert torch.equal(packed["rows"], rows)
    assert "task_snapshots" not in checkpoint["cdl"]
    for saved, live in zip(snapshots, coda_run.model.task_snapshots, strict=True):
        assert states_equal(saved, live)
    assert checkpoint["cdl"]["opened_task"] == 1
    assert checkpoint["cdl"]["task_schedule"]["task_sizes"] == [4, 4]
    assert checkpoint["cdl"]["task_schedule"]["class_order"] == list(range(CLASSES))
    assert checkpoint["hyper_parameters"]["task_schedule"] == checkpoint["cdl"]["task_schedule"]
    assert not {"task_sizes", "epochs_per_task", "class_names", "class_order"} & set(checkpoint["hyper_parameters"])


def test_checkpoint_holds_adam_state_as_its_nonzero_rows(coda_run):
    """Adam's moments are saved as the rows task 1 trained (`models.optimizer_state`), unpack bitwise to the live
    state of the finished fit (no step after the last checkpoint), and saving left that live state plain."""
    checkpoint = torch.load(coda_run.last, map_location="cpu", weights_only=True)
    assert checkpoint["cdl"]["optimizer_state_rows"] is True
    names = [name for name, p in coda_run.model.named_parameters() if p.requires_grad]
    packed = checkpoint["optimizer_states"][0]["state"]
    components = packed[names.index("classifier.prompt.components")]
    rows = torch.tensor([(layer * 20 + c) * 8 + i for layer in range(3) for c in range(10, 20) for i in range(8)])
    for moment in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(components[moment]["nonzero_rows"], rows)  # task 1's components 10..19, every layer
        keys = packed[names.index("classifier.prompt.keys")][moment]
        assert torch.equal(keys["nonzero_rows"], torch.tensor([layer * 20 + c for layer in range(3)
                                                               for c in range(10, 20)]))
    assert torch.is_tensor(packed[names.index("classifier.head.weight")]["exp_avg"])  # 2 KB: whole
    live = coda_run.trainer.optimizers[0].state_dict()
    assert all(torch.is_tensor(v) for per_param in live["state"].values() for v in per_param.values())
    restored = unpack_optimizer_states(checkpoint["optimizer_states"])[0]
    assert restored["param_groups"] == live["param_groups"] and restored["state"].keys() == live["state"].keys()
    for index, per_param in live["state"].items():
        assert restored["state"][index].keys() == per_param.keys()
        for name, value in per_param.items():
            mine = restored["state"][index][name]
            assert mine.dtype == value.dtype and mine.shape == value.shape, name
            assert torch.equal(mine.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), name


def test_coda_slice_redrawn_at_task_start_and_old_slice_frozen(coda_run):
    calls = coda_run.calls
    c = 10  # components per task: pool 20 / 2 tasks
    for name in ("keys", "attention", "components"):
        key = f"classifier.prompt.{name}"
        initial, before, after, final = (
            coda_run.initial[key],
            calls[1]["before"][key],
            calls[1]["after"][key],
            coda_run.final[key],
        )
        # task 1's slice: zero (unused) through task 0, re-drawn by open_task(1): unit rows orthogonal to slice 0
        assert torch.equal(initial[:, c:], torch.zeros_like(initial[:, c:]))
        assert torch.equal(before[:, c:], initial[:, c:])
        flat = after.flatten(2)  # layers x components x width
        assert not torch.equal(after[:, c:], before[:, c:])
        torch.testing.assert_close(flat[:, c:].norm(dim=-1), torch.ones(3, c))
        gram = flat[:, :c] @ flat[:, c:].transpose(1, 2)
        assert gram.abs().max() < 1e-5 * flat[:, :c].norm(dim=-1).max(), name
        # opening the task does not touch slice 0; training task 1 leaves it bitwise unchanged (detached + Adam reset)
        assert torch.equal(after[:, :c], before[:, :c])
        assert torch.equal(final[:, :c], before[:, :c]), name
        # slice 0 did train during task 0, slice 1 during task 1
        assert not torch.equal(before[:, :c], initial[:, :c])
        assert not torch.equal(final[:, c:], after[:, c:])


def test_head_columns_train_only_during_their_task(coda_run):
    initial, before, final = coda_run.initial, coda_run.calls[1]["before"], coda_run.final
    for name in ("classifier.head.weight", "classifier.head.bias"):
        # future classes untouched during task 0, past classes untouched during task 1 (-inf mask, Adam reset)
        assert torch.equal(before[name][4:], initial[name][4:]), name
        assert not torch.equal(before[name][:4], initial[name][:4]), name
        assert torch.equal(final[name][:4], before[name][:4]), name
        assert not torch.equal(final[name][4:], before[name][4:]), name


def test_optimizer_state_cleared_at_task_start(coda_run):
    first, second = coda_run.calls
    assert first["adam_before"] == 0 and first["adam_after"] == 0
    assert second["adam_before"] == 5  # keys, attention, components, head weight, head bias
    assert second["adam_after"] == 0


def test_open_task_on_attached_module_empties_adam_state(tmp_path):
    data = make_data(epochs_per_task=1)
    model = make_learner(data, prompt=None)
    trainer = make_trainer(tmp_path, epochs_per_task=1)
    trainer.fit(model, data)
    optimizer = trainer.optimizers[0]
    assert len(optimizer.state) == 2 and all(s["step"] > 0 for s in optimizer.state.values())
    model.open_task(1)
    assert len(optimizer.state) == 0
    assert model.opened_task == 1


def test_frozen_backbone_bitwise_unchanged_and_in_eval_mode(coda_run):
    after = coda_run.model.classifier.backbone.state_dict()
    assert states_equal(coda_run.frozen_before, after)
    recorder = coda_run.recorder
    assert recorder.module_training and all(recorder.module_training)
    assert not any(recorder.backbone_training)
    assert not any(p.requires_grad for p in coda_run.model.classifier.backbone.parameters())


def test_only_trainable_parameters_reach_the_optimizer(coda_run):
    model = coda_run.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "classifier.prompt.keys",
        "classifier.prompt.attention",
        "classifier.prompt.components",
        "classifier.head.weight",
        "classifier.head.bias",
    }
    by_id = {id(p): name for name, p in model.named_parameters()}
    assert sorted(by_id[i] for i in coda_run.optimizer_param_ids) == sorted(trainable)
    live = {id(p) for group in coda_run.trainer.optimizers[0].param_groups for p in group["params"]}
    assert live == set(coda_run.optimizer_param_ids)


def test_query_encoder_frozen_and_left_out_of_optimizer_and_checkpoint(tmp_path):
    data = make_data(epochs_per_task=1)
    model = make_learner(data, query_backbone=backbone(STUDENT_KWARGS))
    query_before = {k: v.clone() for k, v in model.classifier.query_encoder.state_dict().items()}
    assert model.classifier.prompt.keys.shape[-1] == 32  # keys have the query encoder's width
    trainer = make_trainer(
        tmp_path, epochs_per_task=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    )
    trainer.fit(model, data)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert not optimized & {id(p) for p in model.classifier.query_encoder.parameters()}
    assert states_equal(query_before, model.classifier.query_encoder.state_dict())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith(("classifier.backbone.", "classifier.query_encoder."))]


# ================================================================================================== LR schedule
def test_quarter_cosine_values():
    assert quarter_cosine(0, 20) == 1.0
    assert quarter_cosine(19, 20) == pytest.approx(math.cos(99 * math.pi / 200), abs=1e-15)
    assert quarter_cosine(19, 20) == pytest.approx(0.0157073, abs=1e-6)  # ~1.6% of lr0, not 0
    assert quarter_cosine(10, 20) == pytest.approx(math.cos(99 * math.pi * 10 / (200 * 19)), abs=1e-15)
    values = [quarter_cosine(i, 20) for i in range(20)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # strictly decreasing
    assert quarter_cosine(0, 1) == 1.0
    # the reference's off-by-one: epochs 0 and 1 both use i = 0, epoch e >= 1 uses i = e - 1
    assert quarter_cosine(0, 20, off_by_one=True) == quarter_cosine(1, 20, off_by_one=True) == 1.0
    assert quarter_cosine(2, 20, off_by_one=True) == quarter_cosine(1, 20)
    assert quarter_cosine(19, 20, off_by_one=True) == quarter_cosine(18, 20)


@pytest.mark.parametrize(
    ("schedule", "off_by_one", "factors"),
    [
        ("cosine", False, [1.0, math.cos(99 * math.pi / 400), math.cos(99 * math.pi / 200)]),
        ("cosine", True, [1.0, 1.0, math.cos(99 * math.pi / 400)]),
        ("constant", False, [1.0, 1.0, 1.0]),
    ],
)
def test_learning_rate_per_epoch_restarts_every_task(tmp_path, schedule, off_by_one, factors):
    epochs = 3
    data = make_data(epochs_per_task=epochs)
    model = make_learner(data, prompt=None, lr=2e-3, schedule=schedule, reference_lr_off_by_one=off_by_one)
    recorder = Recorder()
    evaluation = ContinualEvaluation(print_table=False, log_image=False)
    trainer = make_trainer(tmp_path, epochs_per_task=epochs, callbacks=[recorder, evaluation])
    trainer.fit(model, data)
    expected = [2e-3 * f for f in factors] * NUM_TASKS
    assert recorder.lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert_full_matrix(evaluation.matrix, model, data)
    assert len(model.task_snapshots) == NUM_TASKS


# ================================================================================================== checkpoints
def test_checkpoint_omits_frozen_backbone_and_is_small(coda_run):
    checkpoint = torch.load(coda_run.last, map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    assert not [k for k in state if k.startswith("classifier.backbone.")]
    assert set(state) == set(coda_run.final)
    for name, value in coda_run.final.items():
        assert torch.equal(state[name], value), name
    trainable_bytes = sum(v.numel() * v.element_size() for v in coda_run.final.values())
    frozen_bytes = sum(v.numel() * v.element_size() for v in coda_run.frozen_before.values())
    assert frozen_bytes > trainable_bytes
    # parameters + Adam's two moments + one snapshot per task, plus bookkeeping; with the backbone it would be
    # ~1 MB larger
    size = coda_run.last.stat().st_size
    assert size < (3 + NUM_TASKS) * trainable_bytes + 64 * 1024, (size, trainable_bytes, frozen_bytes)


def test_checkpoint_restores_trainable_state_through_validate(coda_run, tmp_path):
    data = make_data()
    fresh = make_learner(data)  # same seed: same random backbone as the trained model
    assert states_equal(fresh.classifier.backbone.state_dict(), coda_run.frozen_before)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert not states_equal(fresh.trainable_state(), coda_run.final)
    evaluation = ContinualEvaluation(print_table=False, log_image=False)
    trainer = make_trainer(tmp_path, callbacks=[evaluation])
    # weights_only=False: see test_checkpoint_loads_with_lightnings_default_weights_only for the default
    trainer.validate(fresh, data, ckpt_path=str(coda_run.last), verbose=False, weights_only=False)
    assert states_equal(fresh.trainable_state(), coda_run.final)
    assert fresh.opened_task == 1 and fresh.current_task == 1
    assert fresh.classifier.prompt.task == 1
    assert len(fresh.task_snapshots) == NUM_TASKS
    for loaded, trained in zip(fresh.task_snapshots, coda_run.model.task_snapshots, strict=True):
        assert states_equal(loaded, trained)
    # the reloaded model evaluates exactly as the trained one did after its last task
    torch.testing.assert_close(evaluation.matrix[1], coda_run.evaluation.matrix[1], rtol=0, atol=0)


def test_checkpoint_with_the_older_plain_snapshot_list_still_loads(coda_run, tmp_path):
    """Checkpoints written before snapshots were packed hold the full list under ``task_snapshots``."""
    checkpoint = torch.load(coda_run.last, map_location="cpu", weights_only=False)
    cdl = checkpoint["cdl"]
    cdl["task_snapshots"] = checkpoint_snapshots({"task_snapshot_rows": cdl.pop("task_snapshot_rows")})
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    fresh = make_learner(make_data())
    make_trainer(tmp_path).validate(fresh, make_data(), ckpt_path=str(old), verbose=False, weights_only=False)
    assert len(fresh.task_snapshots) == NUM_TASKS
    for loaded, trained in zip(fresh.task_snapshots, coda_run.model.task_snapshots, strict=True):
        assert states_equal(loaded, trained)


def test_checkpoint_loads_with_lightnings_default_weights_only(coda_run, tmp_path):
    """``trainer.validate/test/fit(ckpt_path=...)`` load with ``weights_only=True`` by default (Lightning 2.6, torch
    >= 2.6), and the DESIGN relies on it for resume: the checkpoint must unpickle without arbitrary globals."""
    data = make_data()
    fresh = make_learner(data)
    trainer = make_trainer(tmp_path, callbacks=[ContinualEvaluation(print_table=False, log_image=False)])
    trainer.validate(fresh, data, ckpt_path=str(coda_run.last), verbose=False)
    assert states_equal(fresh.trainable_state(), coda_run.final)


def test_checkpoint_hooks_restore_into_fresh_model(coda_run):
    checkpoint = torch.load(coda_run.last, map_location="cpu", weights_only=False)
    fresh = make_learner(make_data(), seed=SEED + 1)
    assert not states_equal(fresh.trainable_state(), coda_run.final)
    fresh.on_load_checkpoint(checkpoint)
    # the packed Adam state was unpacked in the dict, ready for Lightning's `restore_optimizers`
    assert all(torch.is_tensor(v) for s in checkpoint["optimizer_states"][0]["state"].values() for v in s.values())
    result = fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("classifier.backbone.") for k in result.missing_keys)
    assert states_equal(fresh.trainable_state(), coda_run.final)
    assert fresh.opened_task == 1 and fresh.current_task == 1


def test_checkpoint_of_another_task_split_is_refused(coda_run):
    checkpoint = torch.load(coda_run.last, map_location="cpu", weights_only=False)
    torch.manual_seed(SEED)
    other = PromptLearner(backbone=backbone(), prompt=CODA, task_sizes=[2, 2, 2, 2], epochs_per_task=2)
    with pytest.raises(ValueError, match="task sizes"):
        other.on_load_checkpoint(checkpoint)


# ======================================================================================== class masking and widths
def test_training_step_masks_past_classes(monkeypatch):
    data = make_data()
    model = make_learner(data)
    model.open_task(1)  # no trainer: the module's current task is the opened one
    assert model.current_task == 1
    masked: list[torch.Tensor] = []
    original = kd_module.mask_past_classes

    def recording_mask(logits, start, stop):
        out = original(logits, start, stop)
        masked.append(out.detach().clone())
        return out

    monkeypatch.setattr(kd_module, "mask_past_classes", recording_mask)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 32, 32, generator=generator)
    targets = torch.tensor([4, 5, 6, 7, 5, 4])
    task_ids = torch.ones(6, dtype=torch.long)
    model.train()
    with torch.no_grad():
        logits = model.classifier(images, 1, train=True).logits
    # hand computation: softmax over the current task's 4 columns only
    log_probs = logits[:, 4:8] - torch.logsumexp(logits[:, 4:8], dim=1, keepdim=True)
    expected = -log_probs[torch.arange(6), targets - 4].mean()
    loss = model.training_step((images, targets, task_ids), 0)
    torch.testing.assert_close(loss, expected)
    unmasked = F.cross_entropy(logits[:, :8], targets)
    assert not torch.allclose(unmasked, expected)
    assert len(masked) == 1
    ce_input = masked[0]
    assert ce_input.shape == (6, 8)
    assert torch.isneginf(ce_input[:, :4]).all()
    torch.testing.assert_close(ce_input[:, 4:], logits[:, 4:8])
    # no gradient reaches the past or future head columns
    loss.backward()
    grad = model.classifier.head.weight.grad
    assert torch.equal(grad[:4], torch.zeros_like(grad[:4]))
    assert (grad[4:8].abs().sum(dim=1) > 0).all()


def test_training_step_rejects_labels_of_another_task():
    model = make_learner(make_data(), prompt=None)
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="outside task 0"):
        model.training_step((images, torch.tensor([1, 5]), torch.tensor([0, 1])), 0)


def test_validation_logits_cover_the_classes_seen_so_far(coda_run):
    widths, label_max = coda_run.recorder.val_widths, coda_run.recorder.val_label_max
    assert widths == {EPOCHS_PER_TASK - 1: {4}, 2 * EPOCHS_PER_TASK - 1: {8}}
    assert label_max == {EPOCHS_PER_TASK - 1: 3, 2 * EPOCHS_PER_TASK - 1: 7}
    images = torch.rand(3, 3, 32, 32)
    model = coda_run.model.eval()
    assert model(images, 0).shape == (3, 4)
    assert model(images, 1).shape == (3, 8)
    assert model(images).shape == (3, 8)  # default: every task learned so far


def test_method_start_task_hook_runs_when_a_task_opens():
    from cdl_lightning.nn import DistillationMethod

    class Recording(DistillationMethod):
        def __init__(self) -> None:
            super().__init__()
            self.opened: list[int] = []

        def start_task(self, task: int) -> None:
            self.opened.append(task)

    model = make_learner(make_data(), prompt=None)
    model.method = Recording()
    model.open_task(0)
    model.open_task(1)
    assert model.method.opened == [0, 1]
