"""``visadapt export``: merged dense checkpoints that load without visadapt, ONNX graphs, parity checks."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import save_file

import visadapt
from visadapt.backbones import create_backbone, create_clip
from visadapt.export import ExportError, ExportParityError, compare, export_model
from visadapt.io import TRAIN_METADATA

torch.set_num_threads(1)

EMBEDDED = "visadapt_procvit_tiny"
# A script run in a fresh interpreter in which `import visadapt` fails: what it loads, it loads with the host
# library alone. It reads the inputs and the adapted model's outputs from argv[1] and prints the difference.
NO_VISADAPT_PREAMBLE = """
import json, sys
sys.modules["visadapt"] = None  # any `import visadapt` (or of a submodule) now raises ImportError
try:
    import visadapt  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("visadapt is importable in the isolated interpreter")
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
data = load_file(sys.argv[1])
export_dir = sys.argv[2]
"""


def run_without_visadapt(body: str, data: dict[str, torch.Tensor], export_dir: Path, tmp_path: Path) -> dict:
    """Run ``body`` after :data:`NO_VISADAPT_PREAMBLE`; it prints one JSON line, returned here."""
    data_file = tmp_path / "data.safetensors"
    save_file({k: v.contiguous() for k, v in data.items()}, str(data_file))
    script = tmp_path / "load_without_visadapt.py"
    script.write_text(NO_VISADAPT_PREAMBLE + textwrap.dedent(body))
    result = subprocess.run([sys.executable, str(script), str(data_file), str(export_dir)], capture_output=True,
                            text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def randomize_adapter(model: torch.nn.Module, head: str | None = None, std: float = 0.05) -> None:
    """Non-zero adapter weights (LoRA's B starts at zero, which would make every export trivially equal)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visadapt_adapters" in name or (head and name.startswith(f"{head}.")):
                param.normal_(0.0, std)


def procvit_adapter(tmp_path: Path, plugin: str = "lora", **config) -> tuple[Path, torch.nn.Module]:
    """An adapter file on the embedded ViT (weights shipped in assets/) as train/vtab.py writes it, and the model."""
    model = create_backbone(EMBEDDED, "default", num_classes=5).eval()
    visadapt.attach(model, plugin, head="head", **config)
    randomize_adapter(model, head="head")
    run = {"model": EMBEDDED, "pretrained": "default", "seed": 0}
    path = visadapt.save_adapter(model, tmp_path / f"{plugin}.safetensors",
                                 metadata={TRAIN_METADATA: json.dumps(run)})
    return path, model


def adapted_output(model: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return tiny_models.output_tensor(model(*args, **kwargs))


def onnx_available() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        pytest.skip(f"ONNX export needs onnx, onnxruntime and onnxscript ({err}); install them with "
                    f'pip install "visadapt[onnx]" (CI installs them through the [dev] extra)')


# ------------------------------------------------------------------------------------------- dense exports


def test_timm_lora_export_loads_with_plain_timm_and_matches(tmp_path):
    path, model = procvit_adapter(tmp_path, rank=4, targets=("q", "v", "fc1"))
    out = tmp_path / "export"
    report = export_model(path, to=out)  # the backbone comes from the file's visadapt.train metadata
    assert report["status"] == "ok" and report["folded"]
    assert report["base_model"]["spec"] == EMBEDDED and report["base_model"]["pretrained"] == "default"
    assert report["adapter"]["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    dense = report["checks"][0]
    assert dense["artifact"] == "dense" and dense["passed"] and dense["max_abs_diff"] <= dense["tolerance"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export_report.json", "model.safetensors"]
    assert json.loads((out / "export_report.json").read_text())["status"] == "ok"
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 5

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # not the export's probe
    expected = adapted_output(model, images)
    base = create_backbone(EMBEDDED, "default", num_classes=5).eval()
    assert (adapted_output(base, images) - expected).abs().max() > 1e-2  # the adapter really changes the output
    result = run_without_visadapt("""
        import timm
        images, expected = data["images"], data["expected"]
        config = json.load(open(f"{export_dir}/config.json"))
        by_folder = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
        args = {k: v for k, v in config["model_args"].items() if k != "num_classes"}
        # the overlay carries the saved pretrained_cfg (its num_classes too: else timm drops the trained head)
        overlay = dict(config["pretrained_cfg"], file=f"{export_dir}/model.safetensors")
        by_name = timm.create_model(config["architecture"], pretrained=True, num_classes=config["num_classes"],
                                    pretrained_cfg_overlay=overlay, **args).eval()
        plain = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"], **args)
        plain.load_state_dict(load_file(f"{export_dir}/model.safetensors"), strict=True)
        with torch.no_grad():
            diffs = [(m.eval()(images) - expected).abs().max().item() for m in (by_folder, by_name, plain)]
        print(json.dumps({"diffs": diffs, "modules": sys.modules.get("visadapt") is None}))
    """, {"images": images, "expected": expected}, out, tmp_path)
    assert result["modules"] and max(result["diffs"]) < 1e-4, result


def test_open_clip_lora_export_round_trips_through_open_clip(tmp_path):
    clip, _ = create_clip("visadapt_tiny_clip", "none")
    clip.eval()
    # q/v of both towers sit in nn.MultiheadAttention's fused in_proj_weight (a parametrization): merged too
    visadapt.attach(clip, "lora", rank=4, targets=("q", "v", "fc1"), towers=("visual", "text"))
    randomize_adapter(clip)
    path = visadapt.save_adapter(clip, tmp_path / "clip_lora.safetensors")
    with pytest.raises(ExportError, match="does not record its base model.*pass --model"):
        export_model(path, to=tmp_path / "unknown")
    out = tmp_path / "export"
    report = export_model(path, "open_clip:visadapt_tiny_clip", pretrained="none", to=out)
    assert report["status"] == "ok" and set(report["checks"][0]["per_output"]) >= {"image_features", "text_features"}
    assert {"open_clip_model.safetensors", "open_clip_config.json"} <= {p.name for p in out.iterdir()}

    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 49408, (2, 16), generator=g)
    with torch.no_grad():
        image_features, text_features, _ = clip(image, text)
    result = run_without_visadapt("""
        import open_clip
        model = open_clip.create_model(f"local-dir:{export_dir}").eval()
        with torch.no_grad():
            image_features, text_features, _ = model(data["image"], data["text"])
        print(json.dumps({"image": (image_features - data["image_features"]).abs().max().item(),
                          "text": (text_features - data["text_features"]).abs().max().item()}))
    """, {"image": image, "text": text, "image_features": image_features, "text_features": text_features},
        out, tmp_path)
    assert result["image"] < 1e-5 and result["text"] < 1e-5, result


def test_diffusers_unet_lora_export_loads_with_from_pretrained(tmp_path):
    from diffusers import UNet2DConditionModel

    pipeline_dir = tmp_path / "pipeline"
    tiny_models.unet().save_pretrained(pipeline_dir / "unet")  # a pipeline folder: the UNet sits in unet/
    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir / "unet")).eval()
    visadapt.attach(unet, "lora", rank=4, targets=("to_q", "to_v", "conv1"))
    randomize_adapter(unet)
    path = visadapt.save_adapter(unet, tmp_path / "unet_lora.safetensors")
    out = tmp_path / "export"
    report = export_model(path, str(pipeline_dir), to=out)
    assert report["status"] == "ok" and report["checks"][0]["architecture"] == "UNet2DConditionModel"

    (sample, timestep), kwargs = tiny_models.example_input("diffusers_unet", seed=5)
    expected = adapted_output(unet, sample, timestep, **kwargs)
    result = run_without_visadapt("""
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(export_dir).eval()
        with torch.no_grad():
            got = unet(data["sample"], data["timestep"], encoder_hidden_states=data["context"]).sample
        print(json.dumps({"diff": (got - data["expected"]).abs().max().item()}))
    """, {"sample": sample, "timestep": timestep, "context": kwargs["encoder_hidden_states"], "expected": expected},
        out, tmp_path)
    assert result["diff"] < 1e-4, result


# ---------------------------------------------------------------------------------------------- refusals


def test_plugin_that_does_not_fold_is_a_clear_error_without_onnx(tmp_path):
    path, _ = procvit_adapter(tmp_path, "adapter")
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"plugin 'adapter'.*does not fold into base weights.*non-linearity"
                                          r".*pass --onnx to export the adapted graph"):
        export_model(path, to=out)
    assert not out.exists()  # refused before anything was written


