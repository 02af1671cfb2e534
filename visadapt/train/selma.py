"""Train SELMA skill experts (one LoRA per skill dataset) on a frozen text-to-image pipeline, then merge them.

    accelerate launch train/selma.py                    # embedded default: tiny SD + procedural skills, no download
    accelerate launch train/selma.py --pipeline CompVis/stable-diffusion-v1-4 --recipe selma \\
        --skill counting=/data/selma/counting --skill color=/data/selma/color --merge average

Each ``--skill NAME=FOLDER`` is an image-prompt folder (``FOLDER/metadata.jsonl`` with ``{"file_name", "text"}``
per line, sub-folders such as ``shard_00000/`` included; see :mod:`visadapt.diffusion` and ``train/selma_data.py``,
which writes such folders from a prompt list; ``train/selma_prompts.py`` writes that list with an LLM). One
``selma`` expert is trained per skill on the frozen pipeline (UNet, VAE and text encoder never change; each
expert starts from the same base and seed), then ``--merge``
writes one multi-skill ``lora`` adapter (:func:`visadapt.plugins.selma.merge_expert_files`).

Outputs in ``--output-dir``: ``experts/<skill>.safetensors`` (visadapt ``selma`` adapters; per-skill checkpoints
under ``runs/<skill>/`` for ``--resume``), ``samples/<skill>/epoch_<n>.png`` (after each evaluation, a labelled
grid: the skill's first prompts by expert weight 0 = base and 1 = expert, also logged to the run's trackers as
``samples/<skill>``), ``merged-<method>.safetensors`` and ``metrics.json`` (per skill: the
denoising loss at fixed noise on up to ``--eval-items`` of its images, before and after, per epoch; the merge
report). Load the result with ``pipe.load_visadapt(path)`` or ``visadapt.load_adapter(pipe.unet, path)``; for
the unmerged alternative load every expert with its own ``adapter_name`` and set their weights.

``--init-adapter SKILL=FILE`` (repeatable, the form of ``--skill NAME=FOLDER``) starts that skill's expert from a
trained one (e.g. ``experts/counting.safetensors`` of an earlier run) instead of a fresh LoRA; the skills not
named start fresh. The file must hold a ``selma`` expert of the same skill with this run's config (rank, alpha,
targets); every header is checked before the output folder is made, the tensors when the expert is attached; either
failure is one ``error:`` line and exit code 2, with the UNet left as it was.

Recipes: ``selma`` is the official SD v1.4 one (``fine-tune/ft_sd_lora.sh`` at the newest commit, see
:data:`visadapt.plugins.selma.RECIPE`: rank 128 = alpha, AdamW with weight decay 1e-2 and gradient clipping at
1.0, lr 3e-4 constant with no warm-up, batch 16 x 4 accumulation, resolution 512, random flip, 5,000 optimiser
steps, seed 42). As in the official script, ``--max-steps`` decides the length: the epochs are
``ceil(max_steps / optimiser steps per epoch)`` and the run stops at step ``max_steps``, mid-epoch if need be
(``--epochs`` given as well stops at whichever comes first). The official checkpoint choice (best DSG score
every 1000 steps) needs a VQA model and is out of scope: the last step is kept. The official LoRA draws ``A``
from a Gaussian; visadapt's Kaiming-uniform ``A`` starts from the same zero delta. SDXL
(:data:`~visadapt.plugins.selma.RECIPE_SDXL`) is not trainable here (the trainer builds no SDXL conditioning).
``embedded`` is sized for 2 CPU cores: the tiny pipeline of
:func:`visadapt.backbones.create_tiny_sd_pipeline` on two procedural skills, 32x32 images: ``counting`` ("three
circles", 1-4 objects) and ``color`` ("a red square", one shape of a named colour).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import visadapt
from visadapt.names import EMBEDDED_SD
from visadapt.names import SELMA_MERGE_METHODS as MERGE_METHODS
from visadapt.tracking import tracking_options
from visadapt.train.flags import SetOverride, add_run_flags, finish_run_args, run_options, run_script
from visadapt.train.preflight import refuse_existing_runs, report_error

#: ``--recipe`` choices; their values: :func:`recipe_values`
RECIPE_NAMES = ("embedded", "selma")


def recipe_values(name: str) -> dict:
    """The settings of recipe ``name``: ``selma`` is the official one (:data:`visadapt.plugins.selma.RECIPE`, read
    here rather than at import: the plugin loads torch, and ``--help`` should not), ``embedded`` is sized for the
    embedded pipeline on 2 CPU cores."""
    if name == "embedded":
        return {"rank": 4, "alpha": 4.0, "lr": 1e-3, "batch_size": 4, "grad_accum_steps": 1, "resolution": 32,
                "epochs": 3, "max_steps": 0, "lr_schedule": "cosine", "weight_decay": 0.0, "max_grad_norm": None,
                "random_flip": False, "seed": 0}
    from visadapt.plugins.selma import RECIPE

    return {"rank": RECIPE["rank"], "alpha": RECIPE["alpha"], "lr": RECIPE["lr"], "batch_size": RECIPE["batch_size"],
            "grad_accum_steps": RECIPE["grad_accum_steps"], "resolution": RECIPE["resolution"], "epochs": None,
            "max_steps": RECIPE["max_steps"], "lr_schedule": RECIPE["lr_schedule"],
            "weight_decay": RECIPE["weight_decay"], "max_grad_norm": RECIPE["max_grad_norm"],
            "random_flip": RECIPE["random_flip"], "seed": RECIPE["seed"]}
# The sample grid written at each evaluation (per skill: rows = the skill's first prompts, columns = expert
# weight): denoising steps and guidance of the pipeline call, per recipe. Kept out of recipe_values, whose keys are the
# defaults of command-line flags.
SAMPLE_SETTINGS = {"selma": {"steps": 25, "guidance": 7.5}, "embedded": {"steps": 4, "guidance": 1.0}}
SAMPLE_PROMPTS = 3
SAMPLE_WEIGHTS = (0.0, 1.0)
SKILL_DATA_VERSION = 1
SKILL_MANIFEST = "selma_skills.json"
COUNT_WORDS = ("one", "two", "three", "four")
COLORS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.15, 0.25, 0.9), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle", "star")


# ------------------------------------------------------------------------------------------ embedded skill data


def _render_color(shape: str, color: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """One ``shape`` filled with ``color`` on a grey textured background: ``(32, 32, 3)`` uint8."""
    from visadapt.data import procedural as P

    grey = float(rng.uniform(0.35, 0.65))
    canvas = np.clip(grey + 0.08 * (P._smooth_noise(rng, 3)[..., None] - 0.5), 0, 1).repeat(3, axis=2)
    u, v = P._local(rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(7, 10), rng.uniform(0, 2 * np.pi))
    P._paint(canvas, P._shape_mask(shape, u, v), np.array(color))
    return P._finish(canvas, rng, noise=0.02)


def default_skills_root(seed: int = 0, per_skill: int = 48) -> Path:
    cache = Path(os.environ.get("VISADAPT_CACHE", Path.home() / ".cache" / "visadapt"))
    return cache / f"selma-skills-v{SKILL_DATA_VERSION}-seed{seed}-n{per_skill}"


def generate_skill_datasets(root: str | os.PathLike | None = None, seed: int = 0, per_skill: int = 48) -> Path:
    """Write the embedded skills ``counting`` and ``color`` as image-prompt folders under ``root``; return it.

    ``counting``: 1-4 copies of one shape, prompt "three circles"; ``color``: one shape of a named colour, prompt
    "a red square". Deterministic in ``seed``; written once (a folder with the same manifest is reused).
    """
    from visadapt.data.generated import write_generated
    from visadapt.data.ranking import render_count
    from visadapt.diffusion import METADATA_FILE

    root = Path(root) if root is not None else default_skills_root(seed, per_skill)

    def write(tmp: Path) -> dict:
        for skill_index, skill in enumerate(("counting", "color")):
            folder = tmp / skill
            folder.mkdir()
            lines = []
            for k in range(per_skill):
                rng = np.random.default_rng([seed, skill_index, k])
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                if skill == "counting":
                    count = int(rng.integers(1, len(COUNT_WORDS) + 1))
                    image = render_count(shape, count, rng)
                    prompt = f"{COUNT_WORDS[count - 1]} {shape}{'s' if count > 1 else ''}"
                else:
                    color = list(COLORS)[int(rng.integers(len(COLORS)))]
                    image = _render_color(shape, COLORS[color], rng)
                    prompt = f"a {color} {shape}"
                Image.fromarray(image).save(folder / f"{k:05d}.png", compress_level=1)
                lines.append(json.dumps({"file_name": f"{k:05d}.png", "text": prompt}))
            (folder / METADATA_FILE).write_text("\n".join(lines) + "\n")
        return {}

    params = {"version": SKILL_DATA_VERSION, "seed": seed, "per_skill": per_skill}
    return write_generated(root, SKILL_MANIFEST, params, write, "SELMA embedded skill datasets")


# ------------------------------------------------------------------------------------------ the run


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or "train/selma.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pipeline", default=EMBEDDED_SD, help="local folder or hub id of a diffusers Stable Diffusion "
                                                           f"pipeline, or {EMBEDDED_SD} (embedded, no download)")
    p.add_argument("--skill", action="append", default=[], metavar="NAME=FOLDER",
                   help="a skill and its image-prompt folder; repeatable (default: the embedded procedural skills)")
    p.add_argument("--recipe", default=None, choices=sorted(RECIPE_NAMES),
                   help="default: embedded for the embedded pipeline, selma otherwise")
    for flag, kind in (("rank", int), ("alpha", float), ("lr", float), ("batch-size", int),
                       ("grad-accum-steps", int), ("resolution", int), ("epochs", int), ("seed", int),
                       ("weight-decay", float)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="default: the recipe's")
    # --max-steps, --max-grad-norm, --lr-schedule and the optimiser are add_run_flags' (the recipe fills them)
    p.add_argument("--set", dest="overrides", action=SetOverride, default=[], metavar="KEY=VALUE",
                   help="override one selma config field (value parsed as YAML), e.g. targets=[to_q,to_v]")
    p.add_argument("--merge", choices=MERGE_METHODS, default=None, help="merge the experts into one adapter")
    p.add_argument("--merge-weights", type=float, nargs="+", default=None,
                   help="one weight per skill (default: 1/n for average and dare, 1 for ties)")
    p.add_argument("--merge-rank", type=int, default=None, help="rank of a ties/dare merge (default: sum of ranks)")
    p.add_argument("--density", type=float, default=0.2, help="ties: fraction of each delta's entries kept")
    p.add_argument("--drop-rate", type=float, default=0.5, help="dare: probability of dropping a delta entry")
    p.add_argument("--eval-items", type=int, default=16, help="images per skill for the fixed-noise denoising loss")
    p.add_argument("--data-seed", type=int, default=0, help="embedded skills only: seed of the generated data")
    p.add_argument("--per-skill", type=int, default=48, help="embedded skills only: images per skill")
    p.add_argument("--output-dir", default="runs/selma")
    add_run_flags(p, resume_help="continue from the newest checkpoints")
    # not add_run_flags' --init-adapter FILE: a run trains one expert per skill, so a file names the skill it starts
    p.add_argument("--init-adapter", action="append", default=[], metavar="SKILL=FILE",
                   help="start the expert of SKILL from a trained selma expert file (e.g. experts/counting.safetensors "
                        "of an earlier run) instead of a fresh LoRA; repeatable, one per skill, like --skill; skills "
                        "not named start fresh. The file must hold a selma expert of that skill with this run's "
                        "config (checked before training)")
    args = p.parse_args(argv)
    args.recipe = args.recipe or ("embedded" if args.pipeline == EMBEDDED_SD else "selma")
    finish_run_args(p, args, recipe_values(args.recipe))
    if args.epochs is not None and args.epochs <= 0:
        p.error(f"--epochs {args.epochs}: must be positive (or leave it out: --max-steps decides)")
    if not args.max_steps and args.epochs is None:
        p.error(f"recipe {args.recipe} counts optimiser steps: give --max-steps N (or --epochs N)")
    skills = {}
    for item in args.skill:
        name, sep, folder = item.partition("=")
        if not sep or not name.isidentifier() or not folder:
            p.error(f"--skill {item!r}: expected NAME=FOLDER with NAME a Python identifier, e.g. counting=/data/count")
        if name in skills:
            p.error(f"--skill {name} is given twice")
        skills[name] = Path(folder)
    args.skills = skills
    if args.merge_weights is not None and args.merge is None:
        p.error("--merge-weights needs --merge")
    return args


def epochs_for_steps(max_steps: int, images: int, batch_size: int, grad_accum_steps: int) -> int:
    """Epochs that hold ``max_steps`` optimiser steps, as the official (diffusers) script counts them:
    ``ceil(max_steps / ceil(ceil(images / batch_size) / grad_accum_steps))``."""
    steps_per_epoch = math.ceil(math.ceil(images / batch_size) / grad_accum_steps)
    return math.ceil(max_steps / steps_per_epoch)


def expert_config(args, skill: str) -> dict:
    """The ``selma`` config fields of the expert of ``skill``: the recipe's rank and alpha, ``--set``, its name."""
    from visadapt.plugin import config_values

    return config_values(None, args.overrides, base={"rank": args.rank, "alpha": args.alpha, "skill": skill})


