"""The training flags every train/ job shares (visadapt.train.flags), checked against their owners.

The learning rate fit applies at each optimiser step is timm's scheduler's own sequence (and diffusers'
``get_scheduler`` for the per-step convention), the optimiser is what timm's ``create_optimizer_v2`` returns,
``--max-grad-norm`` clips as ``torch.nn.utils.clip_grad_norm_`` does, ``--max-steps`` stops mid-epoch, a
resume continues the same lr sequence, and ``--help`` of every job loads neither torch, timm nor diffusers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from train_scripts import load_train_script

from visadapt.engine import CheckpointError, TrainConfig, build_optimizer, fit, make_accelerator
from visadapt.train import flags

ROOT = Path(__file__).resolve().parents[1]

# every job that trains through visadapt.engine.fit, with the arguments its parser needs besides the shared flags
FIT_JOBS = {"vtab": [], "vpr": [], "rank": [], "dense": [], "resadapter": [], "selma": [], "ppap": []}


class _Pairs(torch.utils.data.Dataset):
    """``n`` inputs ``(2,)`` with labels in {0, 1}: a linear model trains on them in milliseconds."""

    def __init__(self, n: int = 12):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i), 1.0 - i / self.n]), i % 2


class _Recorder:
    """What every optimiser step sees, from torch's global step pre-hook: the lr and the gradients it applies."""

    def __init__(self):
        self.lrs: list[float] = []
        self.grads: list[list[torch.Tensor]] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    def __enter__(self):
        def hook(optimizer, args, kwargs):
            self.lrs.append(optimizer.param_groups[0]["lr"])
            self.grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])
            self.optimizers.append(optimizer)
        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _fit(config: TrainConfig, output_dir=None, resume=False, n: int = 12, model: nn.Module | None = None, **kw):
    torch.manual_seed(0)
    return fit(model or nn.Linear(2, 2), _Pairs(n), None, config, accelerator=make_accelerator(None, log_with=None),
               output_dir=output_dir, resume=resume, evaluator=lambda m, a: {"accuracy": 0.0}, **kw)