def test_mosa_whose_merged_adapter_stays_a_module_is_refused_naming_the_sites(tmp_path):
    path, _ = procvit_adapter(tmp_path, "mosa")
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"plugin 'mosa' merged, but 4 of its modules still compute on their "
                                          r"own \(blocks\.0:mlp.*pass --onnx"):
        export_model(path, to=out)
    report = json.loads((out / "export_report.json").read_text())
    assert report["status"] == "failed" and "still compute on their own" in report["error"]
    assert [p.name for p in out.iterdir()] == ["export_report.json"]


def test_corrupted_merge_fails_parity_and_keeps_no_model(tmp_path, monkeypatch):
    from visadapt.layers import LoRA

    path, _ = procvit_adapter(tmp_path, rank=4)
    original = LoRA.merge_into

    def merge_twice(self, weight, rows=None):  # a merge bug: the delta folded in twice
        original(self, weight, rows)
        self.merged = False
        original(self, weight, rows)

    monkeypatch.setattr(LoRA, "merge_into", merge_twice)
    out = tmp_path / "export"
    with pytest.raises(ExportParityError, match=r"does not reproduce the adapted model's outputs; nothing was kept"
                                                r"\. dense \(model\.safetensors, config\.json\): max \|diff\|") as err:
        export_model(path, to=out)
    assert [p.name for p in out.iterdir()] == ["export_report.json"]  # no model file that differs
    report = json.loads((out / "export_report.json").read_text())
    dense = report["checks"][0]
    assert report["status"] == "failed" and not dense["passed"] and dense["max_abs_diff"] > dense["tolerance"]
    assert err.value.report["checks"][0]["max_abs_diff"] == dense["max_abs_diff"]

    from visadapt.cli import main

    assert main(["export", str(path), "--to", str(out)]) == 1  # the CLI exits non-zero on a parity failure
    assert [p.name for p in out.iterdir()] == ["export_report.json"]


