"""Cheap checks first: a training job reports a bad argument, data folder or output folder in one ``error:`` line
with exit code 2 before it builds a model or contacts the hub; a model whose weights cannot be had ends in one
line naming the model and the fixes; a failed run leaves no empty output folders.

Each case runs the job's ``main`` in-process with the hub offline (``HF_HUB_OFFLINE``, an empty hub cache) and a
``create_backbone`` / ``create_clip`` that fails the test if a cheap check should have stopped the run first.
"""
from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
from train_scripts import load_train_script

from visadapt.data.procedural import generate_mini_vtab
from visadapt.train.preflight import remove_empty_folders

TINY_SIZES = {"train800": 16, "val200": 8, "test": 20}
NO_SUCH_REPO = "visadapt-tests/no-such-repo"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """No network: huggingface_hub reads these at call time (the environment only at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return generate_mini_vtab(tmp_path_factory.mktemp("minivtab"), seed=0, split_sizes=TINY_SIZES)


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built before the cheap checks stopped the run")


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


def _one_error_line(capsys) -> str:
    """The single ``error:`` line the run printed (no traceback, nothing else on stderr but argparse usage)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


# ------------------------------------------------------------------------------------------------ train/vtab.py

def _vtab(monkeypatch, build_models: bool = False):
    vtab = load_train_script("vtab")
    if not build_models:
        monkeypatch.setattr("visadapt.backbones.create_backbone", _no_model)  # the jobs import it when they build
    return vtab


@pytest.mark.parametrize("argv, message", [
    # the case: the default ViT-B of --benchmark vtab would be built (and fetched) first
    (["--benchmark", "vtab", "--data-root", "{missing}"], "--data-root {missing} does not exist"),
    (["--benchmark", "vtab", "--data-root", "{file}"], "--data-root {file} is a file, not a folder"),
    (["--benchmark", "vtab", "--data-root", "{empty}", "--task", "cifar100"],
     "no folder for task 'cifar100' under data root {empty}"),
    (["--benchmark", "fgvc", "--data-root", "{missing}"], "--data-root {missing} does not exist"),
    (["--benchmark", "vtab"], "--benchmark vtab needs --data-root"),
    (["--data-root", "{file}"], "--data-root {file} is a file"),  # mini-vtab: generated only where nothing is
    (["--data-root", "{tiny}", "--task", "celsl"], "did you mean 'cells'"),
    (["--data-root", "{tiny}", "--recipe", "mosa-vtabb"], "mosa-vtabb"),
    (["--data-root", "{tiny}", "--adapter", "LoRA"], "did you mean 'lora'"),
    (["--data-root", "{tiny}", "--model", "vit_nope_patch16"], "'vit_nope_patch16' is not a timm model name"),
    (["--data-root", "{tiny}", "--pretrained", "./weights/missing.safetensors"],
     "--pretrained './weights/missing.safetensors' is not an existing file"),
    (["--data-root", "{tiny}", "--init-adapter", "{file}"], "--init-adapter {file}: "),
])
def test_vtab_cheap_checks_come_before_any_model(argv, message, tiny_data, tmp_path, monkeypatch, capsys):
    places = {"missing": tmp_path / "missing", "file": tmp_path / "a-file", "empty": tmp_path / "empty",
              "tiny": tiny_data}
    places["file"].write_text("not a folder")
    places["empty"].mkdir()
    out = tmp_path / "runs"
    argv = [arg.format(**places) for arg in argv] + ["--output-dir", str(out), "--no-progress"]
    assert _exit_code(_vtab(monkeypatch).main, argv) == 2
    assert message.format(**places) in _one_error_line(capsys)
    assert not out.exists()
    assert not places["missing"].exists()


