"""`Distiller` and `TeacherRun` over real fits (`cdl_lightning.models.distiller`): a tiny teacher run (width 64) is
trained once; width-32 students distil from its per-task snapshots with every method."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _model_helpers import EPOCHS_PER_TASK, NUM_TASKS, assert_full_matrix, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from cdl_lightning.callbacks import ContinualEvaluation
from cdl_lightning.data import ContinualDataModule, SyntheticShapes
from cdl_lightning.models import Distiller, PromptLearner, TeacherRun, checkpoint_snapshots
from cdl_lightning.nn import (
    DKD,
    KDP,
    BackboneConfig,
    CodaPrompt,
    DeiTToken,
    FitNets,
    LogitKD,
    NoDistillation,
    ReviewKD,
)

CLASSES = 8  # 2 tasks x 4 classes
TEACHER_KWARGS = dict(img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=2)  # 4 patches + CLS = 5 tokens
STUDENT_KWARGS = dict(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2)
CODA = functools.partial(CodaPrompt, pool_size=20, length=8, layers=(0, 1, 2))  # 10 components per task
TEACHER_METHODS = (LogitKD, DKD, FitNets, ReviewKD, DeiTToken, KDP)


def backbone(kwargs: dict) -> BackboneConfig:
    return BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=dict(kwargs))


def make_data(epochs_per_task: int = EPOCHS_PER_TASK, num_tasks: int = NUM_TASKS, **kwargs: Any) -> ContinualDataModule:
    source = SyntheticShapes(num_classes=CLASSES, train_per_class=8, test_per_class=4)
    return ContinualDataModule(
        source=source, num_tasks=num_tasks, epochs_per_task=epochs_per_task, batch_size=8, image_size=32, **kwargs
    )


def student_kwargs(data: ContinualDataModule, **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        backbone=backbone(STUDENT_KWARGS),
        prompt=CODA,
        task_sizes=data.task_sizes,
        epochs_per_task=data.epochs_per_task,
        class_order=data.class_order,
    )
    args.update(kwargs)
    return args






def images_batch(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def train_teacher(root: Path, epochs_per_task: int, **kwargs: Any) -> SimpleNamespace:
    data = make_data(epochs_per_task)
    torch.manual_seed(0)
    model = PromptLearner(
        backbone=backbone(TEACHER_KWARGS),
        prompt=CODA,
        task_sizes=data.task_sizes,
        epochs_per_task=epochs_per_task,
        class_order=data.class_order,
        **kwargs,
    )
    checkpoints = root / "checkpoints"
    callbacks = [
        ContinualEvaluation(print_table=False, log_image=False),
        ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=-1),
    ]
    make_trainer(root, epochs_per_task, callbacks).fit(model, data)
    last = checkpoints / "last.ckpt"
    return SimpleNamespace(
        model=model.eval(),
        last=str(last),
        first_task=str(checkpoints / "epoch=1-step=8.ckpt"),
        checkpoint=torch.load(last, map_location="cpu", weights_only=False),
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished teacher run: width 64, CODA-Prompt, its own query (default)."""
    return train_teacher(tmp_path_factory.mktemp("teacher"), EPOCHS_PER_TASK)


@pytest.fixture(scope="module")
def shared_query_teacher(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A teacher run that takes its query from a ViT of the student's architecture (the CDL reference's choice)."""
    return train_teacher(tmp_path_factory.mktemp("shared_teacher"), 1, query_backbone=backbone(STUDENT_KWARGS))


class DistillRecorder(Callback):
    """Per training step: loss, teacher task and mode, whether the teacher equals the snapshot of its task."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.teacher_tasks: list[tuple[int, int]] = []
        self.teacher_training: list[bool] = []
        self.teacher_is_snapshot: list[bool] = []
        self.student_backbone_training: list[bool] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.losses.append(loss.item())
        self.student_backbone_training.append(any(m.training for m in pl_module.classifier.backbone.modules()))
        teacher = pl_module.teacher
        if teacher is None:
            return
        self.teacher_tasks.append((trainer.current_epoch, pl_module.teacher_task))
        self.teacher_training.append(any(m.training for m in teacher.modules()))
        snapshot = pl_module.teacher_run.snapshot(pl_module.teacher_task)
        self.teacher_is_snapshot.append(
            all(
                torch.equal(p, snapshot[k]) for k, p in teacher.named_parameters() if k.startswith(("prompt.", "head."))
            )
        )


