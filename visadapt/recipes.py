"""Published training recipes (``assets/recipes/*.yaml``) for ``train/vtab.py``, ``train/vpr.py`` and
``train/rank.py``: reading and checking them, one reader for every script.

A recipe names its source (paper and repository files), the benchmark (which says the script: ``vtab`` / ``fgvc``
/ ``mini-vtab`` for ``train/vtab.py``, ``vpr`` for ``train/vpr.py``, ``rank`` for ``train/rank.py``), the plugin
and its config, the training settings (each the name of a flag of that script with ``_`` for ``-``, typed per
script: :data:`SCHEMAS`), ``per_task`` overrides where the source gives them (VTAB/FGVC only: the 1-bit adapters'
per-task scale), what the source does not publish (``not_published``: what the recipe uses instead), where
visadapt cannot follow it (``deviations``), official values that no flag of the script sets, each said in words
with its source (``fixed_by_code``), and for a second-stage recipe the run it starts from (``starts_from``: the script then
requires ``--init-adapter``). :func:`load_recipe` refuses anything else, naming the file, the key and the known
keys. ``train/vtab.py --recipe NAME`` (likewise ``train/vpr.py``, ``train/rank.py``) runs one.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import os
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from visadapt.names import EMBEDDED_MODEL, NORMALIZATION_CHOICES
from visadapt.train.flags import LR_SCHEDULES, OPTIMIZERS, SCHED_ON

# Defaults per benchmark, under any recipe; every value can be overridden by its flag. VTAB-1k / FGVC: the common
# recipe of NOAH, PETL-ViT and V-PETL Bench. mini-vtab: the main job's budget, 12 epochs of the 1,000 training
# images per task (240 steps of 50): about 3.3 minutes for the 7 tasks under `accelerate launch`, which runs one
# CPU thread per process, inside the main job's 4 (README, "The embedded default": 20 epochs took 5.2 minutes);
# evaluated every 4 epochs (500 test images cost little next to training).
BENCHMARK_DEFAULTS = {
    "vtab": {"model": "vit_base_patch16_224.augreg_in21k", "epochs": 100, "lr": 1e-3, "weight_decay": 1e-4,
             "batch_size": 64, "warmup_epochs": 10, "eval_every": 10},
    "fgvc": {"model": "vit_base_patch16_224.augreg_in21k", "epochs": 100, "lr": 1e-3, "weight_decay": 1e-4,
             "batch_size": 64, "warmup_epochs": 10, "eval_every": 10},
    "mini-vtab": {"model": EMBEDDED_MODEL, "epochs": 12, "lr": 5e-3, "weight_decay": 1e-4, "batch_size": 50,
                  "warmup_epochs": 1, "eval_every": 4},
}
# Defaults of the remaining recipe-settable flags, the same for every benchmark.
COMMON_DEFAULTS = {"pretrained": "default", "normalize": "model", "input_size": None, "label_smoothing": 0.0,
                   "drop_path_rate": 0.0, "seed": 0, "adapter": "adapter"}

# ----------------------------------------------------------------------------------------------- recipes

RECIPE_DIR = importlib.resources.files("visadapt.assets") / "recipes"
# train/vtab.py: recipe keys that set a flag of the script (the key is the flag's name with '_' for '-'), their types.
SETTING_TYPES: dict[str, type] = {
    "model": str, "pretrained": str, "normalize": str, "input_size": int, "epochs": int, "lr": float,
    "weight_decay": float, "batch_size": int, "warmup_epochs": float, "eval_every": int, "label_smoothing": float,
    "drop_path_rate": float, "seed": int,
    # the shared optimisation flags (visadapt.train.flags), so that a recipe can state e.g. timm's per-epoch schedule
    "optimizer": str, "momentum": float, "lr_schedule": str, "warmup_lr": float, "min_lr": float, "sched_on": str,
    "max_grad_norm": float, "max_steps": int,
}
# Settings that define the run as a whole and so cannot differ per task.
RUN_WIDE_SETTINGS = ("model", "pretrained", "seed")
# Settings tied to the backbone: a recipe run on another benchmark (a smoke test on mini-vtab) takes that
# benchmark's instead, because the recipe's backbone is sized for the recipe's data.
BACKBONE_SETTINGS = ("model", "pretrained", "input_size")
# Keys that describe the recipe rather than set a flag. Values: what each must be.
RECIPE_META = {
    "name": str, "description": str, "source": dict, "benchmark": str, "adapter": str, "adapter_config": dict,
    "per_task": dict, "not_published": dict, "deviations": list, "eval_convention": str, "dataset": str,
    "starts_from": str, "fixed_by_code": dict,
}
RECIPE_REQUIRED = ("name", "source", "benchmark", "adapter")
SOURCE_KEYS = ("paper", "code", "reported")


class RecipeSchema(NamedTuple):
    """What a recipe for one ``train/`` script may set: its ``settings`` (flag name with ``_`` -> type; ``float``
    also takes an int), the fixed ``choices`` of some of them, the ones that may be ``null``, the benchmarks whose
    recipes the script runs, and whether ``per_task`` entries exist for it."""

    script: str
    benchmarks: tuple[str, ...]
    settings: dict[str, type]
    choices: dict[str, tuple[str, ...]]
    nullable: tuple[str, ...] = ()
    per_task: bool = False


SCHEMAS: dict[str, RecipeSchema] = {
    "vtab": RecipeSchema("train/vtab.py", tuple(BENCHMARK_DEFAULTS), SETTING_TYPES,
                         {"normalize": NORMALIZATION_CHOICES, "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES,
                          "sched_on": SCHED_ON}, ("input_size", "max_grad_norm"), per_task=True),
    "vpr": RecipeSchema("train/vpr.py", ("vpr",), {
        "model": str, "pretrained": str, "normalize": str, "input_size": int, "epochs": int, "lr": float,
        "weight_decay": float, "batch_size": int, "warmup_epochs": float, "lr_schedule": str, "patience": int,
        "queries_per_epoch": int, "mining_refresh_every": int, "negatives": int, "mining_pool": int,
        "mining": str, "margin": float, "local_weight": float, "local_margin": float, "rerank_k": int,
        "train_positive_radius": float, "negative_radius": float, "eval_radius": float, "seed": int,
    }, {"normalize": NORMALIZATION_CHOICES, "mining": ("partial", "semihard", "random"),
        "lr_schedule": LR_SCHEDULES}, ("input_size", "patience", "queries_per_epoch", "mining_refresh_every")),
    "rank": RecipeSchema("train/rank.py", ("rank",), {
        "model": str, "pretrained": str, "epochs": int, "lr": float, "weight_decay": float, "list_size": int,
        "warmup_epochs": float, "lr_schedule": str, "negative_ratio": float, "pair_partners": int,
        "rank_weight": float, "regression_weight": float, "zero_weight": float, "seed": int,
    }, {"lr_schedule": LR_SCHEDULES}, ("pair_partners",)),
}


def script_of(benchmark: str) -> str | None:
    """The key in :data:`SCHEMAS` of the script that runs recipes of ``benchmark`` (``None``: no script does)."""
    return next((key for key, schema in SCHEMAS.items() if benchmark in schema.benchmarks), None)


class Recipe(NamedTuple):
    """A published training recipe, read from a YAML file and checked by :func:`load_recipe`.

    ``settings`` maps flag names (``lr``, ``weight_decay`` ...) to values; ``per_task`` maps canonical task names
    of ``benchmark`` to their overrides (settings, and ``adapter_config`` fields under that key).
    ``not_published`` says, per value the source does not give, what the recipe uses instead; ``deviations``
    lists where visadapt cannot follow the published setting; ``fixed_by_code`` names official values no flag of
    the script sets; ``starts_from`` (second stages) says which run's adapter ``--init-adapter`` names.
    """

    name: str
    path: Path
    sha256: str
    benchmark: str
    adapter: str
    adapter_config: dict[str, Any]
    settings: dict[str, Any]
    per_task: dict[str, dict[str, Any]]
    source: dict[str, str]
    not_published: dict[str, str]
    deviations: list[str]
    description: str = ""
    eval_convention: str = ""
    dataset: str = ""
    #: a second-stage recipe: the run whose adapter ``--init-adapter`` must name (empty: a first stage)
    starts_from: str = ""
    fixed_by_code: dict[str, str] = {}  # noqa: RUF012 (a NamedTuple default, never mutated)

    def adapter_values(self, task: str | None) -> dict[str, Any]:
        """The recipe's plugin config fields for ``task`` (canonical name; ``None``: no task overrides)."""
        return {**self.adapter_config, **self.per_task.get(task, {}).get("adapter_config", {})}

    def task_settings(self, task: str | None) -> dict[str, Any]:
        """The recipe's flag values for ``task``: its settings, then that task's overrides."""
        overrides = {k: v for k, v in self.per_task.get(task, {}).items() if k != "adapter_config"}
        return {**self.settings, **overrides}