def test_vtab_a_later_task_holding_a_run_is_refused_before_the_first_trains(tiny_data, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "runs"
    (out / "digits").mkdir(parents=True)
    (out / "digits" / "metrics.json").write_text("{}")
    argv = ["--data-root", str(tiny_data), "--task", "cells", "digits", "--output-dir", str(out)]
    assert _exit_code(_vtab(monkeypatch).main, argv) == 2
    assert f"{out / 'digits'} already holds a run; pass --resume" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["digits"]  # no folder for cells


@pytest.mark.parametrize("pretrained, source", [
    (NO_SUCH_REPO, f"hub repo {NO_SUCH_REPO}"),
    ("default", "hub repo timm/test_vit."),  # timm's default tag, not in the (empty) hub cache
])
def test_vtab_weights_that_cannot_be_loaded_end_in_one_line_and_no_folder(pretrained, source, tiny_data, tmp_path,
                                                                        monkeypatch, capsys):
    """Offline, with weights the hub cache lacks: one line naming the model, where its weights come from and the
    fixes; the task folder the run had started is removed again, and so is the output folder it created."""
    out = tmp_path / "runs" / "here"
    argv = ["--data-root", str(tiny_data), "--task", "cells", "--model", "test_vit", "--pretrained",
            pretrained, "--input-size", "32", "--output-dir", str(out), "--no-progress"]
    assert _exit_code(_vtab(monkeypatch, build_models=True).main, argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: cannot load the weights of --model test_vit from " + source)
    for fix in ("HF_HUB_OFFLINE is set", "--pretrained PATH", "--model visadapt_procvit_tiny"):
        assert fix in line
    assert not (tmp_path / "runs").exists()


def test_a_failed_task_keeps_folders_that_existed_and_files_it_wrote(tmp_path):
    """Only folders without files go: a pre-existing output folder with a file in it stays."""
    kept = tmp_path / "out"
    (kept / "task" / "logs" / "empty").mkdir(parents=True)
    (kept / "note.txt").write_text("mine")
    (tmp_path / "other" / "task").mkdir(parents=True)
    (tmp_path / "other" / "task" / "metrics.json").write_text("{}")
    remove_empty_folders([kept / "task", kept, tmp_path / "other" / "task", tmp_path / "gone"])
    assert not (kept / "task").exists() and (kept / "note.txt").is_file()
    assert (tmp_path / "other" / "task" / "metrics.json").is_file()


# ------------------------------------------------------------------------------------------------- train/vpr.py

def _places_layout(root: Path) -> Path:
    """The split folders of a place-recognition dataset, without images (the cheap checks look no further)."""
    for split in ("train", "val", "test"):
        for kind in ("database", "queries"):
            (root / "images" / split / kind).mkdir(parents=True)
    return root


@pytest.mark.parametrize("argv, message", [
    (["--data-root", "{missing}"], "--data-root {missing} does not exist"),
    (["--data-root", "{empty}"], "--data-root {empty} lacks images/train/database, images/train/queries"),
    (["--data-root", "{layout}", "--model", "vit_nope_patch16"], "'vit_nope_patch16' is not a timm model name"),
    (["--data-root", "{layout}", "--recipe", "selavpr-mslss"], "selavpr-mslss"),
    (["--data-root", "{layout}", "--recipe", "mini-places", "--adapter", "LoRA"], "did you mean 'lora'"),
])
def test_vpr_cheap_checks_come_before_any_model(argv, message, tmp_path, monkeypatch, capsys):
    places = {"missing": tmp_path / "missing", "empty": tmp_path / "empty",
              "layout": _places_layout(tmp_path / "layout")}
    places["empty"].mkdir()
    vpr = load_train_script("vpr")
    monkeypatch.setattr("visadapt.backbones.create_backbone", _no_model)
    out = tmp_path / "runs"
    argv = [arg.format(**places) for arg in argv] + ["--output-dir", str(out), "--no-progress"]
    assert _exit_code(vpr.main, argv) == 2
    assert message.format(**places) in _one_error_line(capsys)
    assert not out.exists()


def test_vpr_weights_that_cannot_be_loaded_end_in_one_line_and_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "vpr"
    argv = ["--data-root", str(_places_layout(tmp_path / "layout")), "--model", "test_vit", "--pretrained",
            NO_SUCH_REPO, "--input-size", "32", "--output-dir", str(out), "--no-progress"]
    assert _exit_code(load_train_script("vpr").main, argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot load the weights of --model test_vit from hub repo {NO_SUCH_REPO}")
    assert "--model visadapt_procvit_tiny" in line
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ train/rank.py

def _ranking_csvs(root: Path) -> Path:
    root.mkdir()
    for split in ("train", "val", "test"):
        (root / f"{split}.csv").write_text("filepath\ttitle\tcname\tvalue\n")
    return root


@pytest.mark.parametrize("argv, message", [
    (["--data-root", "{missing}"], "--data-root {missing} does not exist"),
    (["--data-root", "{empty}"], "{empty} lacks train.csv, val.csv, test.csv"),
    (["--data-root", "{csvs}", "--model", "RN50x"], "--model 'RN50x' is not an open_clip model name"),
    (["--data-root", "{csvs}", "--model", "RN50", "--pretrained", "laion9b"],
     "--pretrained 'laion9b' is not an open_clip tag of RN50 (its tags: openai, yfcc15m, cc12m)"),
    (["--data-root", "{csvs}", "--recipe", "ranking-clipp"], "ranking-clipp"),
])
def test_rank_cheap_checks_come_before_any_model(argv, message, tmp_path, monkeypatch, capsys):
    places = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "csvs": _ranking_csvs(tmp_path / "csvs")}
    places["empty"].mkdir()
    rank = load_train_script("rank")
    monkeypatch.setattr("visadapt.backbones.create_clip", _no_model)
    out = tmp_path / "runs"
    argv = [arg.format(**places) for arg in argv] + ["--output-dir", str(out), "--no-progress"]
    assert _exit_code(rank.main, argv) == 2
    assert message.format(**places) in _one_error_line(capsys)
    assert not out.exists()


def test_rank_clip_weights_that_cannot_be_loaded_end_in_one_line_and_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "rank"
    argv = ["--data-root", str(_ranking_csvs(tmp_path / "csvs")), "--model", "RN50", "--pretrained", "openai",
            "--output-dir", str(out), "--no-progress"]
    assert _exit_code(load_train_script("rank").main, argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: cannot load the weights of --model RN50 from open_clip tag openai (hub repo ")
    assert "HF_HUB_OFFLINE is set" in line and "--model visadapt_tiny_clip" in line
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------- --input-size on a fixed-size ViT

def test_input_size_builds_a_vit_as_timm_create_model_with_img_size_does():
    """A ViT's --input-size reaches timm as ``img_size``: the embedded weights load with the position embedding
    resampled to the new grid, exactly as a timm user's ``timm.create_model(..., img_size=48)``; a CNN (any input
    size) and the model's own size get no ``img_size``."""
    import timm
    import torch

    from visadapt.backbones import EMBEDDED_MODEL, create_backbone, input_size_options

    ours = create_backbone(EMBEDDED_MODEL, "default", num_classes=0, input_size=48).eval()
    theirs = timm.create_model(EMBEDDED_MODEL, pretrained=True, num_classes=0, img_size=48).eval()
    assert ours.patch_embed.grid_size == (12, 12)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    with torch.no_grad():
        assert ours(torch.randn(2, 3, 48, 48)).shape == (2, ours.num_features)
    assert input_size_options("resnet18", 48) == {}
    assert input_size_options(EMBEDDED_MODEL, 32) == {} and input_size_options(EMBEDDED_MODEL, None) == {}


def test_a_hub_repo_given_for_an_embedded_model_is_what_loads(tmp_path):
    """``--pretrained owner/name`` on a model whose config names a weights file (the embedded ones) loads the repo's
    weights, as timm's ``hf-hub:`` ids do; timm preferred the config's file, so the repo was silently ignored. A
    repo that cannot be had is one BackboneWeightsError, not the embedded weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    from visadapt.backbones import EMBEDDED_MODEL, BackboneWeightsError, create_backbone

    embedded = timm.create_model(EMBEDDED_MODEL, pretrained=True, num_classes=0)
    other = {name: tensor + 1 for name, tensor in embedded.state_dict().items()}
    # the repo as huggingface_hub's cache holds it, read offline (offline_hub points the cache here)
    snapshot = tmp_path / "empty-hub-cache" / "models--visadapt-tests--procvit" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(other, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    loaded = create_backbone(EMBEDDED_MODEL, "visadapt-tests/procvit", num_classes=0).state_dict()
    assert all(torch.equal(loaded[name], other[name]) for name in other)
    with pytest.raises(BackboneWeightsError, match=NO_SUCH_REPO):
        create_backbone(EMBEDDED_MODEL, NO_SUCH_REPO, num_classes=0)


def test_vtab_trains_a_vit_at_an_input_size_other_than_its_own(tiny_data, tmp_path):
    """``--model <ViT> --input-size N`` trained and evaluated; it failed at the first forward ("Input height (48)
    doesn't match model (32)") when img_size did not reach timm. visadapt-eval's rebuild uses the size too."""
    import json

    from visadapt.engine import evaluate_adapter_file

    out = tmp_path / "run"
    argv = ["--data-root", str(tiny_data), "--task", "cells", "--input-size", "48", "--epochs", "1",
            "--batch-size", "8", "--adapter", "linear", "--output-dir", str(out), "--no-progress"]
    assert load_train_script("vtab").main(argv) == 0
    metrics = json.loads((out / "cells" / "metrics.json").read_text())
    assert metrics["input_size"] == 48
    again = evaluate_adapter_file(out / "cells" / "adapter.safetensors", tiny_data)
    assert again["accuracy"] == pytest.approx(metrics["accuracy_final"], abs=1e-6)


# ----------------------------------------------------------------------------------------------- train/dense.py

@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "pascal"], "--benchmark pascal needs --data-root, the PASCAL_MT folder"),
    (["--benchmark", "pascal", "--data-root", "{missing}"], "--data-root {missing} does not exist"),
    (["--benchmark", "pascal", "--data-root", "{empty}"],
     "split file {empty}/ImageSets/Context/train.txt does not exist"),
    (["--model", "swin_nope_patch4"], "'swin_nope_patch4' is not a timm model name"),
    (["--pretrained", "./weights/missing.safetensors"],
     "--pretrained './weights/missing.safetensors' is not an existing file"),
    (["--method", "lite", "--set", "nope=1"], "nope"),
])
def test_dense_cheap_checks_come_before_any_model(argv, message, tmp_path, monkeypatch, capsys):
    places = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    places["empty"].mkdir()
    dense = load_train_script("dense")
    monkeypatch.setattr("visadapt.backbones.create_backbone", _no_model)
    out = tmp_path / "runs"
    argv = [arg.format(**places) for arg in argv] + ["--output-dir", str(out), "--no-progress"]
    assert _exit_code(dense.main, argv) == 2
    assert message.format(**places) in _one_error_line(capsys)
    assert not out.exists()


def test_dense_single_task_refuses_a_later_task_holding_a_run_before_the_first_trains(tmp_path, monkeypatch,
                                                                                    capsys):
    dense = load_train_script("dense")
    monkeypatch.setattr("visadapt.backbones.create_backbone", _no_model)
    out = tmp_path / "runs"
    (out / "sal").mkdir(parents=True)
    (out / "sal" / "metrics.json").write_text("{}")
    argv = ["--single-task", "--tasks", "semseg", "sal", "--output-dir", str(out), "--no-progress"]
    assert _exit_code(dense.main, argv) == 2
    assert f"{out / 'sal'} already holds a run; pass --resume" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["sal"]  # no folder for semseg


def test_dense_weights_that_cannot_be_loaded_end_in_one_line_and_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "dense"
    argv = ["--model", "swin_tiny_patch4_window7_224", "--pretrained", NO_SUCH_REPO, "--tasks", "semseg",
            "--output-dir", str(out), "--no-progress"]
    assert _exit_code(load_train_script("dense").main, argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot load the weights of --model swin_tiny_patch4_window7_224 from hub repo "
                           f"{NO_SUCH_REPO}")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------- train/resadapter.py, selma.py, ppap.py, selma_data.py

def _image_prompt_folder(root: Path) -> Path:
    """An image-prompt folder as far as the cheap checks look (its metadata.jsonl; no image is read)."""
    root.mkdir(parents=True)
    (root / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a red circle"}\n')
    return root


def _diffusion_places(tmp_path: Path) -> dict[str, Path]:
    places = {"missing": tmp_path / "missing", "empty": tmp_path / "empty",
              "images": _image_prompt_folder(tmp_path / "images"), "taken": tmp_path / "taken"}
    places["empty"].mkdir()
    places["taken"].mkdir()
    (places["taken"] / "metrics.json").write_text("{}")
    return places


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "./pipelines/missing"], "--pipeline ./pipelines/missing does not exist"),
    (["--pipeline", "{empty}"], "--pipeline {empty} is a folder without model_index.json"),
    (["--pipeline", "not a repo!"], "'not a repo!' is neither a folder nor a hub repo id"),
    (["--data", "{missing}"], "--data {missing} does not exist"),
    (["--data", "{empty}"], "--data {empty}: not a folder holding metadata.jsonl"),
    (["--data", "{images}", "--output-dir", "{taken}"], "{taken} already holds a run; pass --resume"),
])
def test_resadapter_cheap_checks_come_before_any_pipeline(argv, message, tmp_path, monkeypatch, capsys):
    places = _diffusion_places(tmp_path)
    resadapter = load_train_script("resadapter")
    monkeypatch.setattr("visadapt.diffusion.load_pipeline", _no_model)
    out = tmp_path / "runs"
    argv = ["--output-dir", str(out)] + [arg.format(**places) for arg in argv] + ["--no-progress"]
    assert _exit_code(resadapter.main, argv) == 2
    assert message.format(**places) in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "./pipelines/missing"], "--pipeline ./pipelines/missing does not exist"),
    (["--skill", "counting={missing}"], "--skill counting={missing}: not a folder holding metadata.jsonl"),
    (["--skill", "counting={images}", "--output-dir", "{taken}"], "{taken} already holds a run; pass --resume"),
])
def test_selma_cheap_checks_come_before_any_pipeline(argv, message, tmp_path, monkeypatch, capsys):
    places = _diffusion_places(tmp_path)
    selma = load_train_script("selma")
    monkeypatch.setattr("visadapt.diffusion.load_pipeline", _no_model)
    out = tmp_path / "runs"
    argv = ["--output-dir", str(out)] + [arg.format(**places) for arg in argv] + ["--no-progress"]
    assert _exit_code(selma.main, argv) == 2
    assert message.format(**places) in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("job, data", [("resadapter", ["--data", "{images}"]),
                                       ("selma", ["--skill", "counting={images}"]),
                                       ("selma_data", ["--prompts", "counting={prompts}"])])
def test_a_hub_pipeline_that_cannot_be_had_ends_in_one_line_and_no_folder(job, data, tmp_path, caplog, capsys):
    """Offline, a hub pipeline the cache lacks: one line naming --pipeline, the repo and the fixes, and no output
    folder (it is made once the pipeline is loaded)."""
    # diffusers' warning ("Couldn't connect to the Hub") is not ours, and its log handler, made once, holds the
    # captured stderr of the test that first logged, closed since
    caplog.set_level(logging.ERROR, logger="diffusers")
    places = {"images": _image_prompt_folder(tmp_path / "images"), "prompts": tmp_path / "prompts.txt"}
    places["prompts"].write_text("three circles\n")
    out = tmp_path / "runs" / job
    argv = ["--pipeline", NO_SUCH_REPO, *(arg.format(**places) for arg in data), "--output-dir", str(out)]
    assert _exit_code(load_train_script(job).main, argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot load the weights of --pipeline {NO_SUCH_REPO} from hub repo "
                           f"{NO_SUCH_REPO}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
    assert "--pipeline FOLDER" in line and "--pipeline visadapt_tiny_sd" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "./pipelines/missing"], "--pipeline ./pipelines/missing does not exist"),
    (["--classifier", "vit_nope_patch16"], "--classifier 'vit_nope_patch16' is not a timm model name"),
    (["--classifier", "test_vit", "--classifier-weights", "./weights/missing.safetensors"],
     "--classifier-weights './weights/missing.safetensors' is not an existing file"),
    (["--classifier-weights", "./weights/missing.safetensors"],
     "--classifier-weights './weights/missing.safetensors' is not an existing file"),
    (["--output-dir", "{taken}"], "{taken} already holds a run; pass --resume"),
])
def test_ppap_cheap_checks_come_before_any_model(argv, message, tmp_path, monkeypatch, capsys):
    places = _diffusion_places(tmp_path)
    ppap = load_train_script("ppap")
    monkeypatch.setattr(ppap, "load_world", _no_model)
    out = tmp_path / "runs"
    argv = ["--output-dir", str(out)] + [arg.format(**places) for arg in argv]
    assert _exit_code(ppap.main, argv) == 2
    assert message.format(**places) in _one_error_line(capsys)
    assert not out.exists()


def test_ppap_classifier_weights_that_cannot_be_had_end_in_one_line_and_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "ppap"
    argv = ["--classifier", "test_vit", "--output-dir", str(out)]
    assert _exit_code(load_train_script("ppap").main, argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: cannot load the weights of --classifier test_vit from hub repo timm/test_vit.")
    assert "--classifier-weights none" in line and "--classifier visadapt_ppap_world" in line
    assert not (tmp_path / "runs").exists()


def test_selma_data_refuses_a_pipeline_path_before_loading_anything(tmp_path, monkeypatch, capsys):
    selma_data = load_train_script("selma_data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("three circles\n")
    monkeypatch.setattr("visadapt.diffusion.load_pipeline", _no_model)
    argv = ["--prompts", f"counting={prompts}", "--pipeline", "./pipelines/missing",
            "--output-dir", str(tmp_path / "data")]
    assert _exit_code(selma_data.main, argv) == 2
    assert "--pipeline ./pipelines/missing does not exist" in _one_error_line(capsys)
    assert not (tmp_path / "data").exists()