def _timm_sequence(schedule_cls, steps_per_epoch: int, total: int, **kwargs) -> list[float]:
    """timm's own protocol (its train.py): lr at each update of a fresh optimiser, ``step_update(num_updates)``
    after each optimiser step and ``step(epoch + 1)`` after each epoch."""
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = schedule_cls(optimizer, **kwargs)
    lrs = []
    for update in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step_update(num_updates=update + 1)
        if (update + 1) % steps_per_epoch == 0:
            schedule.step((update + 1) // steps_per_epoch)
    return lrs


# ------------------------------------------------------------------------------------- the lr schedule

@pytest.mark.parametrize("schedule, warmup_lr, min_lr, max_steps", [
    ("cosine", 0.0, 0.0, 0), ("cosine", 1e-3, 1e-2, 0), ("linear", 1e-3, 1e-2, 0), ("constant", 1e-3, 0.0, 0),
    ("cosine", 0.0, 0.0, 7)])
def test_fit_applies_timms_per_step_schedule(schedule, warmup_lr, min_lr, max_steps):
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler

    config = TrainConfig(epochs=4, batch_size=4, warmup_epochs=1, lr=0.1, progress=False, lr_schedule=schedule,
                         warmup_lr=warmup_lr, min_lr=min_lr, max_steps=max_steps)
    with _Recorder() as seen:
        _fit(config)
    total = max_steps or 12  # 3 steps per epoch
    shared = {"warmup_t": 3, "warmup_lr_init": warmup_lr, "warmup_prefix": True, "t_in_epochs": False}
    expected = {"cosine": lambda: _timm_sequence(CosineLRScheduler, 3, total, t_initial=total - 3, lr_min=min_lr,
                                                 **shared),
                "linear": lambda: _timm_sequence(PolyLRScheduler, 3, total, t_initial=total - 3, power=1.0,
                                                 lr_min=min_lr, **shared),
                "constant": lambda: _timm_sequence(StepLRScheduler, 3, total, decay_t=1, decay_rate=1.0, **shared)}
    assert seen.lrs == expected[schedule]()  # exactly timm's floats, step by step


@pytest.mark.parametrize("schedule, diffusers_name", [("cosine", "cosine"), ("linear", "linear"),
                                                       ("constant", "constant_with_warmup")])
def test_per_step_schedule_is_diffusers_get_scheduler(schedule, diffusers_name):
    """--sched-on steps (the default) is the convention of diffusers' training examples: warm-up s/W, then the
    decay over the remaining steps."""
    from diffusers.optimization import get_scheduler

    config = TrainConfig(epochs=4, batch_size=4, warmup_epochs=1, lr=0.1, progress=False, lr_schedule=schedule)
    with _Recorder() as seen:
        _fit(config)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.1)
    owner = get_scheduler(diffusers_name, optimizer, num_warmup_steps=3, num_training_steps=12)
    expected = []
    for _ in range(12):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        owner.step()
    assert seen.lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_noah_vtab_schedule_is_timms_per_epoch_cosine():
    """The flags of visadapt.train.flags' docstring give timm's train.py schedule: ``create_scheduler_v2`` with
    sched cosine, warm-up from 1e-6, floor 1e-5, stepped once per epoch (NOAH's VTAB-1k recipe, at 10 epochs)."""
    from timm.scheduler import create_scheduler_v2

    parser = argparse.ArgumentParser()
    flags.add_run_flags(parser)
    args = flags.finish_run_args(parser, parser.parse_args(
        ["--sched-on", "epochs", "--warmup-lr", "1e-6", "--min-lr", "1e-5"]))
    config = TrainConfig(epochs=10, batch_size=4, warmup_epochs=2, lr=1e-3, progress=False, **flags.run_options(args))
    with _Recorder() as seen:
        _fit(config)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    owner, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=10, warmup_epochs=2, warmup_lr=1e-6,
                                        min_lr=1e-5)
    expected = []
    for epoch in range(epochs):
        expected += [optimizer.param_groups[0]["lr"]] * 3  # 3 optimiser steps per epoch at the epoch's lr
        owner.step(epoch + 1)
    assert epochs == 10 and seen.lrs == expected
    assert seen.lrs[0] == 1e-6 and seen.lrs[-1] > 1e-5  # warm-up start; the floor is reached after the last epoch


# ---------------------------------------------------------------------------------------- the optimiser

def _groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: ([id(p) for p in v] if k == "params" else v) for k, v in group.items()}
            for group in optimizer.param_groups]


@pytest.mark.parametrize("name, momentum", [("adamw", 0.9), ("adam", 0.9), ("sgd", 0.8), ("momentum", 0.0),
                                            ("lamb", 0.9)])
def test_build_optimizer_is_timms_create_optimizer_v2(name, momentum):
    from timm.optim import create_optimizer_v2

    params = list(nn.Linear(3, 2).parameters())
    config = TrainConfig(optimizer=name, momentum=momentum, lr=0.05, weight_decay=0.01)
    ours = build_optimizer(params, config)
    owner = create_optimizer_v2(params, opt=name, lr=0.05, weight_decay=0.01, momentum=momentum)
    assert type(ours) is type(owner) and _groups(ours) == _groups(owner)


def test_official_ranking_groups_pass_through_create_optimizer_v2():
    from timm.optim import create_optimizer_v2

    from visadapt.plugins.ranking_clip import official_param_groups

    linear = nn.Linear(3, 2)
    groups = [{"params": [linear.weight], "weight_decay": 0.2, "betas": (0.9, 0.98), "eps": 1e-6, "amsgrad": True},
              {"params": [linear.bias], "weight_decay": 0.0, "betas": (0.9, 0.98), "eps": 1e-6, "amsgrad": True}]
    ours = build_optimizer(groups, TrainConfig(lr=1e-3, weight_decay=0.2))
    owner = create_optimizer_v2(groups, opt="adamw", lr=1e-3, weight_decay=0.2)
    assert type(ours) is torch.optim.AdamW and _groups(ours) == _groups(owner)
    assert [g["amsgrad"] for g in ours.param_groups] == [True, True]
    assert callable(official_param_groups)  # the groups rank.py hands to fit(param_groups=...) are of this form