def available_recipes(script: str | None = None) -> list[str]:
    """Names of the recipes shipped in ``assets/recipes`` (the file stems), sorted; with ``script`` (a key of
    :data:`SCHEMAS`) only those that script runs (read from each file's ``benchmark``)."""
    names = sorted(p.name[:-5] for p in RECIPE_DIR.iterdir() if p.name.endswith(".yaml"))
    if script is None:
        return names
    return [name for name in names if script_of(_shipped_benchmark(name)) == script]


def _shipped_benchmark(name: str) -> str:
    """The ``benchmark`` of a shipped recipe, ``""`` when the file does not say (:func:`load_recipe` tells why)."""
    try:
        data = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())
    except yaml.YAMLError:
        return ""
    return str(data.get("benchmark", "")) if isinstance(data, dict) else ""


def _recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        raise ValueError(f"--recipe {name_or_path}: no such file; give a recipe file or one of the shipped names: "
                         f"{', '.join(available_recipes())}")
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        close = difflib.get_close_matches(name_or_path, available_recipes(), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"--recipe {name_or_path!r} is not a shipped recipe{hint}; shipped: "
                         f"{', '.join(available_recipes())}; or pass the path of a recipe YAML file")
    return Path(str(shipped))


def _unknown(where: str, key: str, known) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    return ValueError(f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}")


