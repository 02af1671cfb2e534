"""Multi-task dense prediction on a frozen Swin: every task trained jointly over one shared backbone.

    accelerate launch train/dense.py                          # embedded default: procedural scenes, Polyhistor-Lite
    accelerate launch train/dense.py --method per-task        # one bottleneck adapter per task (the baseline)
    accelerate launch train/dense.py --method full --single-task   # single-task fine-tuning: the Δm reference
    accelerate launch train/dense.py --benchmark pascal --data-root /data/PASCAL_MT \\
        --model swin_tiny_patch4_window7_224.ms_in1k --input-size 448 --method polyhistor
    visadapt-eval --benchmark dense --adapters runs/dense-lite runs/dense-per-task --reference runs/dense-full

Methods (``--method``; plugin fields with ``--set key=value``):

* ``polyhistor`` / ``lite``: Polyhistor's decomposed hypernetworks / Polyhistor-Lite (``plugins/polyhistor.py``);
  the backbone runs once per task with that task's generated adapters.
* ``per-task``: one plain bottleneck adapter per task (``adapter`` plugin, Pfeiffer placement: serial after the
  MLP, as Polyhistor's adapters; bottleneck = width // reduction_factor), switched with
  ``visadapt.set_active_adapters``: the paper's per-task adapter baseline.
* ``shared``: one bottleneck adapter shared by all tasks (one backbone pass feeds every head).
* ``decoder``: the frozen backbone alone (only the heads train).
* ``full``: the whole backbone trains; with ``--single-task`` (one model per task) this is the single-task
  reference of Δm, as the paper's.

Writes ``<output-dir>/metrics.json`` (per-task metrics, trainable parameters split into adapter / norms /
decoders, the recipe, wall time, versions), the adapter file(s) (``adapter.safetensors``; ``per-task``: one per
task, ``adapter-<task>.safetensors``) and ``heads.safetensors`` (stage norms and decoders). With
``--single-task``, each task gets its own ``<output-dir>/<task>/`` and the top ``metrics.json`` gathers them.

``--init-adapter`` starts the adapter(s) from trained files instead of fresh ones (the stage norms and decoders
start fresh: they are in ``heads.safetensors``, not in an adapter file). Its form follows how many adapters the run
trains: ``lite``, ``polyhistor`` and ``shared`` train one for every task, so ``--init-adapter FILE``; ``per-task``
and ``--single-task`` train one per task, so ``--init-adapter TASK=FILE``, repeatable, one per task to start (the
tasks not named start fresh); ``decoder`` and ``full`` attach no adapter and refuse the flag. Every file's header
(plugin and config) is checked before the output folder is made; a file that fails to load is an ``error:`` line
and exit code 2, with the model left as it was.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import visadapt
from visadapt.names import DENSE_METHODS, DENSE_TASKS, EMBEDDED_SWIN
from visadapt.tracking import tracker_config, tracking_options
from visadapt.train.flags import SetOverride, add_run_flags, finish_run_args, run_options, run_script
from visadapt.train.preflight import check_data_root, refuse_existing_runs, report_error, task_output_dir

# Per benchmark; every value can be overridden by its flag. pascal: MTLoRA's schedule (AdamW 5e-4, wd 0.05,
# 300 epochs, 20 warm-up, batch 32, 448 px; Polyhistor's own is not public). scenes: sized for 2 CPU cores.
RECIPES = {
    "scenes": {"model": EMBEDDED_SWIN, "epochs": 12, "lr": 3e-3, "weight_decay": 0.05, "batch_size": 32,
               "warmup_epochs": 1, "eval_every": 4, "input_size": 64},
    "pascal": {"model": "swin_tiny_patch4_window7_224.ms_in1k", "epochs": 300, "lr": 5e-4, "weight_decay": 0.05,
               "batch_size": 32, "warmup_epochs": 20, "eval_every": 20, "input_size": 448},
}


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or "train/dense.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", default="scenes", choices=sorted(RECIPES),
                   help="scenes: the embedded procedural scenes (no download); pascal: PASCAL-Context multi-task "
                        "in the MTLoRA layout (--data-root)")
    p.add_argument("--data-root", default=None, help="pascal: the PASCAL_MT folder")
    p.add_argument("--tasks", nargs="+", default=list(DENSE_TASKS), choices=DENSE_TASKS)
    p.add_argument("--method", default="lite", choices=DENSE_METHODS)
    p.add_argument("--single-task", action="store_true",
                   help="train one model per task instead of one for all (the single-task reference)")
    p.add_argument("--set", dest="overrides", action=SetOverride, default=[], metavar="KEY=VALUE",
                   help="override one field of the method's plugin config (value parsed as YAML); repeatable")
    p.add_argument("--adapter-config", default=None, help="YAML file with the plugin's config fields")
    p.add_argument("--model", default=None, help="timm Swin name (default: the benchmark's)")
    p.add_argument("--pretrained", default="default",
                   help="backbone weights: 'default' (timm's / the embedded ones), 'none', a file or a hub id")
    p.add_argument("--input-size", type=int, default=None, help="image side in pixels (default: the benchmark's)")
    p.add_argument("--normalize", default="model", choices=["model", "imagenet", "none"],
                   help="input normalisation: the backbone's own statistics (a frozen backbone must see what it "
                        "was pretrained on), ImageNet's (MTLoRA's), or none; recorded in metrics.json")
    for flag, kind in (("epochs", int), ("lr", float), ("weight-decay", float), ("batch-size", int),
                       ("warmup-epochs", float), ("eval-every", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="default: the benchmark's recipe")
    p.add_argument("--train-samples", type=int, default=None, help="scenes: training scenes (default 2000)")
    p.add_argument("--val-samples", type=int, default=None, help="scenes: validation scenes (default 500)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0, help="scenes: seed of the generated world")
    p.add_argument("--output-dir", default=None, help="default: runs/dense-<benchmark>-<method>")
    add_run_flags(p)
    # not add_run_flags' --init-adapter FILE: a per-task run starts one adapter per task, so it takes TASK=FILE
    p.add_argument("--init-adapter", action="append", default=[], metavar="[TASK=]FILE",
                   help="start from a trained adapter file (e.g. adapter.safetensors of an earlier run) instead of a "
                        "fresh adapter; it must hold this run's plugin and config (checked before training). "
                        "lite/polyhistor/shared: one FILE. per-task or --single-task: TASK=FILE (e.g. "
                        "semseg=runs/x/adapter-semseg.safetensors), repeatable; tasks not named start fresh. Stage "
                        "norms and decoders always start fresh")
    args = p.parse_args(argv)
    return finish_run_args(p, args, RECIPES[args.benchmark])


def init_adapter_starts(args: argparse.Namespace) -> dict[str, str]:
    """The ``--init-adapter`` files by what they start: ``{task: file}`` when the run trains an adapter per task
    (``per-task``, or ``--single-task``: a model per task), else ``{"default": file}`` for the one adapter shared
    by every task. Raises ``ValueError`` naming the item and the fix for a form that does not fit the run."""
    if args.init_adapter and args.method in ("decoder", "full"):
        raise ValueError(f"--init-adapter: method {args.method!r} attaches no adapter, so there is none to start "
                         f"from a file; drop --init-adapter")
    per_task = args.method == "per-task" or args.single_task
    why = ("per-task trains one adapter per task" if args.method == "per-task"
           else "--single-task trains a model per task")
    starts: dict[str, str] = {}
    for item in args.init_adapter:
        task, sep, file = item.partition("=")
        named = bool(sep) and task in DENSE_TASKS and bool(file)
        if per_task:
            if not named:
                raise ValueError(f"--init-adapter {item}: {why}; name the task the file starts, e.g. "
                                 f"--init-adapter {args.tasks[0]}={item}")
            if task not in args.tasks:
                raise ValueError(f"--init-adapter {item}: this run does not train task {task!r} (--tasks "
                                 f"{' '.join(args.tasks)})")
            if task in starts:
                raise ValueError(f"--init-adapter names task {task!r} twice; give one file per task")
            starts[task] = file
        else:
            if named:
                raise ValueError(f"--init-adapter {item}: method {args.method!r} trains one adapter for every task; "
                                 f"pass the file alone: --init-adapter {file}")
            if starts:
                raise ValueError(f"--init-adapter is given twice ({starts['default']}, {item}); method "
                                 f"{args.method!r} trains one adapter: give one file")
            starts["default"] = item
    return starts


def group_init_adapters(args: argparse.Namespace, tasks: list[str], starts: dict[str, str]) -> dict[str, str]:
    """``{adapter name: file}`` for the model that trains ``tasks`` (:func:`init_adapter_starts`' files): a
    per-task adapter is named by its task; the one adapter of the other methods is ``default``, started by the
    group's task under ``--single-task``."""
    if args.method == "per-task":
        return {task: starts[task] for task in tasks if task in starts}
    key = tasks[0] if args.single_task else "default"
    return {"default": starts[key]} if key in starts else {}


def check_polyhistor_tasks(args: argparse.Namespace, file: str, tasks: list[str]) -> None:
    """Refuse a Polyhistor(-Lite) ``file`` trained on other tasks than ``tasks`` with the fix (``--tasks``, or
    under ``--single-task`` a file of that task alone): its config's ``tasks`` comes from ``--tasks``, not from
    ``--set`` (:func:`visadapt.dense.method_plugin_fields`), so the engine's ``--set`` fix would not apply."""
    from visadapt.engine import InitAdapterError
    from visadapt.io import AdapterFileError, read_adapter_metadata

    try:
        meta = read_adapter_metadata(file)
        holds = list(json.loads(meta["config"]).get("tasks") or []) if meta["plugin"] == "polyhistor" else None
    except (AdapterFileError, ValueError, KeyError):
        return  # check_init_adapter names what is wrong with the file
    if holds is None or holds == list(tasks):
        return
    fix = (f"start task {tasks[0]} from a file trained on it alone" if args.single_task
           else f"train with --tasks {' '.join(holds)}")
    raise InitAdapterError(f"--init-adapter {file}: its Polyhistor adapter was trained on tasks {holds}; this "
                           f"model trains {list(tasks)}: {fix}, or start without --init-adapter")


def plugin_fields(args: argparse.Namespace) -> dict:
    """The method's plugin fields: the benchmark's defaults the plugin has, then --adapter-config, then --set."""
    from visadapt.dense import benchmark_plugin_fields
    from visadapt.plugin import config_values

    given = config_values(args.adapter_config, args.overrides)
    return benchmark_plugin_fields(args.method, args.tasks, args.benchmark, given)


PASCAL_NEEDS_ROOT = ("--benchmark pascal needs --data-root, the PASCAL_MT folder (JPEGImages, ImageSets, semseg, "
                     "human_parts, normals_distill, sal_distill)")


def check_data(args: argparse.Namespace) -> None:
    """The data checks that need no model: none for the generated scenes; for ``pascal`` a readable
    ``--data-root`` whose split files list images that all have the files ``--tasks`` need (the datasets' own
    construction: directory listings, nothing decoded). ``ValueError`` (a ``DatasetError``) naming the fix."""
    if args.benchmark != "pascal":
        return
    from visadapt.data.dense import PascalContextMultiTask

    if args.data_root is None:
        raise ValueError(PASCAL_NEEDS_ROOT)
    check_data_root(args.data_root, "the PASCAL_MT layout (JPEGImages, ImageSets, semseg, ...)")
    for split in ("train", "val"):
        PascalContextMultiTask(args.data_root, split, size=args.input_size, tasks=args.tasks)


def build_datasets(args: argparse.Namespace, tasks: list[str], normalization):
    from visadapt.data.dense import PascalContextMultiTask, ProceduralDenseScenes

    if args.benchmark == "scenes":
        common = {"size": args.input_size, "seed": args.data_seed, "tasks": tasks, "normalization": normalization}
        return (ProceduralDenseScenes("train", num_samples=args.train_samples, **common),
                ProceduralDenseScenes("val", num_samples=args.val_samples, **common))
    if args.data_root is None:
        raise ValueError(PASCAL_NEEDS_ROOT)
    common = {"size": args.input_size, "tasks": tasks, "normalization": normalization}
    return (PascalContextMultiTask(args.data_root, "train", train=True, **common),
            PascalContextMultiTask(args.data_root, "val", train=False, **common))


def train_one(args: argparse.Namespace, tasks: list[str], out: Path, plugin_fields: dict) -> dict:
    """Train one multi-task model on ``tasks``; returns its metrics (also written to ``out/metrics.json``)."""
    import timm
    import torch

    from visadapt.backbones import create_backbone
    from visadapt.data import resolve_normalization
    from visadapt.dense import (
        MTLORA_LOSS_WEIGHTS,
        DenseTargets,
        MultiTaskDenseModel,
        attach_dense_method,
        dense_evaluator,
        dense_loss,
        save_dense_adapters,
        unflatten_results,
    )
    from visadapt.engine import TrainConfig, fit, init_adapter_from_file, make_accelerator, seed_everything
    from visadapt.io import write_json_atomic

    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                         warmup_epochs=args.warmup_epochs, seed=args.seed, eval_every=args.eval_every,
                         num_workers=args.num_workers, progress=not args.no_progress, **run_options(args))
    accelerator = make_accelerator(out, precision=args.precision, **tracking_options(args))
    seed_everything(args.seed)
    backbone = create_backbone(args.model, args.pretrained, num_classes=0, input_size=args.input_size)
    normalization = resolve_normalization(args.normalize, backbone)
    train_set, val_set = build_datasets(args, tasks, normalization)
    select_task, configs = attach_dense_method(backbone, args.method, tasks, plugin_fields)
    init_files = group_init_adapters(args, tasks, init_adapter_starts(args))
    for name, file in init_files.items():  # the files' tensors replace the fresh ones (base, widths, shapes checked)
        init_adapter_from_file(backbone, file, name)
    model = MultiTaskDenseModel(backbone, train_set.task_outputs, select_task)
    counts = model.trainable_parameter_counts()
    prefix = f"[{'+'.join(tasks)}] "
    accelerator.print(f"{prefix}{args.method} on {args.model}: {counts}; {len(train_set)} train / {len(val_set)} "
                      f"val images of {args.input_size} px")
    weights = {task: MTLORA_LOSS_WEIGHTS[task] for task in tasks}
    accelerator.init_trackers("dense", config=tracker_config({**vars(args), "tasks": tasks, **vars(config)}))
    evaluator = dense_evaluator(val_set, batch_size=args.eval_batch_size)
    result = fit(model, DenseTargets(train_set), None, config, accelerator=accelerator, output_dir=out,
                 resume=args.resume, log_prefix=prefix,
                 loss_fn=lambda predictions, targets: dense_loss(predictions, targets, weights)[0],
                 evaluator=evaluator, metric="score")
    metrics: dict = {}
    if accelerator.is_main_process:
        files = save_dense_adapters(model, args.method, out, run={"benchmark": args.benchmark, "tasks": tasks})
        final = result.history[-1]  # evaluated after the last epoch: the saved model's metrics
        metrics = {
            "benchmark": args.benchmark, "method": args.method, "tasks": tasks, "single_task": args.single_task,
            "model": args.model, "pretrained": args.pretrained, "input_size": args.input_size,
            "normalization": {"choice": args.normalize,
                              "mean": list(normalization[0]) if normalization else None,
                              "std": list(normalization[1]) if normalization else None},
            "plugin_configs": {name: c.to_dict() for name, c in configs.items()}, "init_adapter": init_files,
            # the final evaluation's full results; a run resumed after its last epoch has only the history's
            "results": getattr(evaluator, "last_results", None) or unflatten_results(final, tasks),
            "trainable_params": counts.total, "adapter_params": counts.adapter,
            "stage_norm_params": counts.stage_norms, "decoder_params": counts.decoders,
            "loss_weights": weights, "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
            "batch_size": args.batch_size, "warmup_epochs": args.warmup_epochs, "seed": args.seed,
            "data_seed": args.data_seed, "train_samples": len(train_set), "val_samples": len(val_set),
            "history": result.history,
            "wall_time_s": round(result.wall_time_s, 2), "files": files, "device": str(accelerator.device),
            "visadapt_version": visadapt.__version__, "torch_version": torch.__version__,
            "timm_version": timm.__version__, "python_version": platform.python_version(),
        }
        write_json_atomic(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # The cheap checks come first, each one error line and exit 2: flags, the method's config, --init-adapter
    # headers, the backbone name and a --pretrained path, the data folder, output folders holding a run. No
    # model is built and the hub is not contacted before they pass.
    args = parse_args(argv, prog)
    from accelerate import PartialState

    from visadapt.backbones import BackboneWeightsError, check_backbone_choice
    from visadapt.dense import attach_dense_method, method_plugin_fields
    from visadapt.engine import check_init_adapter
    from visadapt.io import write_json_atomic

    try:
        fields = plugin_fields(args)
        attach_dense_method(None, args.method, args.tasks, fields)  # a bad config fails before any work
        starts = init_adapter_starts(args)
        plugin, _ = method_plugin_fields(args.method, args.tasks, fields)
        for tasks in ([task] for task in args.tasks) if args.single_task else [list(args.tasks)]:
            _, configs = attach_dense_method(None, args.method, tasks, fields)
            for name, file in group_init_adapters(args, tasks, starts).items():
                check_polyhistor_tasks(args, file, tasks)
                check_init_adapter(file, plugin, configs[name])  # the header only, before any work
        check_backbone_choice(args.model, args.pretrained)
        check_data(args)  # DatasetError is a ValueError
    except (ValueError, KeyError, TypeError, OSError) as err:  # InitAdapterError is a ValueError too
        return report_error(err)
    output_dir = Path(args.output_dir or f"runs/dense-{args.benchmark}-{args.method}"
                      + ("-single" if args.single_task else ""))
    groups = [[task] for task in args.tasks] if args.single_task else [list(args.tasks)]
    group_dirs = [output_dir / tasks[0] if args.single_task else output_dir for tasks in groups]
    try:  # every task's folder before the first trains
        refuse_existing_runs(group_dirs, resume=args.resume, overwrite=args.overwrite)
    except FileExistsError as err:
        return report_error(err)
    state = PartialState()
    start = time.perf_counter()
    runs = {}
    for tasks, out in zip(groups, group_dirs):
        done = out / "metrics.json"
        if done.is_file() and args.resume:
            runs[tasks[0]] = json.loads(done.read_text())
            continue
        try:
            with task_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state):
                runs[tasks[0]] = train_one(args, tasks, out, fields)
        # what the cheap checks cannot see: backbone weights that cannot be had, an --init-adapter's tensors
        except (ValueError, KeyError, FileExistsError, BackboneWeightsError) as err:
            return report_error(err, state)
    if args.single_task and all(runs.values()):
        # one record for the whole reference: each task's result from its own model
        write_json_atomic(output_dir / "metrics.json", {
            "benchmark": args.benchmark, "method": args.method, "tasks": list(args.tasks), "single_task": True,
            "results": {task: run["results"][task] for task, run in runs.items()},
            "trainable_params": sum(run["trainable_params"] for run in runs.values()),
            "runs": {task: str(output_dir / task) for task in runs},
            "wall_time_s": round(time.perf_counter() - start, 2),
        })
    if all(runs.values()):
        from visadapt.eval.dense import DenseRow, format_dense_table

        record = json.loads((output_dir / "metrics.json").read_text())
        print(format_dense_table([DenseRow(args.method, record["results"], None, record["trainable_params"])]))
        print(f"table with Δm: visadapt-eval --benchmark dense --adapters {output_dir} --reference <single-task run>")
    return 0


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    sys.exit(run_script(lambda: main(prog=module_prog(__spec__))))