def test_compare_fails_on_nan_and_on_shape_changes():
    reference = [torch.ones(2, 3)]
    assert compare(reference, [torch.ones(2, 3)], ["y"], 1e-4)["passed"]
    nan = compare(reference, [torch.full((2, 3), float("nan"))], ["y"], 1e-4)
    assert not nan["passed"] and "not finite" in nan["problem"]
    shape = compare(reference, [torch.ones(3, 2)], ["y"], 1e-4)
    assert not shape["passed"] and "shape (3, 2)" in shape["problem"]
    # one tolerance per output: a small output may not drift by what a large one's tolerance allows
    small_and_large = [torch.full((2,), 0.5), torch.full((1,), 100.0)]
    drifted = compare(small_and_large, [torch.full((2,), 0.5 + 5e-3), torch.full((1,), 100.0)], ["f", "s"], 1e-4)
    assert not drifted["passed"] and drifted["worst_output"] == "f"


# -------------------------------------------------------------------------------------------------- ONNX


def test_onnx_export_of_merged_lora_matches_onnxruntime(tmp_path):
    onnx_available()
    import onnxruntime

    path, model = procvit_adapter(tmp_path, rank=4)
    out = tmp_path / "export"
    report = export_model(path, to=out, onnx=True, probe_size=2)
    onnx_check = next(c for c in report["checks"] if c["artifact"] == "onnx")
    assert onnx_check["passed"] and onnx_check["graph"] == "merged dense model"
    assert onnx_check["exporter"] == "torch.onnx.export(dynamo=True)" and onnx_check["dynamic_batch"]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(11))  # another batch size too
    (logits,) = session.run(None, {"pixel_values": images.numpy()})
    assert (torch.from_numpy(logits) - adapted_output(model, images)).abs().max() < 1e-4


def test_onnx_of_an_adapter_that_does_not_fold_holds_the_adapter_graph(tmp_path):
    onnx_available()
    import onnxruntime

    path, model = procvit_adapter(tmp_path, "adapter")
    out = tmp_path / "export"
    report = export_model(path, to=out, onnx=True)
    assert not report["folded"] and [c["artifact"] for c in report["checks"]] == ["onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "model.onnx"]  # no dense checkpoint
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": images.numpy()})
    logits = torch.from_numpy(logits)
    assert (logits - adapted_output(model, images)).abs().max() < 1e-4
    visadapt.detach(model)  # the base model with the same head: the adapter modules are what differs
    assert (logits - adapted_output(model, images)).abs().max() > 1e-3


def test_onnx_without_its_packages_says_how_to_install(tmp_path, monkeypatch):
    path, _ = procvit_adapter(tmp_path, rank=4)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ExportError, match=r'missing: [^.]*onnxruntime[^.]*\. Install them with: pip install "visadapt\[onnx\]"'):
        export_model(path, to=tmp_path / "export", onnx=True)


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_export_end_to_end(tmp_path, capsys):
    from visadapt.cli import main

    path, _ = procvit_adapter(tmp_path, rank=4)
    out = tmp_path / "export"
    assert main(["export", str(path), "--model", EMBEDDED, "--pretrained", "default", "--to", str(out),
                 "--probe-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "merged into the base weights" in printed and "model.safetensors + config.json (timm layout)" in printed
    assert f"timm.create_model('local-dir:{out}', pretrained=True)" in printed and "status:  ok" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert report["probe"]["inputs"]["pixel_values"]["shape"] == [3, 3, 32, 32]

    assert main(["export", str(path), "--to", str(out)]) == 2  # a folder holding an export is not overwritten
    assert "is not empty (an earlier export); pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(path), "--to", str(out), "--overwrite"]) == 0
    other = tmp_path / "not_an_export"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", str(path), "--to", str(other), "--overwrite"]) == 2  # never emptied: not an export
    assert "holds files that are not a visadapt export (notes.txt)" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"

    unfoldable, _ = procvit_adapter(tmp_path, "adapter")
    assert main(["export", str(unfoldable), "--to", str(tmp_path / "adapter_export")]) == 2
    assert "does not fold into base weights" in capsys.readouterr().err