def _checked_setting(where: str, key: str, value: Any, schema: RecipeSchema | None = None) -> Any:
    """``value`` for setting ``key`` of ``schema`` (default: train/vtab.py's), type-checked: ints are accepted for
    floats, booleans for neither; a setting with choices must be one of them."""
    schema = schema or SCHEMAS["vtab"]
    kind = schema.settings[key]
    if key in schema.nullable and value is None:
        return None
    fine = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else \
        (isinstance(value, kind) and not isinstance(value, bool))
    if not fine:
        example = "1.0e-3 (YAML reads 1e-3 without a dot as text)" if kind is float else kind.__name__
        raise ValueError(f"{where}: {key} is {value!r} ({type(value).__name__}); expected a {kind.__name__}, "
                         f"e.g. {example}")
    if key in schema.choices and value not in schema.choices[key]:
        raise ValueError(f"{where}: {key} is {value!r}; choose one of {', '.join(schema.choices[key])}")
    if kind is int and key not in ("seed",) and value <= 0:
        raise ValueError(f"{where}: {key} is {value}; expected a positive integer")
    return float(value) if kind is float else value


def _check_adapter_config(where: str, plugin, values: dict) -> None:
    try:
        plugin.Config.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: adapter_config for plugin {plugin.name!r}: {err}") from None


