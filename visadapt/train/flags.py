"""The training flags every job of :mod:`visadapt.train` shares, defined without importing torch.

A job builds its parser with :func:`add_run_flags`, fills what the command line left out from its recipe and
checks the result with :func:`finish_run_args`, and hands the values to :class:`visadapt.engine.TrainConfig`
with :func:`run_options`. This module imports only the standard library, so ``--help`` and a parse error answer
before torch, timm or diffusers are loaded (a job imports those in ``main`` after parsing). ``visadapt.engine``
re-exports the three functions.

The optimiser comes from timm's ``create_optimizer_v2`` (``--optimizer``, ``--momentum``), the learning-rate
schedule from ``timm.scheduler`` (``--lr-schedule``, ``--warmup-lr``, ``--min-lr``, ``--sched-on``; see
:func:`visadapt.engine.build_lr_scheduler`), and ``--max-grad-norm``, ``--max-steps`` and ``--resume
[latest|PATH]`` act in :func:`visadapt.engine.fit`.

timm's official VTAB-1k schedule (NOAH, FacT, the 1-bit adapters: ``CosineLRScheduler(optimizer,
t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6)`` stepped once per epoch) is::

    --epochs 100 --warmup-epochs 10 --sched-on epochs --warmup-lr 1e-6 --min-lr 1e-5

(``--lr-schedule cosine`` and AdamW are the defaults; tested in ``tests/test_flags.py``).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from visadapt.progress import apply_no_progress_flag, is_main_process
from visadapt.tracking import add_tracking_flags

#: ``--precision`` choices (``TrainConfig.precision``); ``fp32`` is Accelerate's ``"no"``
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
#: ``--attention`` choices: :data:`visadapt.attention.BACKENDS` (copied: that module imports torch; a test keeps
#: the two equal)
ATTENTION_BACKENDS = ("sdpa", "eager", "xformers")
#: ``--optimizer`` choices, each timm's name for it (``timm.optim.create_optimizer_v2(params, opt=NAME)``):
#: ``sgd`` is timm's SGD with Nesterov momentum, ``momentum`` SGD with classical (heavy-ball) momentum
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "lamb")
#: optimisers that take ``--momentum`` (timm's ``has_momentum``)
MOMENTUM_OPTIMIZERS = ("sgd", "momentum")
#: ``--lr-schedule`` choices: what follows the linear warm-up (timm's ``cosine``, ``constant`` and ``poly`` with
#: power 1 for ``linear``)
LR_SCHEDULES = ("cosine", "constant", "linear")
#: ``--sched-on`` choices: the unit the schedule is stepped in
SCHED_ON = ("steps", "epochs")
#: what ``--resume`` with no value means
RESUME_LATEST = "latest"
_STEP_FOLDER = re.compile(r"step_\d+")
_CHECKPOINTS = "checkpoints"  # visadapt.engine.CHECKPOINTS_DIR
_PROGRESS = "progress.json"   # the file every complete checkpoint holds (visadapt.engine)
# Rank's --optimizer before the shared flag existed; named in the error so old commands get the fix.
_FORMER_RANK_OPTIMIZERS = {"official": "--param-groups official", "plain": "--param-groups plain"}


def _optimizer_name(text: str) -> str:
    """``--optimizer`` value: one of :data:`OPTIMIZERS` (any case)."""
    name = text.strip().lower()
    if name in _FORMER_RANK_OPTIMIZERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an optimiser: train/rank.py's former --optimizer {name} is now "
            f"{_FORMER_RANK_OPTIMIZERS[name]} (--optimizer picks {', '.join(OPTIMIZERS)})")
    if name not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(OPTIMIZERS)}")
    return name


def _resume_value(text: str) -> str:
    """``--resume`` value: ``latest`` or a checkpoint folder path (checked in :func:`finish_run_args`)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give 'latest' or the path of a checkpoint folder (…/checkpoints/step_N)")
    return text


