"""Published training recipes for VTAB-1k / FGVC (``assets/recipes/*.yaml``): reading and checking them.

A recipe names its source (paper and repository files), the benchmark, the plugin and its config, the training
settings (each the name of a ``train/vtab.py`` flag with ``_`` for ``-``), ``per_task`` overrides where the
source gives them (the 1-bit adapters' per-task scale), what the source does not publish (``not_published``:
what the recipe uses instead) and where visadapt cannot follow it (``deviations``). :func:`load_recipe` refuses
anything else, naming the file, the key and the known keys. ``train/vtab.py --recipe NAME`` runs one.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import os
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from visadapt.backbones import EMBEDDED_MODEL
from visadapt.data.tasks import resolve_task
from visadapt.data.transforms import NORMALIZATION_CHOICES
from visadapt.registry import get_plugin

# Defaults per benchmark, under any recipe; every value can be overridden by its flag. VTAB-1k / FGVC: the common
# recipe of NOAH, PETL-ViT and V-PETL Bench. mini-vtab: sized to finish on 2 CPU cores in a few minutes.
BENCHMARK_DEFAULTS = {
    "vtab": {"model": "vit_base_patch16_224.augreg_in21k", "epochs": 100, "lr": 1e-3, "weight_decay": 1e-4,
             "batch_size": 64, "warmup_epochs": 10, "eval_every": 10},
    "fgvc": {"model": "vit_base_patch16_224.augreg_in21k", "epochs": 100, "lr": 1e-3, "weight_decay": 1e-4,
             "batch_size": 64, "warmup_epochs": 10, "eval_every": 10},
    "mini-vtab": {"model": EMBEDDED_MODEL, "epochs": 6, "lr": 5e-3, "weight_decay": 1e-4, "batch_size": 50,
                  "warmup_epochs": 1, "eval_every": 1},
}
# Defaults of the remaining recipe-settable flags, the same for every benchmark.
COMMON_DEFAULTS = {"pretrained": "default", "normalize": "model", "input_size": None, "label_smoothing": 0.0,
                   "drop_path_rate": 0.0, "seed": 0, "adapter": "adapter"}

# ----------------------------------------------------------------------------------------------- recipes

RECIPE_DIR = importlib.resources.files("visadapt.assets") / "recipes"
# Recipe keys that set a flag of this script (the key is the flag's name with '_' for '-') and their types.
SETTING_TYPES: dict[str, type] = {
    "model": str, "pretrained": str, "normalize": str, "input_size": int, "epochs": int, "lr": float,
    "weight_decay": float, "batch_size": int, "warmup_epochs": float, "eval_every": int, "label_smoothing": float,
    "drop_path_rate": float, "seed": int,
}
# Settings that define the run as a whole and so cannot differ per task.
RUN_WIDE_SETTINGS = ("model", "pretrained", "seed")
# Settings tied to the backbone: a recipe run on another benchmark (a smoke test on mini-vtab) takes that
# benchmark's instead, because the recipe's backbone is sized for the recipe's data.
BACKBONE_SETTINGS = ("model", "pretrained", "input_size")
# Keys that describe the recipe rather than set a flag. Values: what each must be.
RECIPE_META = {
    "name": str, "description": str, "source": dict, "benchmark": str, "adapter": str, "adapter_config": dict,
    "per_task": dict, "not_published": dict, "deviations": list, "eval_convention": str,
}
RECIPE_REQUIRED = ("name", "source", "benchmark", "adapter")
SOURCE_KEYS = ("paper", "code", "reported")


class Recipe(NamedTuple):
    """A published training recipe, read from a YAML file and checked by :func:`load_recipe`.

    ``settings`` maps flag names (``lr``, ``weight_decay`` ...) to values; ``per_task`` maps canonical task names
    of ``benchmark`` to their overrides (settings, and ``adapter_config`` fields under that key).
    ``not_published`` says, per value the source does not give, what the recipe uses instead; ``deviations``
    lists where visadapt cannot follow the published setting.
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

    def adapter_values(self, task: str | None) -> dict[str, Any]:
        """The recipe's plugin config fields for ``task`` (canonical name; ``None``: no task overrides)."""
        return {**self.adapter_config, **self.per_task.get(task, {}).get("adapter_config", {})}

    def task_settings(self, task: str | None) -> dict[str, Any]:
        """The recipe's flag values for ``task``: its settings, then that task's overrides."""
        overrides = {k: v for k, v in self.per_task.get(task, {}).items() if k != "adapter_config"}
        return {**self.settings, **overrides}


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``assets/recipes`` (the file stems), sorted."""
    return sorted(p.name[:-5] for p in RECIPE_DIR.iterdir() if p.name.endswith(".yaml"))


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


def _checked_setting(where: str, key: str, value: Any) -> Any:
    """``value`` for setting ``key``, type-checked: ints are accepted for floats, booleans for neither."""
    kind = SETTING_TYPES[key]
    if key == "input_size" and value is None:
        return None
    fine = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else \
        (isinstance(value, kind) and not isinstance(value, bool))
    if not fine:
        example = "1.0e-3 (YAML reads 1e-3 without a dot as text)" if kind is float else kind.__name__
        raise ValueError(f"{where}: {key} is {value!r} ({type(value).__name__}); expected a {kind.__name__}, "
                         f"e.g. {example}")
    if key == "normalize" and value not in NORMALIZATION_CHOICES:
        raise ValueError(f"{where}: normalize is {value!r}; choose one of {', '.join(NORMALIZATION_CHOICES)}")
    return float(value) if kind is float else value


def _check_adapter_config(where: str, plugin, values: dict) -> None:
    try:
        plugin.Config.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: adapter_config for plugin {plugin.name!r}: {err}") from None


def load_recipe(name_or_path: str) -> Recipe:
    """Read and check a recipe: a name in ``assets/recipes`` (``bi-adaptformer-dim32-vtab``) or a YAML path.

    Every key must be a known one (a flag of this script, or one of the descriptive keys), every task under
    ``per_task`` a task of the recipe's benchmark, and the plugin config (global and per task) must build; any
    other content is an error naming the file, the key and the known keys.
    """
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
    known = {**RECIPE_META, **SETTING_TYPES}
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
    benchmark = data["benchmark"]
    if benchmark not in BENCHMARK_DEFAULTS:
        raise ValueError(f"{where}: benchmark {benchmark!r} is not one of {', '.join(BENCHMARK_DEFAULTS)}")
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
    try:
        plugin = get_plugin(data["adapter"])()
    except KeyError as err:
        raise ValueError(f"{where}: adapter: {err}") from None
    settings = {k: _checked_setting(where, k, v) for k, v in data.items() if k in SETTING_TYPES}
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
            if key in RUN_WIDE_SETTINGS:
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
                  eval_convention=data.get("eval_convention", ""))