def spy_teacher_forward(distiller: Distiller) -> list[Any]:
    outputs: list[Any] = []
    original = distiller.teacher_forward

    def teacher_forward(images, task, query):
        out = original(images, task, query)
        outputs.append(out)
        return out

    distiller.teacher_forward = teacher_forward
    return outputs


# ================================================================================================ every method
@pytest.mark.parametrize("method_cls", [NoDistillation, *TEACHER_METHODS], ids=lambda c: c.__name__)
def test_student_fit_with_every_method(teacher, tmp_path, method_cls):
    data = make_data()
    needs_teacher = method_cls is not NoDistillation
    torch.manual_seed(1)
    distiller = Distiller(
        method=method_cls(), teacher_checkpoint=teacher.last if needs_teacher else None, **student_kwargs(data)
    )
    assert distiller.share_query is False
    teacher_net = distiller.teacher
    if needs_teacher:
        teacher_before = {k: v.clone() for k, v in teacher_net.state_dict().items()}
        teacher_ids = {id(p) for p in distiller.teacher_parameters()}
        assert teacher_ids and not teacher_ids & {id(p) for p in distiller.parameters()}
        assert teacher_net.query_encoder is None  # default: the teacher's own backbone makes its query
    else:
        assert teacher_net is None and distiller.teacher_run is None and distiller.teacher_parameters() == []
    teacher_outputs = spy_teacher_forward(distiller)
    recorder = DistillRecorder()
    evaluation = ContinualEvaluation(print_table=False, log_image=False)
    trainer = make_trainer(tmp_path, callbacks=[recorder, evaluation])
    trainer.fit(distiller, data)

    steps = NUM_TASKS * EPOCHS_PER_TASK * 4
    assert len(recorder.losses) == steps and all(math.isfinite(x) for x in recorder.losses), recorder.losses
    assert_full_matrix(evaluation.matrix, distiller, data)
    assert len(distiller.task_snapshots) == NUM_TASKS
    assert not any(recorder.student_backbone_training)
    # only the student's trainable parameters are optimized (prompt, head, method's own parameters)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in distiller.parameters() if p.requires_grad}
    assert all(not k.startswith("teacher") for k in distiller.state_dict())
    assert len(teacher_outputs) == steps
    if not needs_teacher:
        assert all(out is None for out in teacher_outputs)
        return
    assert not optimized & teacher_ids
    # the teacher: eval mode, no autograd, snapshot t during task t, frozen weights never change
    assert recorder.teacher_tasks == [
        (e, e // EPOCHS_PER_TASK) for e in range(NUM_TASKS * EPOCHS_PER_TASK) for _ in range(4)
    ]
    assert not any(recorder.teacher_training) and all(recorder.teacher_is_snapshot)
    assert all(not out.logits.requires_grad for out in teacher_outputs)
    assert distiller.teacher is teacher_net and distiller.teacher_task == 1
    assert not any(p.requires_grad for p in teacher_net.parameters())
    snapshot = checkpoint_snapshots(teacher.checkpoint["cdl"])[1]
    after = teacher_net.state_dict()
    for key, value in after.items():
        if key.startswith(("prompt.", "head.")):
            assert torch.equal(value, snapshot[f"classifier.{key}"]), key
        else:
            assert torch.equal(value, teacher_before[key]), key
    assert set(after) == set(teacher_before)
    assert all(not k.startswith("teacher") for k in distiller.state_dict())
    assert not teacher_ids & {id(p) for p in distiller.parameters()}


def test_kdp_trains_kd_prompts_and_heads_only(teacher):
    data = make_data()
    distiller = Distiller(method=KDP(), teacher_checkpoint=teacher.last, **student_kwargs(data))
    trainable = {name for name, p in distiller.named_parameters() if p.requires_grad}
    assert trainable == {
        "classifier.prompt.keys",
        "classifier.prompt.attention",
        "classifier.prompt.components",
        "classifier.head.weight",
        "classifier.head.bias",
        "method.token",
        "method.prefixes",
        "method.kd_head.weight",
        "method.kd_head.bias",
    }
    assert distiller.method.prefixes.shape == (3, 6, 32)  # layers 1..3 of a depth-4 student, length 6, width 32
    assert distiller.method.token.shape == (1, 1, 32)
    assert distiller.method.kd_head.weight.shape == (CLASSES, 32)


def test_distiller_checkpoint_holds_student_only_and_restores(teacher, tmp_path):
    data = make_data(epochs_per_task=1)
    distiller = Distiller(method=KDP(), teacher_checkpoint=teacher.last, **student_kwargs(data))
    checkpoints = tmp_path / "checkpoints"
    trainer = make_trainer(tmp_path, 1, [ModelCheckpoint(dirpath=checkpoints, save_last=True)])
    trainer.fit(distiller, data)
    checkpoint = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    # the student's Adam state is packed as its nonzero rows (CODA components of task 1 among them)
    assert checkpoint["cdl"]["optimizer_state_rows"] is True
    assert any(isinstance(v, dict) for s in checkpoint["optimizer_states"][0]["state"].values() for v in s.values())
    assert set(state) == set(distiller.trainable_state())
    assert any(k.startswith("method.") for k in state)
    assert not [k for k in state if "teacher" in k or k.startswith("classifier.backbone.")]
    assert checkpoint["hyper_parameters"]["teacher_checkpoint"] == teacher.last
    fresh = Distiller(method=KDP(), teacher_checkpoint=teacher.last, **student_kwargs(data))
    assert fresh.teacher_task == 0
    fresh.on_load_checkpoint(checkpoint)
    live = trainer.optimizers[0].state_dict()["state"]  # no step after the last checkpoint: the saved state
    unpacked = checkpoint["optimizer_states"][0]["state"]
    assert unpacked.keys() == live.keys()
    assert all(torch.equal(unpacked[i][k], v) for i, s in live.items() for k, v in s.items())
    fresh.load_state_dict(state, strict=False)
    assert fresh.teacher_task == 1 and fresh.opened_task == 1
    for name, value in distiller.trainable_state().items():
        assert torch.equal(fresh.trainable_state()[name], value), name
    images = images_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images, 1), distiller.eval()(images, 1), rtol=0, atol=0)