def load_recipe(name_or_path: str, script: str = "vtab") -> Recipe:
    """Read and check a recipe for ``script`` (a key of :data:`SCHEMAS`: ``vtab``, ``vpr``, ``rank``): a name in
    ``assets/recipes`` (``bi-adaptformer-dim32-vtab``, ``selavpr-msls``) or a YAML path.

    The recipe's benchmark must be one that script runs, every key a known one (a setting of that script, or one
    of the descriptive keys), every setting of its type (and among its choices), every task under ``per_task`` a
    task of the recipe's benchmark, and the plugin config (global and per task) must build; any other content is
    an error naming the file, the key and the known keys.
    """
    schema = SCHEMAS[script]
    path = _recipe_path(name_or_path)
    raw_bytes = path.read_bytes()
    try:
        data = yaml.safe_load(raw_bytes.decode())
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        # ValueError, not TypeError: the file is bad input, reported like every other recipe defect
        raise ValueError(f"recipe {path}: expected a mapping of keys, got {type(data).__name__}")  # noqa: TRY004
    where = f"recipe {path}"
    benchmark = data.get("benchmark")
    owner = script_of(benchmark) if isinstance(benchmark, str) else None
    if isinstance(benchmark, str) and owner is not None and owner != script:
        raise ValueError(f"{where}: benchmark {benchmark!r} is run by {SCHEMAS[owner].script}, not "
                         f"{schema.script}; run it there, or pick one of this script's recipes: "
                         f"{', '.join(available_recipes(script)) or 'none shipped'}")
    known = {**RECIPE_META, **schema.settings}
    if not schema.per_task:
        known.pop("per_task")
    for key in data:
        if key not in known:
            raise _unknown(where, key, known)
    missing = [k for k in RECIPE_REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}; a recipe names at least "
                         f"{', '.join(RECIPE_REQUIRED)}")
    for key, kind in RECIPE_META.items():
        if key in data and not isinstance(data[key], kind):
            raise ValueError(f"{where}: {key} must be a {kind.__name__}, got {type(data[key]).__name__}")
    if benchmark not in schema.benchmarks:
        raise ValueError(f"{where}: benchmark {benchmark!r} is not one of {', '.join(schema.benchmarks)} (the "
                         f"benchmarks {schema.script} runs)")
    for key in data["source"]:
        if key not in SOURCE_KEYS:
            raise _unknown(f"{where}: source", key, SOURCE_KEYS)
    if not all(isinstance(v, str) for v in data["source"].values()) or not {"paper", "code"} <= set(data["source"]):
        raise ValueError(f"{where}: source needs 'paper' and 'code' (text: the paper and the repository file the "
                         f"values come from)")
    for key, value in data.get("not_published", {}).items():
        if not isinstance(value, str):
            raise ValueError(f"{where}: not_published.{key} must say in words what the recipe uses "  # noqa: TRY004
                             "instead")
    for key, value in data.get("fixed_by_code", {}).items():
        if key in schema.settings:
            raise ValueError(f"{where}: fixed_by_code.{key} is a setting of {schema.script}; set it as {key}: "
                             f"<value> at the top level")
        if not isinstance(value, str):
            raise ValueError(f"{where}: fixed_by_code.{key} must say in words the official value and where "  # noqa: TRY004
                             f"{schema.script} applies it")
    if not all(isinstance(v, str) for v in data.get("deviations", [])):
        raise ValueError(f"{where}: deviations must be a list of texts")
    # torch-importing modules: loaded when a recipe is read, not to list the recipes (a job's --help)
    from visadapt.data.tasks import resolve_task
    from visadapt.registry import get_plugin

    try:
        plugin = get_plugin(data["adapter"])()
    except KeyError as err:
        raise ValueError(f"{where}: adapter: {err}") from None
    settings = {k: _checked_setting(where, k, v, schema) for k, v in data.items() if k in schema.settings}
    adapter_config = dict(data.get("adapter_config") or {})
    _check_adapter_config(where, plugin, adapter_config)
    per_task: dict[str, dict[str, Any]] = {}
    allowed = [k for k in SETTING_TYPES if k not in RUN_WIDE_SETTINGS] + ["adapter_config"]
    for task_name, overrides in (data.get("per_task") or {}).items():
        try:
            info = resolve_task(benchmark, str(task_name))
        except ValueError as err:
            raise ValueError(f"{where}: per_task: {err}") from None
        if info.name in per_task:
            raise ValueError(f"{where}: per_task names task {info.name!r} twice (as an alias?); keep one entry")
        task_where = f"{where}: per_task.{task_name}"
        if not isinstance(overrides, dict) or not overrides:
            raise ValueError(f"{task_where} must be a mapping of overrides, e.g. {{adapter_config: {{scale: 0.1}}}}")
        checked: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in RUN_WIDE_SETTINGS:  # per_task exists for train/vtab.py only
                raise ValueError(f"{task_where}: {key} applies to the whole run and cannot differ per task")
            if key not in allowed:
                raise _unknown(task_where, key, allowed)
            if key == "adapter_config":
                if not isinstance(value, dict):
                    raise ValueError(f"{task_where}: adapter_config must be a mapping of config fields")
                _check_adapter_config(task_where, plugin, {**adapter_config, **value})
                checked[key] = dict(value)
            else:
                checked[key] = _checked_setting(task_where, key, value)
        per_task[info.name] = checked
    return Recipe(name=data["name"], path=path, sha256=hashlib.sha256(raw_bytes).hexdigest(), benchmark=benchmark,
                  adapter=data["adapter"], adapter_config=adapter_config, settings=settings, per_task=per_task,
                  source=dict(data["source"]), not_published=dict(data.get("not_published") or {}),
                  deviations=list(data.get("deviations") or []), description=data.get("description", ""),
                  eval_convention=data.get("eval_convention", ""), dataset=data.get("dataset", ""),
                  starts_from=data.get("starts_from", ""), fixed_by_code=dict(data.get("fixed_by_code") or {}))