class SetOverride(argparse.Action):
    """``--set KEY=VALUE`` (repeatable): appends to the list like ``action="append"``, but refuses an item without
    ``=`` while parsing, so ``--set rank 8`` says how to write it instead of argparse's later "unrecognized
    arguments: 8"."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        key, sep, _ = str(value).partition("=")
        if not sep or not key.strip():
            parser.error(f"{option_string} {value!r}: expected KEY=VALUE with no space around '=', "
                         f"e.g. {option_string} {key.strip() or 'rank'}=8")
        items = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, [*items, value])


def add_run_flags(parser: argparse.ArgumentParser, *, resume_help: str = "continue from the newest checkpoint",
                  overwrite_help: str = "discard an earlier run in --output-dir", progress: bool = True,
                  init_adapter: bool = False) -> None:
    """Add the flags every ``train/`` job shares to ``parser``.

    Run control: ``--resume [latest|PATH]``, ``--overwrite``, ``--allow-rng-reset``, (with ``progress``)
    ``--no-progress``, (with ``init_adapter``, for jobs that call :func:`visadapt.engine.init_adapter_from_file`)
    ``--init-adapter FILE``. Optimisation: ``--optimizer``, ``--momentum``, ``--lr-schedule``, ``--warmup-lr``,
    ``--min-lr``, ``--sched-on``, ``--max-grad-norm``, ``--max-steps``. Speed: ``--precision``, ``--compile``,
    ``--attention``. Tracking: ``--report-to``, ``--logging-dir``, ``--log-every`` (:mod:`visadapt.tracking`; pass
    them on with ``make_accelerator(..., **tracking_options(args))``). The optimisation flags default to ``None`` ("the recipe's, else the default"), so that
    :func:`finish_run_args` can fill them from a job's recipe; :func:`run_options` turns them into
    :class:`~visadapt.engine.TrainConfig` fields.
    """
    parser.add_argument("--resume", nargs="?", const=RESUME_LATEST, default=None, type=_resume_value,
                        metavar="latest|PATH",
                        help=f"{resume_help}. Alone or with 'latest': the newest complete checkpoint; with PATH: "
                             f"that checkpoint folder (<output-dir>/.../checkpoints/step_N), for the task or stage "
                             f"it belongs to")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--allow-rng-reset", action="store_true",
                        help="with --resume: continue from a checkpoint that lacks its random number state "
                             "(random_states_<rank>.pkl), reseeded from seed and step. Dropout masks and stochastic "
                             "adapter choices then differ from the interrupted run's; without this flag such a "
                             "resume is refused")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if init_adapter:
        parser.add_argument("--init-adapter", default=None, metavar="FILE",
                            help="start from the trained adapter in FILE (a visadapt .safetensors, e.g. the "
                                 "adapter.safetensors of an earlier run) instead of a fresh one; it must hold this "
                                 "run's plugin with this run's config, for this backbone (checked before training)")
    opt = parser.add_argument_group("optimisation (shared by every train/ job)")
    opt.add_argument("--optimizer", default=None, type=_optimizer_name, metavar="{" + ",".join(OPTIMIZERS) + "}",
                     help="timm.optim.create_optimizer_v2's optimiser: adamw, adam, sgd (Nesterov momentum), "
                          "momentum (classical momentum), lamb. Default: the recipe's, else adamw")
    opt.add_argument("--momentum", type=float, default=None,
                     help="momentum of sgd / momentum (default 0.9, timm's); refused with other optimisers")
    opt.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                     help="learning rate after the linear warm-up, from timm.scheduler: cosine (down to --min-lr at "
                          "the last step), constant, or linear (down to --min-lr). Default: the recipe's, else cosine")
    opt.add_argument("--warmup-lr", type=float, default=None,
                     help="learning rate the linear warm-up starts from (timm's warmup_lr_init; default 0)")
    opt.add_argument("--min-lr", type=float, default=None,
                     help="learning rate cosine and linear end at (timm's lr_min; default 0)")
    opt.add_argument("--sched-on", default=None, choices=SCHED_ON,
                     help="steps: a new learning rate every optimiser step, the decay spanning the steps after the "
                          "warm-up; epochs: one per epoch, as timm's train.py without --sched-on-updates (the "
                          "cosine spans all epochs, the warm-up overriding its start). Default: steps")
    opt.add_argument("--max-grad-norm", type=float, default=None,
                     help="clip the global gradient norm of the trained parameters to this value before each "
                          "optimiser step (default: the recipe's, else no clipping)")
    opt.add_argument("--max-steps", type=int, default=None,
                     help="stop after this many optimiser steps, mid-epoch too; the schedule ends there "
                          "(default: the recipe's, else 0 = every epoch)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="autocast precision (adapter weights and optimiser state stay fp32). auto: the "
                            "--mixed_precision of accelerate launch when it set one, else bf16 on a CUDA GPU that "
                            "has it, else fp32")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the adapted model once (first steps are slower while it compiles)")
    speed.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS,
                       help="timm attention kernel: sdpa (PyTorch fused attention), eager (unfused, as the "
                            "reference PETL code runs it), xformers (where its kernels run here, else sdpa with "
                            "a notice)")
    add_tracking_flags(parser)  # --report-to, --logging-dir, --log-every (visadapt.tracking)


#: TrainConfig field -> (flag, value when neither the command line nor the recipe gives one)
_OPTIMISATION_DEFAULTS: dict[str, tuple[str, Any]] = {
    "optimizer": ("--optimizer", "adamw"), "momentum": ("--momentum", 0.9), "lr_schedule": ("--lr-schedule", "cosine"),
    "warmup_lr": ("--warmup-lr", 0.0), "min_lr": ("--min-lr", 0.0), "sched_on": ("--sched-on", "steps"),
    "max_grad_norm": ("--max-grad-norm", None), "max_steps": ("--max-steps", 0),
}


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~visadapt.engine.TrainConfig` fields the flags of :func:`add_run_flags` set:
    ``TrainConfig(..., **run_options(args))``. A flag left at ``None`` (not given, no recipe value) takes the
    TrainConfig default. The accelerator takes ``precision=args.precision`` too."""
    options = {"precision": args.precision, "compile": args.compile, "attention": args.attention,
               "allow_rng_reset": args.allow_rng_reset, "log_every": args.log_every}
    for field, (_, default) in _OPTIMISATION_DEFAULTS.items():
        value = getattr(args, field, None)
        options[field] = default if value is None else value
    return options