# =============================================================================================== teacher handling
def test_teacher_checkpoint_with_the_older_plain_snapshot_list_is_read(teacher, tmp_path):
    checkpoint = torch.load(teacher.last, map_location="cpu", weights_only=False)
    packed = checkpoint["cdl"].pop("task_snapshot_rows")
    checkpoint["cdl"]["task_snapshots"] = checkpoint_snapshots({"task_snapshot_rows": packed})
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    run, current = TeacherRun(str(old)), TeacherRun(str(teacher.last))
    assert len(run.snapshots) == len(current.snapshots) == NUM_TASKS
    for a, b in zip(run.snapshots, current.snapshots, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_switches_snapshot_at_task_boundary(teacher):
    data = make_data()
    distiller = Distiller(method=LogitKD(), teacher_checkpoint=teacher.last, **student_kwargs(data))
    snapshots = checkpoint_snapshots(teacher.checkpoint["cdl"])
    assert distiller.teacher_task == 0
    assert torch.equal(distiller.teacher.head.weight, snapshots[0]["classifier.head.weight"])
    distiller.open_task(1)
    assert distiller.teacher_task == 1
    for name, p in distiller.teacher.named_parameters():
        if name.startswith(("prompt.", "head.")):
            assert torch.equal(p, snapshots[1][f"classifier.{name}"]), name
    assert not torch.equal(snapshots[0]["classifier.head.weight"], snapshots[1]["classifier.head.weight"])


def test_teacher_stays_in_eval_mode_and_moves_with_the_module(teacher):
    distiller = Distiller(method=LogitKD(), teacher_checkpoint=teacher.last, **student_kwargs(make_data()))
    distiller.train()
    assert distiller.training and distiller.classifier.prompt.training
    assert not any(m.training for m in distiller.teacher.modules())
    distiller.double()
    assert all(p.dtype == torch.float64 for p in distiller.teacher.parameters())


def test_concurrent_teacher_is_a_flag_of_the_fast_paths_and_a_plain_call_off_cuda(teacher):
    """``concurrent_teacher`` (default on) puts the teacher's pass on a second CUDA stream (`FastPaths.aside`); off
    CUDA it is the plain call: the same loss either way, nothing left pending. The stream itself is checked on a GPU
    (``tests/gpu/test_gpu_fast_paths.py``)."""
    data = make_data()
    models = {}
    for flag in (True, False):
        torch.manual_seed(0)
        model = Distiller(method=KDP(), teacher_checkpoint=teacher.last, concurrent_teacher=flag,
                          **student_kwargs(data))
        assert model.fast_paths.side_stream is flag and model.hparams["concurrent_teacher"] is flag
        model.log = lambda *args, **kwargs: None
        model.open_task(0)
        models[flag] = model
    batch = (images_batch(4), torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.long))
    losses = {flag: model.training_step(batch, 0) for flag, model in models.items()}
    assert torch.isfinite(losses[True]) and torch.equal(losses[True], losses[False])
    assert models[True].fast_paths._pending == [] and models[True].fast_paths.streams == {}
    called = []
    assert models[True].fast_paths.aside(lambda: called.append(1) or (torch.ones(1),), [torch.zeros(1)])[0] == 1
    assert called == [1] and models[True].fast_paths._pending == []