def test_fit_trains_with_the_optimizer_timm_builds():
    from timm.optim import Lamb

    config = TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, lr=0.1, progress=False, optimizer="lamb")
    with _Recorder() as seen:
        _fit(config)
    assert {type(o) for o in seen.optimizers} == {Lamb} and len(seen.lrs) == 3


# --------------------------------------------------------------------------- clipping and --max-steps

def test_max_grad_norm_clips_as_torch_clip_grad_norm():
    model = nn.Linear(2, 2)
    raw: dict[str, torch.Tensor] = {}  # the gradients before clipping
    model.weight.register_hook(lambda g: raw.__setitem__("weight", g.clone()))
    model.bias.register_hook(lambda g: raw.__setitem__("bias", g.clone()))
    config = TrainConfig(epochs=1, batch_size=12, warmup_epochs=0, lr=0.1, progress=False, max_grad_norm=0.05)
    with _Recorder() as seen:
        _fit(config, model=model)
    [applied] = seen.grads
    expected = [raw["weight"], raw["bias"]]  # the optimiser's order: model.parameters()
    reference = [nn.Parameter(torch.zeros_like(g)) for g in expected]
    for param, grad in zip(reference, expected):
        param.grad = grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(reference, 0.05)
    assert norm > 0.05  # clipping had something to do
    for got, want in zip(applied, [p.grad for p in reference]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in applied])) == pytest.approx(0.05, rel=1e-5)


def test_max_steps_stops_mid_epoch_and_ends_the_schedule_there(tmp_path):
    config = TrainConfig(epochs=5, batch_size=4, warmup_epochs=0, lr=0.1, progress=False, max_steps=4)
    with _Recorder() as seen:
        result = _fit(config, output_dir=tmp_path)
    assert len(seen.lrs) == 4 and [e["epoch"] for e in result.history] == [1, 2]  # 3 + 1 of 3 steps
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004"]
    assert result.history[-1]["lr"] == 0.0  # the cosine ends at max_steps


# ------------------------------------------------------------------------------------------ resume

def test_resume_continues_the_lr_sequence_and_resume_path_picks_a_checkpoint(tmp_path):
    config = TrainConfig(epochs=4, batch_size=4, warmup_epochs=1, lr=0.1, progress=False, checkpoint_every_steps=1,
                         keep_checkpoints=20)
    with _Recorder() as whole:
        _fit(config, output_dir=tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_at_step(limit):
        def hook(optimizer, args, kwargs):
            hook.count += 1
            if hook.count > limit:
                raise Killed
        hook.count = 0
        return register_optimizer_step_pre_hook(hook)

    handle = kill_at_step(7)
    with pytest.raises(Killed):
        _fit(config, output_dir=tmp_path / "run")
    handle.remove()
    checkpoints = tmp_path / "run" / "checkpoints"
    # the scheduler state Accelerate saved reads back with weights_only (no pickled objects)
    assert torch.load(checkpoints / "step_00000007" / "scheduler.bin", weights_only=True)["last_epoch"] == 7
    with _Recorder() as resumed:
        _fit(config, output_dir=tmp_path / "run", resume="latest")
    assert resumed.lrs == whole.lrs[7:]
    with _Recorder() as again:
        _fit(config, output_dir=tmp_path / "run", resume=checkpoints / "step_00000002")
    assert again.lrs == whole.lrs[2:]


def test_a_checkpoint_of_the_earlier_lambdalr_scheduler_still_resumes(tmp_path):
    config = TrainConfig(epochs=2, batch_size=4, warmup_epochs=0, lr=0.1, progress=False)
    with _Recorder() as whole:
        _fit(config, output_dir=tmp_path / "whole")
    _fit(TrainConfig(**{**vars(config), "epochs": 1}), output_dir=tmp_path / "run")
    [checkpoint] = (tmp_path / "run" / "checkpoints").iterdir()
    # what LambdaLR.state_dict() wrote before visadapt used timm's schedulers
    old = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.1),
                                            lambda s: 1.0)
    for _ in range(3):
        old.step()
    torch.save(old.state_dict(), checkpoint / "scheduler.bin")
    with _Recorder() as resumed:
        _fit(config, output_dir=tmp_path / "run", resume=True)
    assert resumed.lrs == whole.lrs[3:]