def resume_choice(resume: str | None) -> bool | Path:
    """``--resume`` as :func:`visadapt.engine.fit` takes it: ``False`` (not given), ``True`` (latest) or the
    checkpoint folder ``Path``."""
    if resume is None or resume is False:
        return False
    if resume is True or resume == RESUME_LATEST:
        return True
    return Path(resume)


def resume_path_problem(path: Path, output_dir: str | None = None) -> str | None:
    """Why ``--resume PATH`` cannot name a checkpoint of this run (a sentence naming the path and the fix), or
    ``None``. Checks the form only (the folder exists, is ``…/checkpoints/step_N`` holding ``progress.json``, and
    lies in ``--output-dir`` when one was given); :func:`visadapt.engine.fit` reads every file before loading."""
    fix = "pass a step_N folder of this run's checkpoints, or --resume alone for the newest"
    if not path.exists():
        return f"--resume {path}: no such folder; {fix}"
    if not path.is_dir():
        return f"--resume {path}: a file, not a checkpoint folder; {fix}"
    if not _STEP_FOLDER.fullmatch(path.name) or path.parent.name != _CHECKPOINTS:
        return (f"--resume {path}: not a checkpoint folder (they are named <output-dir>/.../{_CHECKPOINTS}/step_N); "
                f"{fix}")
    if not (path / _PROGRESS).is_file():
        return f"--resume {path}: holds no {_PROGRESS}, so it is not a complete checkpoint; {fix}"
    if output_dir is not None:
        root = Path(output_dir).resolve()
        if root not in path.resolve().parents:
            return (f"--resume {path}: lies outside --output-dir {output_dir}, so it is not a checkpoint of this "
                    f"run; {fix} (or give the --output-dir it belongs to)")
    return None