def test_teacher_runs_beside_the_student_only_within_the_distillers_training_step(teacher):
    """The teacher's pass may be queued on the second stream only inside `Distiller.training_step` (whose loss joins
    first): a `teacher_forward` called elsewhere (a subclass's own step that never joins) runs at once, and an error
    between the teacher's pass and the join closes the scope (which makes the main stream wait: nothing pending)."""
    data = make_data()
    model = Distiller(method=KDP(), teacher_checkpoint=teacher.last, **student_kwargs(data))
    model.log = lambda *args, **kwargs: None
    model.open_task(0)
    scopes, aside = [], model.fast_paths.aside

    def spy(fn, inputs):
        scopes.append(model.fast_paths._overlap)
        return aside(fn, inputs)

    model.fast_paths.aside = spy
    batch = (images_batch(4), torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(model.training_step(batch, 0))
    model.teacher_forward(batch[0], 0, None)
    assert scopes == [1, 0] and model.fast_paths._overlap == 0
    model.student_forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("student failed"))
    with pytest.raises(RuntimeError, match="student failed"):
        model.training_step(batch, 1)
    assert scopes == [1, 0, 1] and model.fast_paths._overlap == 0 and model.fast_paths._pending == []


def test_distiller_teacher_reproduces_the_teacher_run(teacher):
    """The teacher a student distils from must be the network the teacher run trained: same logits on any image.

    Random-init backbones (how every config is exercised without pretrained weights) are rebuilt from their
    identity, so the frozen weights must come out the same as in the teacher run."""
    distiller = Distiller(method=LogitKD(), teacher_checkpoint=teacher.last, **student_kwargs(make_data()))
    distiller.load_teacher_task(1)
    images = images_batch()
    with torch.no_grad():
        expected = teacher.model(images, 1)
        actual = distiller.teacher(images, 1, train=False).logits[:, :CLASSES]
    torch.testing.assert_close(actual, expected)


def test_query_shared_when_teacher_query_backbone_is_the_students(shared_query_teacher, teacher, tmp_path):
    data = make_data(epochs_per_task=1)
    shared = Distiller(method=LogitKD(), teacher_checkpoint=shared_query_teacher.last, **student_kwargs(data))
    assert shared.share_query is True
    assert shared.teacher.query_encoder is shared.classifier.backbone
    assert shared.teacher.prompt.keys.shape[-1] == 32  # teacher keys have the student's width
    not_shared = Distiller(method=LogitKD(), teacher_checkpoint=teacher.last, **student_kwargs(data))
    assert not_shared.share_query is False
    # one query pass per training step, used by teacher and student
    calls = []
    query = shared.classifier.backbone.query

    def counting_query(images):
        calls.append(images.shape[0])
        return query(images)

    shared.classifier.backbone.query = counting_query
    shared.open_task(0)
    images, targets = images_batch(4), torch.tensor([0, 1, 2, 3])
    loss = shared.training_step((images, targets, torch.zeros(4, dtype=torch.long)), 0)
    assert torch.isfinite(loss) and calls == [4]
    # and a fit completes
    shared.classifier.backbone.query = query
    evaluation = ContinualEvaluation(print_table=False, log_image=False)
    make_trainer(tmp_path, epochs_per_task=1, callbacks=[evaluation]).fit(shared, data)
    assert_full_matrix(evaluation.matrix, shared, data)
    assert shared.teacher_task == 1