def test_resume_path_that_is_broken_is_refused_naming_it(tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, lr=0.1, progress=False)
    _fit(config, output_dir=tmp_path)
    [checkpoint] = (tmp_path / "checkpoints").iterdir()
    (checkpoint / "optimizer.bin").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=rf"--resume {checkpoint} cannot be resumed: optimizer.bin is "
                                              r"unreadable.*--resume alone"):
        _fit(config, output_dir=tmp_path, resume=checkpoint)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="job")
    parser.add_argument("--output-dir", default=None)
    flags.add_run_flags(parser)
    return parser


def _parse_error(argv, capsys) -> str:
    parser = _parser()
    with pytest.raises(SystemExit) as exit_info:
        flags.finish_run_args(parser, parser.parse_args(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_resume_values_and_their_errors(tmp_path, capsys):
    run = tmp_path / "run"
    step = run / "task" / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (step / "progress.json").write_text("{}")
    parser = _parser()
    assert parser.parse_args([]).resume is None
    assert parser.parse_args(["--resume"]).resume == "latest"
    assert parser.parse_args(["--resume", "latest"]).resume == "latest"
    args = flags.finish_run_args(parser, parser.parse_args(["--resume", str(step), "--output-dir", str(run)]))
    assert flags.resume_choice(args.resume) == step and flags.resume_choice("latest") is True
    assert "no such folder" in _parse_error(["--resume", str(tmp_path / "nope")], capsys)
    assert "not a checkpoint folder" in _parse_error(["--resume", str(run / "task")], capsys)
    (step / "progress.json").unlink()
    assert "holds no progress.json" in _parse_error(["--resume", str(step)], capsys)
    (step / "progress.json").write_text("{}")
    message = _parse_error(["--resume", str(step), "--output-dir", str(tmp_path / "other")], capsys)
    assert message.startswith(f"job: error: --resume {step}: lies outside --output-dir") and "step_N" in message
    assert "contradict" in _parse_error(["--resume", "--overwrite"], capsys)


@pytest.mark.parametrize("argv, expected", [
    (["--momentum", "0.5"], "--momentum 0.5 is for sgd / momentum"),
    (["--optimizer", "sgd", "--momentum", "0"], "must be > 0 for sgd"),
    (["--optimizer", "plain"], "--param-groups plain"),
    (["--optimizer", "rmsprop"], "is not one of adamw, adam, sgd, momentum, lamb"),
    (["--min-lr", "-1"], "--min-lr -1.0: a learning rate must be >= 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0: must be > 0"),
    (["--max-steps", "-2"], "--max-steps -2: must be >= 0"),
    (["--lr-schedule", "step"], "invalid choice: 'step'"),
])
def test_optimisation_flag_errors(argv, expected, capsys):
    assert expected in _parse_error(argv, capsys)


def test_run_options_fill_defaults_and_a_recipe_value_loses_to_the_command_line():
    parser = _parser()
    args = flags.finish_run_args(parser, parser.parse_args(["--optimizer", "SGD", "--max-steps", "5"]),
                                 {"max_steps": 100, "lr_schedule": "constant", "max_grad_norm": 1.0})
    options = flags.run_options(args)
    assert {k: options[k] for k in ("optimizer", "momentum", "lr_schedule", "warmup_lr", "min_lr", "sched_on",
                                     "max_grad_norm", "max_steps")} == {
        "optimizer": "sgd", "momentum": 0.9, "lr_schedule": "constant", "warmup_lr": 0.0, "min_lr": 0.0,
        "sched_on": "steps", "max_grad_norm": 1.0, "max_steps": 5}
    TrainConfig(**options)  # every value is a valid TrainConfig field


def test_flag_constants_equal_their_owners():
    from visadapt import attention, engine

    assert flags.ATTENTION_BACKENDS == attention.BACKENDS
    assert engine.PRECISIONS is flags.PRECISIONS and engine.add_run_flags is flags.add_run_flags


# ---------------------------------------------------------------------------------------- every job

SHARED = ["--optimizer", "momentum", "--momentum", "0.5", "--lr-schedule", "linear", "--warmup-lr", "1e-5",
          "--min-lr", "1e-6", "--max-grad-norm", "2.5", "--max-steps", "3", "--sched-on", "steps"]


@pytest.mark.parametrize("job", sorted(FIT_JOBS))
def test_every_fit_job_takes_the_shared_flags(job):
    module = load_train_script(job)
    if job == "rank":
        argv = [*SHARED, "--param-groups", "plain"]
    else:
        argv = list(SHARED)
    args = module.parse_args(argv + FIT_JOBS[job])
    options = flags.run_options(args)
    assert {k: options[k] for k in ("optimizer", "momentum", "lr_schedule", "warmup_lr", "min_lr",
                                     "max_grad_norm", "max_steps")} == {
        "optimizer": "momentum", "momentum": 0.5, "lr_schedule": "linear", "warmup_lr": 1e-5, "min_lr": 1e-6,
        "max_grad_norm": 2.5, "max_steps": 3}


def test_selma_keeps_its_recipe_clipping_and_step_count():
    args = load_train_script("selma").parse_args(["--pipeline", "some/sd-pipeline"])
    options = flags.run_options(args)
    assert args.recipe == "selma" and options["max_steps"] == 5000 and options["max_grad_norm"] == 1.0
    assert options["lr_schedule"] == "constant"


def test_vtab_max_steps_run_stops_mid_epoch(tmp_path):
    from visadapt.data.procedural import generate_mini_vtab

    data = generate_mini_vtab(tmp_path / "data", seed=0, split_sizes={"train800": 16, "val200": 8, "test": 8})
    out = tmp_path / "out"
    argv = ["--data-root", str(data), "--output-dir", str(out), "--no-progress", "--pretrained", "none",
            "--batch-size", "8", "--task", "textures", "--epochs", "3", "--max-steps", "4", "--max-grad-norm", "1",
            "--optimizer", "sgd"]
    assert load_train_script("vtab").main(argv) == 0
    metrics = json.loads((out / "textures" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["history"]] == [1, 2]  # 24 images in batches of 8: 3 + 1 steps
    assert sorted(p.name for p in (out / "textures" / "checkpoints").iterdir()) == ["step_00000004"]


# -------------------------------------------------------------------------------------------- --help

@pytest.mark.parametrize("job", sorted(FIT_JOBS))
def test_help_and_a_parse_error_load_neither_torch_nor_timm_nor_diffusers(job):
    """In a fresh process: ``main(["--help"])`` and a mistyped shared flag answer before anything heavy is imported."""
    code = (f"import sys\nfrom visadapt.train import {job} as job\n"
            f"for argv, status in ((['--help'], 0), (['--optimizer', 'rmsprop'], 2)):\n"
            f"    try:\n        job.main(argv)\n    except SystemExit as e:\n        assert e.code == status, e.code\n"
            f"print(sorted(m for m in ('torch', 'timm', 'diffusers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--max-grad-norm" in done.stdout and "'rmsprop' is not one of" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-300:]