def init_adapter_files(args) -> dict[str, Path]:
    """``{skill: file}`` from ``--init-adapter SKILL=FILE`` (``args.skills`` known), each header checked: a
    ``selma`` expert of that skill with this run's config. Raises ``ValueError`` (:class:`InitAdapterError` for a
    file) naming the item and the fix."""
    from visadapt.engine import InitAdapterError, check_init_adapter
    from visadapt.io import read_adapter_metadata

    files: dict[str, Path] = {}
    for item in args.init_adapter:
        skill, sep, file = item.partition("=")
        if not sep or skill not in args.skills or not file:
            example = f"{next(iter(args.skills))}={file if sep else item}"
            raise ValueError(f"--init-adapter {item}: expected SKILL=FILE with SKILL one of this run's skills "
                             f"({', '.join(args.skills)}), e.g. --init-adapter {example}")
        if skill in files:
            raise ValueError(f"--init-adapter names skill {skill!r} twice; give one file per skill")
        # every field but the skill, with the engine's fixes ("auto" matches any value)...
        check_init_adapter(file, "selma", {**expert_config(args, skill), "skill": "auto"})
        # ...then the skill, whose fix is the name, not a --set
        holds = json.loads(read_adapter_metadata(file)["config"]).get("skill", "")
        if holds != skill:
            raise InitAdapterError(f"--init-adapter {item}: {file} holds the expert of skill {holds!r}, not "
                                   f"{skill!r}; start the skill it was trained on (--init-adapter {holds}={file} "
                                   f"with --skill {holds}=FOLDER) or start {skill!r} fresh")
        files[skill] = Path(file)
    return files