def finish_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    recipe: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """Fill every value left at ``None`` from ``recipe`` (a flag given on the command line wins), then check the
    shared flags: ``--resume`` with ``--overwrite``, ``--resume PATH`` (:func:`resume_path_problem`), the
    optimisation values; ``--no-progress`` switches every progress bar off. A mistake is ``parser.error`` (one ``error:`` line, exit code 2). Returns ``args``."""
    apply_no_progress_flag(args)  # --no-progress silences every progress bar of the run (visadapt.progress)
    for key, value in (recipe or {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other; choose one")
    if args.resume not in (None, False, True, RESUME_LATEST):
        problem = resume_path_problem(Path(args.resume), getattr(args, "output_dir", None))
        if problem:
            parser.error(problem)
    optimizer = getattr(args, "optimizer", None) or "adamw"
    if getattr(args, "momentum", None) is not None:
        if optimizer not in MOMENTUM_OPTIMIZERS:
            parser.error(f"--momentum {args.momentum} is for {' / '.join(MOMENTUM_OPTIMIZERS)}; --optimizer "
                         f"{optimizer} has none (leave --momentum out, or pick --optimizer momentum)")
        if args.momentum < 0 or (optimizer == "sgd" and args.momentum == 0):
            parser.error(f"--momentum {args.momentum}: must be > 0 for sgd (Nesterov momentum needs one; "
                         f"--optimizer momentum --momentum 0 is plain SGD) and >= 0 otherwise")
    for field in ("warmup_lr", "min_lr"):
        value = getattr(args, field, None)
        if value is not None and value < 0:
            parser.error(f"--{field.replace('_', '-')} {value}: a learning rate must be >= 0")
    norm = getattr(args, "max_grad_norm", None)
    if norm is not None and not norm > 0:
        parser.error(f"--max-grad-norm {norm}: must be > 0 (leave it out for no clipping)")
    steps = getattr(args, "max_steps", None)
    if steps is not None and steps < 0:
        parser.error(f"--max-steps {steps}: must be >= 0 (0: every epoch)")
    return args


def run_script(main: Callable[[], int]) -> int:
    """The exit code of a ``train/`` script's ``main``: its own, or 2 with one ``error:`` line (the message names
    the checkpoint folder or file and the fix) when resuming is impossible or ``--init-adapter`` cannot start the
    run (:class:`visadapt.engine.CheckpointError`, :class:`visadapt.engine.InitAdapterError`), instead of a
    traceback.

    Under a multi-process launch every rank raises the same ``CheckpointError`` at the same point
    (:func:`visadapt.engine.fit` broadcasts the main process's decision), so only the main process prints the line
    and every rank returns 2. The process group is then torn down, as ``Accelerator.end_training`` does after a
    finished run: a rank that exits with gloo's threads still running is aborted by the C++ runtime ("terminate
    called without an active exception", SIGABRT) instead of exiting with its code.

    Defined here, not in the engine, so that running a job imports no torch before its ``main`` parses the command
    line: only :mod:`visadapt.engine` raises those errors or joins a process group, so it is consulted only once a
    job has imported it.
    """
    try:
        code = main()
    except Exception as err:
        engine = sys.modules.get("visadapt.engine")
        if engine is None or not isinstance(err, (engine.CheckpointError, engine.InitAdapterError)):
            raise
        if is_main_process():  # the launch's main process (Accelerate's state, else RANK)
            print(f"error: {err}", file=sys.stderr)
        code = 2
    engine = sys.modules.get("visadapt.engine")
    if engine is not None:
        engine._end_process_group()
    return code
