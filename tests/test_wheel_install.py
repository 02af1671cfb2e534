"""The built wheel trains without the checkout: ``pip wheel`` of the project, installed into a folder of its
own, runs ``visadapt-train vtab`` on a tiny embedded mini-VTAB from a temporary directory outside the
repository.

The installed package is run by this venv's interpreter with ``-S`` (no site-packages processing, so the
editable install's import finder of the checkout is never installed) and ``PYTHONPATH=<install dir>:<this
venv's site-packages>`` (the dependencies, without installing them again); each run reports which ``visadapt``
it imported, and the test checks it is the installed one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from visadapt.data.procedural import generate_mini_vtab

ROOT = Path(__file__).resolve().parents[1]
TINY_SIZES = {"train800": 16, "val200": 8, "test": 20}  # 24 training images = 3 steps of 8
# Runs each command given (JSON: ["script", path, argv] runs a console script pip generated, ["module", name,
# argv] runs a module as `python -m name` does) one after the other in one process, so that the imports are
# paid once; then reports each one's exit code and stdout, and which visadapt modules the process imported.
REPORTING_RUNNER = """
import contextlib, io, json, runpy, sys
results = []
for kind, target, argv in json.loads(sys.argv[1]):
    sys.argv = [target, *argv]
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            if kind == "script":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    results.append({"code": code, "stdout": stdout.getvalue()})
print("REPORT " + json.dumps({
    "results": results, "sys_path": sys.path,
    "modules": {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
                if name == "visadapt" or name.startswith("visadapt.")}}), file=sys.stderr)
"""


def _package_dirs() -> dict[str, Path]:
    """Import name -> source folder of each package in pyproject.toml (``visadapt.plugins``: ``plugins/``)."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    return {name: ROOT / mapped.get(name, name.replace(".", "/")) for name in setuptools["packages"]}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> SimpleNamespace:
    """The project built with ``pip wheel`` (from a copy of the sources, so that the build leaves no
    ``build/`` or ``*.egg-info`` in the checkout) and installed with ``pip install --target``."""
    # found, not imported: importing setuptools into a process that already imported distutils fails
    for needed in ("pip", "setuptools"):  # --no-build-isolation builds with this environment's setuptools
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"building the wheel needs {needed} in this environment")
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".visadapt_cache")
    for folder in {path.relative_to(ROOT).parts[0] for path in _package_dirs().values()}:
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(source),
                    "-w", str(base / "dist")], check=True, capture_output=True)
    wheel = next((base / "dist").glob("visadapt-*.whl"))
    site = base / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    return SimpleNamespace(wheel=wheel, site=site)