def skill_prompts(folder: Path, count: int = SAMPLE_PROMPTS) -> list[str]:
    """The first ``count`` distinct prompts of a skill's image-prompt folder (metadata order)."""
    from visadapt.diffusion import read_metadata

    prompts: list[str] = []
    for _, text in read_metadata(folder):
        if text not in prompts:
            prompts.append(text)
        if len(prompts) == count:
            break
    return prompts


def expert_grid(pipe, skill: str, prompts: list[str], *, resolution: int, steps: int, guidance: float, seed: int,
                title: str):
    """The labelled grid of the ``skill`` expert: a row per prompt, a column per expert weight in
    :data:`SAMPLE_WEIGHTS` (0 = the frozen base pipeline, 1 = the expert as trained), every cell from the same
    seed, so a row differs only through the expert. The expert's weight and the UNet's mode are restored. (A
    diffusers pipeline's ``__call__`` runs under ``torch.no_grad()`` itself.)"""
    import torch

    from visadapt.grids import labelled_grid

    unet = pipe.unet
    was_training, weight = unet.training, visadapt.get_weight(unet, skill)
    pipe.set_progress_bar_config(disable=True)
    columns = []
    try:
        unet.eval()
        for value in SAMPLE_WEIGHTS:
            visadapt.set_weight(unet, skill, value)
            columns.append(pipe(prompts, height=resolution, width=resolution, num_inference_steps=steps,
                                guidance_scale=guidance, output_type="np",
                                generator=torch.Generator().manual_seed(seed)).images)
    finally:
        visadapt.set_weight(unet, skill, weight)
        unet.train(was_training)
    cells = [[column[row] for column in columns] for row in range(len(prompts))]
    labels = [f"weight {value:g}" + (" (base)" if value == 0 else " (expert)" if value == 1 else "")
              for value in SAMPLE_WEIGHTS]
    return labelled_grid(cells, row_labels=prompts, column_labels=labels, title=title, row_axis="prompt",
                         column_axis=f"{skill} expert weight")