def test_teacher_of_another_task_split_is_refused(teacher):
    data = make_data(num_tasks=4)  # tasks of 2 classes
    with pytest.raises(ValueError, match="sizes"):
        Distiller(method=LogitKD(), teacher_checkpoint=teacher.last, **student_kwargs(data))


def test_teacher_of_another_class_order_is_refused(teacher):
    data = make_data(class_order=[7, 6, 5, 4, 3, 2, 1, 0])
    with pytest.raises(ValueError, match="class order"):
        Distiller(method=LogitKD(), teacher_checkpoint=teacher.last, **student_kwargs(data))
    data = make_data(class_order="random", seed=3)
    assert data.class_order != list(range(CLASSES))
    with pytest.raises(ValueError, match="class order"):
        Distiller(method=KDP(), teacher_checkpoint=teacher.last, **student_kwargs(data))


def test_teacher_checkpoint_of_the_old_layout_is_read(teacher, tmp_path):
    """Teacher checkpoints written before `TaskSchedule` stored task_sizes / class_order / class_names separately."""
    from cdl_lightning.tasks import TaskSchedule

    checkpoint = torch.load(teacher.last, map_location="cpu", weights_only=True)
    schedule = checkpoint["cdl"].pop("task_schedule")
    checkpoint["cdl"].update({key: schedule[key] for key in ("task_sizes", "class_order", "class_names")})
    del checkpoint["hyper_parameters"]["task_schedule"]
    checkpoint["hyper_parameters"].update(schedule)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    run = TeacherRun(str(tmp_path / "old.ckpt"))
    assert run.task_schedule == TaskSchedule.from_dict(schedule) == TeacherRun(teacher.last).task_schedule
    run.check_matches(make_data().task_schedule)
    with pytest.raises(ValueError, match="tasks of sizes"):
        run.check_matches(TaskSchedule((2, 6)))


def test_unfinished_teacher_is_refused(teacher):
    run = TeacherRun(teacher.first_task)  # written after task 0: one snapshot of two
    assert len(run.snapshots) == 1
    with pytest.raises(ValueError, match="snapshots of 1 of 2"):
        Distiller(method=LogitKD(), teacher_checkpoint=teacher.first_task, **student_kwargs(make_data()))


def test_missing_teacher_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Distiller(method=KDP(), teacher_checkpoint=str(tmp_path / "nope.ckpt"), **student_kwargs(make_data()))
    with pytest.raises(FileNotFoundError):
        TeacherRun(str(tmp_path / "nope.ckpt"))


@pytest.mark.parametrize("method_cls", TEACHER_METHODS, ids=lambda c: c.__name__)
def test_method_needing_a_teacher_without_checkpoint(method_cls):
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        Distiller(method=method_cls(), **student_kwargs(make_data()))


def test_none_method_needs_no_teacher():
    distiller = Distiller(**student_kwargs(make_data()))
    assert type(distiller.method) is NoDistillation
    assert distiller.teacher is None and distiller.share_query is False


# ======================================================================================================= KDP values
def kdp_by_hand(distiller: Distiller, images: torch.Tensor, task: int, train: bool) -> SimpleNamespace:
    """The student's CLS and KD-head logits, assembling prompts + KD prefixes + KD token by hand."""
    clf, method = distiller.classifier, distiller.method
    batch, half = images.shape[0], method.prefix_length // 2
    query = clf.backbone.query(images)
    prefixes = dict(clf.prompt(query, task, train).prefixes)  # CODA layers 0, 1, 2
    for i, layer in enumerate(range(1, clf.backbone.depth)):  # KD prefixes in layers 1..depth-1
        kd_keys = method.prefixes[i, :half].expand(batch, -1, -1)
        kd_values = method.prefixes[i, half:].expand(batch, -1, -1)
        if layer in prefixes:
            keys, values = prefixes[layer]
            prefixes[layer] = (torch.cat([keys, kd_keys], 1), torch.cat([values, kd_values], 1))
        else:
            prefixes[layer] = (kd_keys, kd_values)
    tokens = clf.backbone(images, prefixes, append=method.token).tokens
    assert tokens.shape[1] == 5 + 1  # CLS + 4 patches + the KD token at the end
    return SimpleNamespace(cls=clf.head(tokens[:, 0]), kd=method.kd_head(tokens[:, -1]))