def _isolated_env(site: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a run of the installed package: the install folder first, then this venv's
    site-packages for the dependencies; no hub access; nothing of the caller's Python configuration."""
    paths = sysconfig.get_paths()
    dependencies = [paths["purelib"]] + ([paths["platlib"]] if paths["platlib"] != paths["purelib"] else [])
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    env.update(PYTHONPATH=os.pathsep.join([str(site), *dependencies]), HF_HUB_OFFLINE="1",
               VISADAPT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def _run_installed(installed: SimpleNamespace, tmp_path: Path, *commands: list):
    """Each of ``commands`` (``["script", path, argv]`` or ``["module", name, argv]``) with the installed
    package, one after the other in one process run in an empty folder outside the checkout; returns the
    completed process and the report (per command its exit code and stdout, the ``visadapt`` modules imported,
    ``sys.path``)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-S", "-s", "-c", REPORTING_RUNNER, json.dumps(commands)],
                          cwd=cwd, env=_isolated_env(installed.site, tmp_path), capture_output=True,
                          text=True, check=False, timeout=300)
    reports = [line for line in done.stderr.splitlines() if line.startswith("REPORT ")]
    assert reports, done.stderr[-3000:]
    return done, json.loads(reports[-1].removeprefix("REPORT "))


def _assert_installed_modules(report: dict, site: Path) -> None:
    assert report["modules"]["visadapt"] == str(site / "visadapt" / "__init__.py")
    outside = {name: path for name, path in report["modules"].items()
               if path is not None and not Path(path).is_relative_to(site)}
    assert not outside, f"modules imported from outside the installed package: {outside}"
    assert str(ROOT) not in report["sys_path"] and "" not in report["sys_path"][1:]


def test_wheel_holds_every_module_and_asset_the_jobs_read(installed):
    """Every module of the package folders and every file of ``assets/`` (recipes, tokenizer, the embedded
    backbones and PPAP world) is in the wheel; ``visadapt-train`` is one of its console scripts."""
    with zipfile.ZipFile(installed.wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(name).decode() for name in names
                            if name.endswith(".dist-info/entry_points.txt"))
    expected = set()
    for package, folder in _package_dirs().items():
        target = package.replace(".", "/")
        for path in folder.iterdir():
            if path.is_file() and path.suffix != ".pyc":
                expected.add(f"{target}/{path.name}")
    assets = _package_dirs()["visadapt.assets"]
    expected |= {f"visadapt/assets/{path.relative_to(assets).as_posix()}" for path in assets.rglob("*")
                 if path.is_file() and not {"__pycache__", ".visadapt_cache"} & set(path.parts)}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing}"
    # a subpackage missing from [tool.setuptools] packages would be silently left out of the wheel
    source_packages = {path.parent.relative_to(ROOT).as_posix().replace("/", ".")
                       for path in (ROOT / "visadapt").rglob("__init__.py")}
    assert source_packages <= set(_package_dirs())
    assert {"visadapt/train/vtab.py", "visadapt/train/cli.py", "visadapt/assets/procvit_tiny.safetensors",
            "visadapt/assets/recipes/mosa-vtab.yaml"} <= names
    assert "visadapt-train = visadapt.train.cli:main" in entry_points


def test_installed_wheel_trains_from_outside_the_checkout(installed, tmp_path):
    """From an empty folder outside the checkout, with the installed wheel: ``python -m visadapt.train
    --help``, ``visadapt-train vtab --help``, then ``visadapt-train vtab`` for one epoch of the embedded
    default (shipped ViT, its weights read from the installed assets): the adapter and metrics land under the
    working directory."""
    data = generate_mini_vtab(tmp_path / "mini-vtab", seed=0, split_sizes=TINY_SIZES)
    console_script = str(installed.site / "bin" / "visadapt-train")
    done, report = _run_installed(
        installed, tmp_path, ["module", "visadapt.train", ["--help"]],
        ["script", console_script, ["vtab", "--help"]],
        ["script", console_script, ["vtab", "--data-root", str(data), "--task", "cells", "--epochs", "1",
                                    "--batch-size", "8", "--no-progress"]])
    module_help, job_help, training = report["results"]
    assert [module_help["code"], job_help["code"], training["code"]] == [0, 0, 0], done.stderr[-3000:]
    assert module_help["stdout"].startswith("usage: python -m visadapt.train COMMAND")
    assert "  vtab " in module_help["stdout"]
    assert job_help["stdout"].startswith("usage: visadapt-train vtab ")
    assert "--data-root" in job_help["stdout"]
    _assert_installed_modules(report, installed.site)
    assert str(installed.site / "visadapt" / "train" / "vtab.py") == report["modules"]["visadapt.train.vtab"]
    out = tmp_path / "elsewhere" / "runs" / "mini-vtab-adapter" / "cells"  # the default --output-dir
    assert "runs/mini-vtab-adapter/cells/adapter.safetensors" in training["stdout"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "cells" and metrics["epochs"] == 1 and len(metrics["history"]) == 1
    assert metrics["pretrained"] == "default" and metrics["model"] == "visadapt_procvit_tiny"
    assert metrics["eval_samples"] == TINY_SIZES["test"] and 0.0 <= metrics["accuracy_final"] <= 100.0
    assert metrics["adapter_bytes"] == (out / "adapter.safetensors").stat().st_size
    from visadapt.io import read_adapter_metadata

    assert read_adapter_metadata(out / "adapter.safetensors")["plugin"] == "adapter"