def train_expert(args, pipe, skill: str, folder: Path, out: Path, accelerator, run: dict,
                 init_file: Path | None = None) -> dict:
    """Attach a ``selma`` expert for ``skill`` (fresh, or ``init_file``'s trained one), fit it on ``folder``, save
    it, detach it; return its metrics."""
    import torch

    from visadapt import api
    from visadapt.diffusion import ImagePromptFolder, TextToImageTrainer, denoising_evaluator, denoising_loss
    from visadapt.engine import TrainConfig, fit, init_adapter_from_file, seed_everything
    from visadapt.io import TRAIN_METADATA

    seed_everything(args.seed)
    visadapt.attach(pipe.unet, "selma", expert_config(args, skill), adapter_name=skill)
    try:
        if init_file is not None:  # its tensors replace the fresh ones (base UNet, widths and shapes checked)
            init_adapter_from_file(pipe.unet, init_file, skill)
        data = ImagePromptFolder(folder, pipe.tokenizer, args.resolution, random_flip=args.random_flip)
        held = torch.utils.data.Subset(data, range(min(args.eval_items, len(data))))
        denoising = denoising_evaluator(held, batch_size=args.batch_size, seed=args.seed)
        sampling = {"epoch": 0, "prompts": skill_prompts(folder), **SAMPLE_SETTINGS[args.recipe]}

        def evaluator(trainer, accel) -> dict[str, float]:
            """The denoising loss, and after each training epoch the expert's sample grid, written to
            ``samples/<skill>/epoch_<n>.png`` and logged as image ``samples/<skill>`` at step ``n``."""
            metrics = denoising(trainer, accel)
            if sampling["epoch"] > 0:  # not the 'before' measurement
                if accel.is_main_process:
                    from visadapt.grids import save_and_log

                    epoch = sampling["epoch"]
                    grid = expert_grid(pipe, skill, sampling["prompts"], resolution=args.resolution,
                                       steps=sampling["steps"], guidance=sampling["guidance"], seed=args.seed,
                                       title=f"SELMA {skill} expert after epoch {epoch} ({sampling['steps']} "
                                             f"steps, guidance {sampling['guidance']:g}, seed {args.seed})")
                    save_and_log(grid, out / "samples" / skill / f"epoch_{epoch:03d}.png", accel.trackers,
                                 f"samples/{skill}", epoch)
                accel.wait_for_everyone()
            return metrics

        def before_epoch(_model, epoch: int) -> None:
            sampling["epoch"] = epoch + 1  # the epoch an evaluation after it reports
        model = TextToImageTrainer.from_pipeline(pipe)
        before = evaluator(model, accelerator)["denoising_loss"]
        epochs = args.epochs or epochs_for_steps(args.max_steps, len(data), args.batch_size, args.grad_accum_steps)
        train_config = TrainConfig(epochs=epochs, lr=args.lr, weight_decay=args.weight_decay,
                                   batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
                                   warmup_epochs=0, seed=args.seed, progress=not args.no_progress,
                                   **run_options(args))
        result = fit(model, data, None, train_config, accelerator=accelerator, output_dir=out / "runs" / skill,
                     resume=args.resume, loss_fn=denoising_loss, evaluator=evaluator, metric="neg_denoising_loss",
                     log_prefix=f"[{skill}] ", before_epoch=before_epoch)
        path = out / "experts" / f"{skill}.safetensors"
        if accelerator.is_main_process:
            visadapt.save_adapter(pipe.unet, path, skill, metadata={
                TRAIN_METADATA: json.dumps({**run, "skill": skill, "data_root": str(folder)}, sort_keys=True)})
        accelerator.wait_for_everyone()
        counts = api.summary(pipe.unet)
        return {"data_root": str(folder), "images": len(data), "denoising_loss_before": before,
                "denoising_loss_after": result.history[-1]["denoising_loss"], "history": result.history,
                "trainable_params": counts.trainable_params, "adapter_bytes": path.stat().st_size,
                "wall_time_s": round(result.wall_time_s, 2), "resumed_from": result.resumed_from, "file": str(path),
                "init_adapter": str(init_file) if init_file is not None else None}
    finally:
        visadapt.detach(pipe.unet, skill)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # The cheap checks come first, each one error line and exit 2: flags, the config, the --pipeline name or
    # folder, every --skill folder, --init-adapter headers, an output folder holding a run. The output folder is
    # made once the pipeline is loaded, so a pipeline that cannot be had leaves none.
    args = parse_args(argv, prog)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from visadapt.backbones import BackboneWeightsError
    from visadapt.diffusion import METADATA_FILE, check_pipeline_choice, load_pipeline
    from visadapt.engine import make_accelerator, prepare_output_dir
    from visadapt.io import write_json_atomic
    from visadapt.plugin import config_values
    from visadapt.plugins.selma import merge_expert_files

    try:
        visadapt.get_plugin("selma")().Config.from_dict(
            config_values(None, args.overrides, base={"rank": args.rank, "alpha": args.alpha}))
        check_pipeline_choice(args.pipeline)
        refuse_existing_runs([Path(args.output_dir)], resume=args.resume, overwrite=args.overwrite)
    except (ValueError, KeyError, TypeError, OSError) as err:
        return report_error(err)
    for skill, folder in args.skills.items():  # the given ones; the embedded skills are generated below
        if not (folder.is_dir() and any(folder.rglob(METADATA_FILE))):
            print(f"error: --skill {skill}={folder}: not a folder holding {METADATA_FILE} (an image-prompt folder; "
                  f"train/selma_data.py writes one from a prompt list)", file=sys.stderr)
            return 2
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if not args.skills:
        with state.main_process_first():
            root = generate_skill_datasets(seed=args.data_seed, per_skill=args.per_skill)
        args.skills = {"counting": root / "counting", "color": root / "color"}
    if args.merge_weights is not None and len(args.merge_weights) != len(args.skills):
        print(f"error: --merge-weights has {len(args.merge_weights)} values for {len(args.skills)} skills "
              f"({', '.join(args.skills)}); give one per skill, in --skill order", file=sys.stderr)
        return 2
    try:
        init_files = init_adapter_files(args)
    except ValueError as err:  # InitAdapterError is a ValueError too
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    try:
        pipe = load_pipeline(args.pipeline)
        prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state)
    except (BackboneWeightsError, FileExistsError) as err:  # a hub pipeline that cannot be had
        return report_error(err, state)
    accelerator = make_accelerator(out, grad_accum_steps=args.grad_accum_steps, precision=args.precision,
                                   **tracking_options(args))
    run = {"benchmark": "selma", "pipeline": args.pipeline, "recipe": args.recipe, "seed": args.seed,
           "resolution": args.resolution, "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr,
           "lr_schedule": args.lr_schedule}
    accelerator.init_trackers("selma", config={k: v for k, v in run.items()})
    experts = {skill: train_expert(args, pipe, skill, folder, out, accelerator, run, init_files.get(skill))
               for skill, folder in args.skills.items()}
    metrics = {**run, "experts": experts, "visadapt_version": visadapt.__version__}
    if args.merge is not None and accelerator.is_main_process:
        merged = out / f"merged-{args.merge}.safetensors"
        report = merge_expert_files(pipe.unet, [e["file"] for e in experts.values()], merged, args.merge,
                                    weights=args.merge_weights, rank=args.merge_rank, density=args.density,
                                    drop_rate=args.drop_rate, seed=args.seed)
        metrics["merge"] = {**json.loads(report.to_json()), "skills": list(experts), "file": str(merged),
                            "bytes": merged.stat().st_size}
    if accelerator.is_main_process:
        write_json_atomic(out / "metrics.json", metrics)
        for skill, info in experts.items():
            print(f"[{skill}] {info['images']} images: denoising loss {info['denoising_loss_before']:.4f} -> "
                  f"{info['denoising_loss_after']:.4f}; expert {info['file']} ({info['adapter_bytes']:,} bytes)")
        if "merge" in metrics:
            m = metrics["merge"]
            print(f"[merge] {m['method']} of {', '.join(m['skills'])} at rank {m['rank']} "
                  f"(max relative error {m['max_error']:.2e}): {m['file']}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    sys.exit(run_script(lambda: main(prog=module_prog(__spec__))))