def test_kdp_inference_logits_mix_cls_and_kd_heads(teacher):
    distiller = Distiller(method=KDP(alpha=0.3), teacher_checkpoint=teacher.last, **student_kwargs(make_data()))
    distiller.open_task(1)
    distiller.eval()
    images = images_batch()
    with torch.no_grad():
        hand = kdp_by_hand(distiller, images, 1, train=False)
        logits = distiller(images, 1)
        first_task = distiller(images, 0)
    expected = 0.7 * hand.cls + 0.3 * hand.kd
    assert logits.shape == (6, CLASSES) and first_task.shape == (6, 4)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, hand.cls, atol=1e-3) and not torch.allclose(logits, hand.kd, atol=1e-3)


def test_kdp_training_loss_by_hand(teacher):
    distiller = Distiller(method=KDP(), teacher_checkpoint=teacher.last, **student_kwargs(make_data()))
    distiller.open_task(1)
    distiller.train()
    images, targets = images_batch(), torch.tensor([4, 5, 6, 7, 4, 6])
    loss = distiller.training_step((images, targets, torch.ones(6, dtype=torch.long)), 0)
    with torch.no_grad():
        hand = kdp_by_hand(distiller, images, 1, train=True)
        teacher_logits = distiller.teacher(images, 1, train=False).logits
    current = slice(4, 8)  # task 1's classes only
    ce = F.cross_entropy(hand.cls[:, current], targets - 4)  # past columns at -inf = softmax over the current task
    t = 2.0
    p_teacher = F.softmax(teacher_logits[:, current] / t, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(hand.kd[:, current] / t, dim=1))).sum(1).mean() * t * t
    torch.testing.assert_close(loss, 0.5 * ce + 0.5 * kl, rtol=1e-5, atol=1e-6)
    assert kl > 0


# ====================================================================================== bf16 frozen-weight storage
def test_bf16_mixed_fit_with_cast_frozen_weights_is_bit_identical(teacher, tmp_path):
    """Under ``bf16-mixed`` the frozen weights (student, query, teacher) are stored in bf16 at setup; autocast used
    them in bf16 anyway, so every loss and every learned parameter equals the run that keeps them fp32."""
    runs = {}
    for cast in (True, False):
        data = make_data(epochs_per_task=1)
        torch.manual_seed(1)
        distiller = Distiller(method=KDP(), teacher_checkpoint=teacher.last,
                              **student_kwargs(data, cast_frozen_weights=cast))
        recorder = DistillRecorder()
        make_trainer(tmp_path / str(cast), 1, [recorder], precision="bf16-mixed").fit(distiller, data)
        runs[cast] = distiller, recorder.losses
    (cast_model, cast_losses), (fp32_model, fp32_losses) = runs[True], runs[False]
    assert len(cast_losses) == NUM_TASKS * 4 and cast_losses == fp32_losses
    for name, value in fp32_model.trainable_state().items():
        assert torch.equal(cast_model.trainable_state()[name], value), name
    qkv = "vit.blocks.0.attn.qkv.weight"
    for vit in cast_model.frozen_vits():
        assert vit.get_parameter(qkv).dtype == torch.bfloat16 and vit.matmul_dtype == torch.bfloat16
    assert cast_model.teacher.backbone in cast_model.frozen_vits()
    assert all(vit.get_parameter(qkv).dtype == torch.float32 for vit in fp32_model.frozen_vits())
    images = images_batch()
    with torch.no_grad():  # evaluation outside autocast still works (the cast ViTs autocast themselves)
        torch.testing.assert_close(cast_model.eval()(images, 1), fp32_model.eval()(images, 1), rtol=0.1, atol=0.1)
