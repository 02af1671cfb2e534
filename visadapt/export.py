"""``visadapt export``: an adapter merged into its base model, written in the host library's own layout.

The result loads with timm, open_clip or diffusers alone (no visadapt installed) and is checked for output
parity against the adapted model before it is kept::

    from visadapt.export import export_model

    report = export_model("runs/dtd/adapter.safetensors", "visadapt_procvit_tiny", to="export/dtd", onnx=True)
    report["checks"][0]["max_abs_diff"]        # reloaded dense checkpoint vs the adapted model

What is written to ``to``:

============  =============================================================  ==============================================
library       files                                                          loads with
============  =============================================================  ==============================================
timm          ``model.safetensors``, ``config.json`` (timm's hub layout:     ``timm.create_model("local-dir:DIR",
              architecture, num_classes, model_args, pretrained_cfg)         pretrained=True)``
open_clip     ``open_clip_model.safetensors``, ``open_clip_config.json``     ``open_clip.create_model("local-dir:DIR")``
              (``model_cfg``, ``preprocess_cfg``)                            or ``create_model(NAME, pretrained=FILE)``
diffusers     ``diffusion_pytorch_model.safetensors``, ``config.json``       ``UNet2DConditionModel.from_pretrained(DIR)``
              (``save_pretrained``)
--onnx        ``model.onnx`` (plus ``model.onnx.data`` past 1.5 GiB)         ``onnxruntime.InferenceSession``
always        ``export_report.json``: parity per artifact, probe, adapter sha256, versions
============  =============================================================  ==============================================

Nothing is kept that failed its check: artifacts are written to a hidden staging folder inside ``to``, reloaded
from there by the host library's own loader (a fresh model, no visadapt module in it), compared with the adapted
model on a seeded probe batch, and moved into place only when every check passes. A failed check leaves
``export_report.json`` (status ``"failed"``, naming the difference) and raises :class:`ExportParityError`.

Adapters that do not fold into base weights (bottleneck adapters such as AdaptFormer, MoSA's plain adapter, the
1-bit adapters) cannot give a dense checkpoint of the host architecture; they are refused with the reason, and
``onnx=True`` exports the adapted graph instead (adapter modules included), checked the same way.

This is ``visadapt export --format dense`` (the default). ``--format peft|diffusers|resadapter`` writes the adapter
itself as a LoRA folder for PEFT / diffusers / the official ResAdapter loader instead: see
:mod:`visadapt.interop_export`.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt import api, inject
from visadapt.io import (
    TRAIN_METADATA,
    TrainingRun,
    load_adapter_tensors,
    read_adapter_file,
    write_json_atomic,
)
from visadapt.progress import Progress
from visadapt.registry import get_plugin

REPORT_FORMAT = "visadapt-export/1"
REPORT_FILE = "export_report.json"
ONNX_FILE = "model.onnx"
ONNX_INSTALL_HINT = 'pip install "visadapt[onnx]"'
# Parity tolerances per output, relative to its scale: tolerance = rtol * max(1, max |reference|). An fp32 merge
# only reorders sums: below 1e-6 relative on the tiny test models and on a random-init ViT-B/16 with LoRA rank 8
# (9.7e-7 on logits of scale 1.3, CPU). ONNX Runtime runs its own kernels and graph fusions: 1.2e-6 there.
# Both defaults leave a margin of 100x or more, and a wrong merge misses them by orders of magnitude.
DENSE_RTOL = 1e-4
ONNX_RTOL = 1e-3
PROBE_SEED = 0
# Past this many bytes of weights an ONNX protobuf (2 GiB limit) stores them in model.onnx.data beside it.
ONNX_EXTERNAL_DATA_BYTES = 1536 * 2**20


class ExportError(ValueError):
    """The adapter, the model spec or the options cannot give an export; the message says what to do."""


class ExportParityError(RuntimeError):
    """An exported artifact, reloaded, does not reproduce the adapted model's outputs. ``report`` is the full
    export report (also written to ``DIR/export_report.json``); no model file was kept."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------------ model spec


def resolve_library(spec: str) -> str:
    """Which library ``spec`` names: ``open_clip:NAME`` -> open_clip; an existing folder or the embedded
    ``visadapt_tiny_sd`` -> diffusers; anything else is a timm model name."""
    from visadapt.backbones import EMBEDDED_SD

    if spec.startswith("open_clip:"):
        return "open_clip"
    if spec == EMBEDDED_SD or Path(spec).exists():
        return "diffusers"
    if os.sep in spec or spec.startswith("."):
        raise ExportError(f"--model {spec!r} looks like a folder but does not exist; give a diffusers UNet folder "
                          f"(or a pipeline folder with unet/), a timm name, or open_clip:NAME")
    return "timm"


def recorded_model_spec(meta: dict[str, str], path: str | os.PathLike) -> tuple[str | None, str | None, int]:
    """``(model spec, pretrained, seed)`` the adapter file ``path`` (header ``meta``) records: the backbone a ``train/`` script wrote under the
    ``visadapt.train`` metadata key, else the published name in the base model's fingerprint (timm), else None."""
    fingerprint = json.loads(meta.get("base_model") or "{}")  # checked by io.check_header when the file was read
    family = fingerprint.get("family", "") if isinstance(fingerprint, dict) else ""
    run = TrainingRun(path, meta)
    seed = run.integer("seed", 0)
    if family.startswith("diffusers") and run.text("pipeline"):
        return run.text("pipeline"), run.weights(None), seed
    if run.text("model"):
        name = run.text("model")
        spec = f"open_clip:{name}" if family == "open_clip" and not name.startswith("open_clip:") else name
        return spec, run.weights(None), seed
    if family.startswith("timm") and isinstance(fingerprint.get("name"), str):
        return fingerprint["name"], None, seed
    return None, None, seed


def _diffusers_unet_dir(folder: Path) -> Path:
    """The folder holding the UNet's config.json: ``folder`` itself or a pipeline folder's ``unet/``."""
    for candidate in (folder, folder / "unet"):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") in ("UNet2DConditionModel",
                                                                                       "UNet2DModel"):
            return candidate
    raise ExportError(f"--model {folder}: no UNet config found (expected config.json with _class_name "
                      f"UNet2DConditionModel or UNet2DModel in the folder or in its unet/ subfolder)")


def build_base_model(spec: str, pretrained: str | None = "default", num_classes: int = 0,
                     seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The base model ``spec`` with its real weights, in eval mode, fp32, on CPU, with the loading code the
    ``train/`` scripts use. Returns ``(model, facts)``; ``facts`` holds what the writer needs (library, name).

    ``pretrained``: ``"default"``, ``"none"`` (random init, seeded with ``seed`` as the training run was), a local
    checkpoint file, a hub id (timm) or a tag (open_clip). ``num_classes`` sizes a timm classifier head.
    """
    library = resolve_library(spec)
    choice = (pretrained or "default").strip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if library == "timm":
            from visadapt.backbones import create_backbone

            model = create_backbone(spec, choice, num_classes=num_classes)
            facts = {"library": "timm", "name": spec}
        elif library == "open_clip":
            from visadapt.backbones import create_clip

            name = spec.split(":", 1)[1]
            model, preprocess = create_clip(name, choice)
            facts = {"library": "open_clip", "name": name, "preprocess": preprocess}
        else:
            model, facts = _build_unet(spec, choice)
    return model.float().eval(), facts


def _build_unet(spec: str, choice: str) -> tuple[nn.Module, dict[str, Any]]:
    from visadapt.backbones import EMBEDDED_SD

    if spec == EMBEDDED_SD:
        if choice not in ("default", "none"):
            raise ExportError(f"--pretrained {choice!r}: {EMBEDDED_SD} is built from a seed; use default")
        from visadapt.diffusion import load_pipeline

        return load_pipeline(EMBEDDED_SD).unet, {"library": "diffusers", "name": EMBEDDED_SD}
    import diffusers

    unet_dir = _diffusers_unet_dir(Path(spec))
    config = json.loads((unet_dir / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    if choice == "default":
        model = cls.from_pretrained(str(unet_dir))
    elif choice == "none":
        model = cls.from_config(config)
    else:
        raise ExportError(f"--pretrained {choice!r}: a diffusers UNet takes its weights from its folder "
                          f"({unet_dir}); use default, or none for random weights")
    return model, {"library": "diffusers", "name": str(unet_dir)}


# ---------------------------------------------------------------------------------------------- probe batch


def probe_inputs(model: nn.Module, library: str, batch: int = 2, seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
    """A seeded input batch for ``model``, by input name (the names the ONNX graph gets).

    timm: ``pixel_values (B, 3, H, W)`` at the model's input size. open_clip: ``image (B, 3, S, S)`` and
    ``text (B, context_length)`` token ids. diffusers: ``sample (B, C, H, W)`` at ``sample_size``, ``timestep
    (B,)`` and, for conditional UNets, ``encoder_hidden_states (B, 8, cross_attention_dim)`` (SDXL's
    ``text_embeds``/``time_ids`` and class labels where the config asks for them).
    """
    if batch < 1:
        raise ExportError(f"--probe-size {batch}: the probe batch needs at least one example")
    g = torch.Generator().manual_seed(seed)
    if library == "timm":
        from timm.data import resolve_model_data_config

        channels, height, width = resolve_model_data_config(model)["input_size"]
        return {"pixel_values": torch.randn(batch, channels, height, width, generator=g)}
    if library == "open_clip":
        size = model.visual.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return {"image": torch.randn(batch, 3, height, width, generator=g),
                "text": torch.randint(1, int(model.vocab_size), (batch, int(model.context_length)), generator=g)}
    return _unet_probe(model, batch, g)


def _unet_probe(model: nn.Module, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    config = model.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    inputs = {"sample": torch.randn(batch, config.in_channels, height, width, generator=g),
              "timestep": torch.randint(0, 1000, (batch,), generator=g)}
    if config.get("class_embed_type") is not None:
        raise ExportError(f"this UNet has class_embed_type={config.class_embed_type!r}, whose class input the "
                          f"export probe cannot make up; export works for UNets without class embeddings or with "
                          f"num_class_embeds")
    if config.get("num_class_embeds"):
        inputs["class_labels"] = torch.randint(0, int(config.num_class_embeds), (batch,), generator=g)
    if "cross_attention_dim" in config:  # UNet2DConditionModel
        width_ctx = config.get("encoder_hid_dim") or config.cross_attention_dim
        if not isinstance(width_ctx, int):
            raise ExportError(f"this UNet has a cross_attention_dim per block ({width_ctx}); the export probe "
                              f"needs one text width")
        inputs["encoder_hidden_states"] = torch.randn(batch, 8, width_ctx, generator=g)
        addition = config.get("addition_embed_type")
        if addition == "text_time":  # SDXL: pooled text embedding plus 6 size/crop numbers
            time_ids_width = 6 * int(config.addition_time_embed_dim)
            text_width = int(config.projection_class_embeddings_input_dim) - time_ids_width
            inputs["text_embeds"] = torch.randn(batch, text_width, generator=g)
            inputs["time_ids"] = torch.randint(0, 1024, (batch, 6), generator=g).float()
        elif addition is not None:
            raise ExportError(f"this UNet has addition_embed_type={addition!r}; the export probe supports none "
                              f"and 'text_time' (SDXL)")
    return inputs


class ModelOutputs(nn.Module):
    """``model`` called on named inputs, returning a flat tuple of tensors: what parity compares and what the
    ONNX graph returns. ``input_names`` fixes the positional order of :meth:`forward`."""

    def __init__(self, model: nn.Module, library: str, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.library = library
        self.input_names = tuple(input_names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names, tensors, strict=True))
        if self.library == "timm":
            out = self.model(inputs["pixel_values"])
        elif self.library == "open_clip":
            out = self.model(inputs["image"], inputs["text"])
        else:
            added = {key: inputs.pop(key) for key in ("text_embeds", "time_ids") if key in inputs}
            if added:
                inputs["added_cond_kwargs"] = added
            out = self.model(**inputs, return_dict=False)
        return _flat_tensors(out)


def _flat_tensors(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    values = out.values() if isinstance(out, dict) else out
    tensors = tuple(value for value in values if isinstance(value, torch.Tensor))
    if not tensors:
        raise ExportError(f"the model returned {type(out).__name__} without tensors; nothing to compare")
    return tensors


def output_names(library: str, count: int, num_classes: int = 0) -> list[str]:
    if library == "timm":
        names = ["logits" if num_classes else "features"]
    elif library == "open_clip":
        names = ["image_features", "text_features", "logit_scale", "logit_bias"]
    else:
        names = ["out_sample"]  # the input is "sample"; ONNX needs distinct names (optimum uses these two too)
    return names[:count] + [f"output_{i}" for i in range(len(names), count)]


def run_outputs(runner: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``runner(*inputs)`` without gradients, as detached fp32 CPU tensors."""
    with torch.no_grad():
        return [t.detach().float().cpu() for t in runner(*inputs.values())]


def compare(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor], names: Sequence[str],
            rtol: float) -> dict[str, Any]:
    """Largest absolute difference of each output against its tolerance ``rtol * max(1, max |reference|)``.

    Per output, because outputs differ in scale (CLIP's unit-norm features beside its logit scale of ~14):
    one tolerance for all would let the small ones drift. The top-level numbers are the worst output's (the
    largest difference relative to its tolerance); ``passed`` needs every output within its tolerance.
    """
    if len(reference) != len(candidate):
        return {"passed": False, "max_abs_diff": math.inf, "tolerance": None, "relative_tolerance": rtol,
                "worst_output": None, "per_output": {},
                "problem": f"{len(candidate)} outputs instead of {len(reference)}"}
    per_output, problems = {}, []
    for name, ref, got in zip(names, reference, candidate, strict=True):
        got = torch.as_tensor(got).float()
        scale = ref.abs().max().item() if ref.numel() else 0.0
        entry = {"max_abs_diff": 0.0, "reference_max_abs": scale, "tolerance": rtol * max(1.0, scale)}
        if got.shape != ref.shape:
            problems.append(f"output {name} has shape {tuple(got.shape)} instead of {tuple(ref.shape)}")
            entry["max_abs_diff"] = math.inf
        elif ref.numel():
            entry["max_abs_diff"] = (got - ref).abs().max().item()
            if not math.isfinite(entry["max_abs_diff"]):  # NaN would slip through max() and <=
                problems.append(f"output {name} is not finite (NaN or inf)")
                entry["max_abs_diff"] = math.inf
        per_output[name] = entry
    worst = max(per_output, key=lambda n: per_output[n]["max_abs_diff"] / per_output[n]["tolerance"])
    passed = not problems and all(e["max_abs_diff"] <= e["tolerance"] for e in per_output.values())
    return {"passed": passed, "max_abs_diff": per_output[worst]["max_abs_diff"],
            "tolerance": per_output[worst]["tolerance"], "relative_tolerance": rtol, "worst_output": worst,
            "per_output": per_output, **({"problem": "; ".join(problems)} if problems else {})}


# --------------------------------------------------------------------------------------------- dense model


def unfolded_modules(model: nn.Module) -> list[str]:
    """``host:kind`` of every adapter module still computing on its own after :func:`visadapt.merge`."""
    return [f"{item.host_path}:{item.kind}" for item in inject.attached(model)
            if not getattr(item.module, "merged", False)]


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged model's state dict with every visadapt tensor dropped and parametrized weights under their
    plain names (``attn.parametrizations.in_proj_weight.original`` -> ``attn.in_proj_weight``)."""
    state = {}
    for key, tensor in model.state_dict().items():
        if inject.ADAPTERS_ATTR in key:
            continue
        if ".parametrizations." in key or key.startswith("parametrizations."):
            head, _, tail = key.rpartition("parametrizations.")
            param, _, leaf = tail.partition(".")
            if leaf != "original":
                raise ExportError(f"{key}: a parametrization that is not visadapt's holds this weight; remove it "
                                  f"before exporting")
            key = f"{head}{param}"
        state[key] = tensor.detach().clone()
    return state


def strip_adapters(model: nn.Module, merged_state: dict[str, torch.Tensor]) -> None:
    """Remove every visadapt module, hook and parametrization from ``model`` (this restores the base weights),
    then load ``merged_state`` into the plain model strictly: afterwards it is a host-library model holding the
    merged weights, nothing else."""
    api.detach(model)
    model.load_state_dict(merged_state, strict=True)
    leftover = [name for name, _ in model.named_modules() if "visadapt" in name]
    leftover += [name for name in model.state_dict() if "visadapt" in name]
    if leftover or inject.attached(model):
        raise ExportError(f"visadapt modules are still in the model after detaching: {leftover[:5]}")


def _write_timm(model: nn.Module, folder: Path) -> dict[str, Any]:
    import timm
    from timm.models import model_entrypoint, save_for_hf

    arch = model.pretrained_cfg["architecture"]
    model_args: dict[str, Any] = {}
    stock = stock_timm_equivalent(arch)
    if stock is not None:
        arch, model_args = stock
        # the weights are not the stock architecture's pretrained tag: name the architecture, not a tag
        model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "tag"} | {"architecture": arch}
    module = model_entrypoint(arch).__module__
    if not module.startswith("timm."):
        raise ExportError(f"timm architecture {arch!r} is registered by {module}, not by timm, so timm alone "
                          f"cannot build it; add a stock equivalent to visadapt.export.stock_timm_equivalent")
    save_for_hf(model, str(folder), model_args=model_args, safe_serialization=True)
    num_classes = int(model.num_classes)
    return {"files": ["model.safetensors", "config.json"], "architecture": arch, "num_classes": num_classes,
            "model_args": model_args, "timm_version": timm.__version__,
            "loader": "timm.create_model('local-dir:{dir}', pretrained=True)"}


def stock_timm_equivalent(arch: str) -> tuple[str, dict[str, Any]] | None:
    """For a timm architecture visadapt registers itself: a stock timm architecture and the arguments that build
    the same network, so the exported ``config.json`` names something a timm without visadapt can build."""
    from visadapt.backbones import EMBEDDED_MODEL, EMBEDDED_SWIN, PROCSWIN_TINY_ARGS, PROCVIT_TINY_ARGS

    if arch == EMBEDDED_MODEL:
        # vit_tiny_patch16_224's builder passes keyword arguments over its own: the arguments set every field
        # in which visadapt_procvit_tiny differs from VisionTransformer's defaults
        return "vit_tiny_patch16_224", dict(PROCVIT_TINY_ARGS)
    if arch == EMBEDDED_SWIN:
        # the same for swin_tiny_patch4_window7_224: the arguments cover every field the embedded Swin changes
        return "swin_tiny_patch4_window7_224", dict(PROCSWIN_TINY_ARGS)
    return None


def _reload_timm(folder: Path) -> nn.Module:
    import timm

    return timm.create_model(f"local-dir:{folder}", pretrained=True)


def _write_open_clip(model: nn.Module, folder: Path, facts: dict[str, Any]) -> dict[str, Any]:
    import open_clip
    from safetensors.torch import save_file

    from visadapt.backbones import EMBEDDED_CLIP, TINY_CLIP_CONFIG

    name = facts["name"]
    model_cfg = TINY_CLIP_CONFIG if name == EMBEDDED_CLIP else open_clip.get_model_config(name)
    if model_cfg is None:
        raise ExportError(f"open_clip has no config for {name!r}; see open_clip.list_models()")
    preprocess = {"mean": list(facts["preprocess"]["mean"]), "std": list(facts["preprocess"]["std"])}
    for key in ("interpolation", "resize_mode"):
        value = (getattr(model.visual, "preprocess_cfg", None) or {}).get(key)
        if value is not None:
            preprocess[key] = value
    # open_clip's hub layout (push_to_hf_hub.save_for_hf), without the tokenizer files it would add
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                             indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    loader = "open_clip.create_model('local-dir:{dir}')"
    if name != EMBEDDED_CLIP:
        loader += f" or open_clip.create_model({name!r}, pretrained='{{dir}}/open_clip_model.safetensors')"
    return {"files": ["open_clip_model.safetensors", "open_clip_config.json"], "architecture": name,
            "loader": loader}


def _reload_open_clip(folder: Path) -> nn.Module:
    import open_clip

    return open_clip.create_model(f"local-dir:{folder}")


def _write_diffusers(model: nn.Module, folder: Path) -> dict[str, Any]:
    model.save_pretrained(str(folder), safe_serialization=True)
    cls = type(model).__name__
    return {"files": sorted(p.name for p in folder.iterdir() if p.is_file()), "architecture": cls,
            "loader": f"diffusers.{cls}.from_pretrained('{{dir}}')"}


def _reload_diffusers(folder: Path, cls_name: str) -> nn.Module:
    import diffusers

    return getattr(diffusers, cls_name).from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------------- ONNX


def require_onnx() -> None:
    """Raise :class:`ExportError` with the install command unless onnx, onnxruntime and onnxscript import."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--onnx needs onnx, onnxruntime and onnxscript (torch's ONNX exporter); missing: "
                          f"{', '.join(missing)}. Install them with: {ONNX_INSTALL_HINT}")


def export_onnx(runner: ModelOutputs, inputs: dict[str, torch.Tensor], names: Sequence[str],
                path: Path) -> dict[str, Any]:
    """Write ``runner`` as an ONNX graph with ``torch.onnx.export(dynamo=True)``.

    The torch.export-based exporter is torch's default since 2.9 and the TorchScript one is deprecated (a
    ``DeprecationWarning`` on every call, and no fallback between them since 2.11), so this uses the dynamo
    exporter, which also traces visadapt's forward hooks as ordinary graph ops. The batch dimension is dynamic
    when the probe batch has two or more examples (torch.export specialises sizes 0 and 1).
    """
    weight_bytes = sum(t.numel() * t.element_size() for t in runner.state_dict().values())
    dynamic = next(iter(inputs.values())).shape[0] >= 2
    batch = torch.export.Dim("batch")
    # ModelOutputs.forward(*tensors): one entry for its *args, holding one spec per input tensor
    dynamic_shapes = (tuple({0: batch} for _ in inputs),) if dynamic else None
    try:
        with warnings.catch_warnings():
            # every input shares the one batch dimension; the exporter notes that it keeps one name for it
            warnings.filterwarnings("ignore", message=".*The axis name: batch will not be used")
            program = torch.onnx.export(runner.eval(), tuple(inputs.values()), dynamo=True, verbose=False,
                                        input_names=list(inputs), output_names=list(names),
                                        dynamic_shapes=dynamic_shapes, optimize=True)
    except Exception as err:
        first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()[:1]
        raise ExportError(f"torch.onnx.export (dynamo exporter) failed on {type(runner.model).__name__}: "
                          f"{type(err).__name__}: {' '.join(first_line)}") from err
    external = weight_bytes > ONNX_EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    opset = next((entry.version for entry in program.model_proto.opset_import if entry.domain in ("", "ai.onnx")),
                 None)
    files = [path.name] + ([f"{path.name}.data"] if external else [])
    return {"files": files, "exporter": "torch.onnx.export(dynamo=True)", "opset": opset,
            "dynamic_batch": dynamic, "external_data": external}


def run_onnxruntime(path: Path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {entry.name: inputs[entry.name].numpy() for entry in session.get_inputs()}
    return [torch.from_numpy(value) for value in session.run(None, feed)]


# ------------------------------------------------------------------------------------------------- export


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("visadapt", "torch", "timm", "open_clip_torch", "diffusers", "safetensors", "onnx", "onnxruntime",
                 "onnxscript"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _previous_report(to: Path) -> dict[str, Any] | None:
    try:
        return json.loads((to / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None


def _check_output_dir(to: Path, overwrite: bool) -> None:
    """Refuse a ``--to`` that would lose files: a non-empty folder is taken only when it holds nothing but a
    failed export's report, or, with ``overwrite``, when it is an earlier export (it has an export report)."""
    if to.exists() and not to.is_dir():
        raise ExportError(f"--to {to} is a file; give a folder")
    entries = sorted(p.name for p in to.iterdir()) if to.is_dir() else []
    if not entries:
        return
    previous = _previous_report(to)
    if entries == [REPORT_FILE] and previous is not None and previous.get("status") == "failed":
        return
    if previous is None:
        raise ExportError(f"--to {to} holds files that are not a visadapt export ({', '.join(entries[:5])}); "
                          f"choose an empty or new folder")
    if not overwrite:
        raise ExportError(f"--to {to} is not empty (an earlier export); pass --overwrite to replace it or choose "
                          f"another folder")


def _empty_output_dir(to: Path) -> None:
    """Create ``to``, emptied of an earlier export (checked by :func:`_check_output_dir`)."""
    if to.is_dir():
        shutil.rmtree(to)
    to.mkdir(parents=True)


def _num_classes(tensors: dict[str, torch.Tensor], head: str | None) -> int:
    weight = tensors.get(f"{head}.weight") if head else None
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else 0


@dataclass
class AdapterOnBase:
    """An adapter file read once (tensors and header, checksum checked) and the base model it is exported on:
    what both exports (:func:`export_model`, :func:`visadapt.interop_export.export_file`) start from.

    ``model_spec``: the ``--model`` given, else the backbone the file records. ``recorded_pretrained`` / ``seed``:
    the weights and seed of the training run the file records, which describe the recorded backbone only: on
    another ``--model`` they are None and 0."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    model_spec: str
    recorded_pretrained: str | None
    seed: int

    @property
    def head(self) -> str | None:
        return self.meta.get("head") or None

    @property
    def num_classes(self) -> int:
        """The class count of the head stored in the file (a timm model is built with it), else 0."""
        return _num_classes(self.tensors, self.head)

    def build_base(self, pretrained: str, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        """:func:`build_base_model` of ``model_spec``, random init seeded with ``seed``."""
        return build_base_model(self.model_spec, pretrained, num_classes=num_classes, seed=self.seed)

    def load_into(self, host: nn.Module) -> None:
        """Load the adapter into ``host`` (as :func:`visadapt.load_adapter` loads the file, from the tensors read)
        and put it in eval mode: dropout and MoSA's module sampling off, the outputs compared are the inference
        ones."""
        load_adapter_tensors(host, self.tensors, self.meta, source=str(self.path))
        host.eval()


def read_adapter_on_base(adapter: str | os.PathLike, model: str | None = None) -> AdapterOnBase:
    """Read ``adapter`` (once) and decide its base model: ``model`` (a timm name, ``open_clip:NAME``, a diffusers
    folder), else the one the file records (:func:`recorded_model_spec`). Raises :class:`ExportError` when neither
    names one."""
    adapter = Path(adapter)
    tensors, meta = read_adapter_file(adapter)
    recorded_model, recorded_pretrained, seed = recorded_model_spec(meta, adapter)
    if model is None and recorded_model is None:
        raise ExportError(f"{adapter} does not record its base model (no {TRAIN_METADATA!r} metadata naming it); "
                          f"pass --model: a timm name, open_clip:NAME, or a diffusers UNet/pipeline folder")
    if model is not None and model != recorded_model:  # another backbone: the recorded weights and seed are not its
        recorded_pretrained, seed = None, 0
    return AdapterOnBase(adapter, tensors, meta, model or recorded_model, recorded_pretrained, seed)


def export_model(adapter: str | os.PathLike, model: str | None = None, *, to: str | os.PathLike,
                 pretrained: str | None = None, onnx: bool = False, probe_size: int = 2,
                 num_classes: int | None = None, tolerance: float = DENSE_RTOL, onnx_tolerance: float = ONNX_RTOL,
                 overwrite: bool = False) -> dict[str, Any]:
    """Merge ``adapter`` into its base model, write the dense model (and with ``onnx`` an ONNX graph) to ``to``,
    check each reloaded artifact against the adapted model, and return the export report.

    ``model``: a timm name, ``open_clip:NAME`` or a diffusers UNet / pipeline folder; default: the backbone the
    adapter file records (``visadapt.train`` metadata). ``pretrained``: its weights, ``default`` / ``none`` / a
    file / a tag (default: what the file records, else ``default``). ``probe_size``: the number of examples in the
    seeded probe batch. ``num_classes``: timm head size (default: the head stored in the file, else 0).
    ``tolerance`` / ``onnx_tolerance``: relative parity tolerances (see :func:`compare`).

    Raises :class:`ExportError` for inputs that cannot be exported (a plugin that does not fold into base weights,
    without ``onnx``; onnx packages missing) and :class:`ExportParityError` when a reloaded artifact differs.
    """
    if onnx:
        require_onnx()
    adapter = Path(adapter)
    source = read_adapter_on_base(adapter, model)
    meta, model_spec = source.meta, source.model_spec
    pretrained = pretrained or source.recorded_pretrained or "default"
    plugin = get_plugin(meta["plugin"])
    if not plugin.mergeable and not onnx:
        raise ExportError(f"plugin {plugin.name!r} ({adapter}) does not fold into base weights: "
                          f"{plugin.merge_refusal}. A dense {resolve_library(model_spec)} checkpoint cannot hold it; "
                          f"pass --onnx to export the adapted graph (adapter modules included) instead")
    to = Path(to)
    _check_output_dir(to, overwrite)
    head = source.head
    if num_classes is None:
        num_classes = source.num_classes

    # Steps, not bytes: building the base, merging, writing and reloading, ONNX each take seconds to minutes.
    steps = Progress(total=3 + bool(onnx), desc="visadapt export: building the base model", unit="steps")
    host, facts = source.build_base(pretrained, num_classes)
    library = facts["library"]
    source.load_into(host)
    del source  # the adapter's tensors are in host now
    inputs = probe_inputs(host, library, probe_size)
    names_in = list(inputs)
    reference = run_outputs(ModelOutputs(host, library, names_in), inputs)
    names_out = output_names(library, len(reference), num_classes)

    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "status": "running",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "adapter": {"file": str(adapter.resolve()), "sha256": file_sha256(adapter), "bytes": adapter.stat().st_size,
                    "plugin": plugin.name, "config": json.loads(meta["config"]), "head": head},
        "base_model": {"spec": model_spec, "library": library, "pretrained": pretrained,
                       "class": f"{type(host).__module__}.{type(host).__qualname__}"},
        "dtype": "float32",
        "probe": {"batch": probe_size, "seed": PROBE_SEED,
                  "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                             for k, v in inputs.items()},
                  "outputs": {k: list(v.shape) for k, v in zip(names_out, reference, strict=True)}},
        "folded": False, "merge_output_difference": None, "checks": [], "versions": library_versions(),
    }
    _empty_output_dir(to)
    staging = Path(tempfile.mkdtemp(prefix=".visadapt-export-", dir=to))
    try:
        steps.update(1)
        steps.set_description("visadapt export: merging")
        unfolded = _merge(host, plugin, inputs, reference, report)
        steps.update(1)
        if unfolded and not onnx:
            raise ExportError(f"plugin {plugin.name!r} merged, but {len(unfolded)} of its modules still compute on "
                              f"their own ({', '.join(unfolded[:3])}{', ...' if len(unfolded) > 3 else ''}): they "
                              f"do not fold into base weights, so a dense {library} checkpoint cannot hold them; "
                              f"pass --onnx to export the adapted graph (adapter modules included) instead")
        onnx_model = host
        steps.set_description("visadapt export: writing and reloading the dense model")
        if report["folded"]:
            onnx_model = _write_dense(host, facts, staging, inputs, reference, names_out, tolerance, report)
            del host
        steps.update(1)  # counted also when nothing folded (an ONNX-only export): the step is done
        if onnx:
            steps.set_description("visadapt export: ONNX graph and onnxruntime check")
            graph = "merged dense model" if report["folded"] else "adapted model (adapter modules included)"
            runner = ModelOutputs(onnx_model, library, names_in)
            info = export_onnx(runner, inputs, names_out, staging / ONNX_FILE)
            check = compare(reference, run_onnxruntime(staging / ONNX_FILE, inputs), names_out, onnx_tolerance)
            report["checks"].append({"artifact": "onnx", "graph": graph, **info,
                                     "runtime": "onnxruntime CPUExecutionProvider",
                                     "loader": f"onnxruntime.InferenceSession('{{dir}}/{ONNX_FILE}')", **check})
            steps.update(1)
        failed = [c for c in report["checks"] if not c["passed"]]
        if failed:
            report["status"] = "failed"
            raise ExportParityError(_parity_message(failed, to), report)
        umask = os.umask(0)
        os.umask(umask)
        for path in staging.iterdir():
            path.chmod(0o666 & ~umask)  # some writers create files private to the owner; an export is to share
            os.replace(path, to / path.name)
        report["status"] = "ok"
        report["files"] = sorted(name for check in report["checks"] for name in check["files"]) + [REPORT_FILE]
        return report
    except BaseException as err:
        if report["status"] != "failed":
            report["status"] = "failed"
            report["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        steps.close()
        shutil.rmtree(staging, ignore_errors=True)
        for check in report["checks"]:
            check["loader"] = check["loader"].replace("{dir}", str(to))
        write_json_atomic(to / REPORT_FILE, _json_safe(report))


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("inf", "nan"): the report stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _merge(host: nn.Module, plugin, inputs: dict[str, torch.Tensor], reference: list[torch.Tensor],
           report: dict[str, Any]) -> list[str]:
    """Merge every adapter of ``host`` where the plugin can; returns the modules left unfolded (all of them for a
    plugin that cannot merge). Records the output change merging caused."""
    if not plugin.mergeable:
        return unfolded_modules(host)
    api.merge(host)
    merged = run_outputs(ModelOutputs(host, report["base_model"]["library"], list(inputs)), inputs)
    report["merge_output_difference"] = max(
        ((m - r).abs().max().item() for m, r in zip(merged, reference, strict=True) if r.numel()), default=0.0)
    unfolded = unfolded_modules(host)
    report["folded"] = not unfolded
    return unfolded


def _write_dense(host: nn.Module, facts: dict[str, Any], staging: Path, inputs: dict[str, torch.Tensor],
                 reference: list[torch.Tensor], names_out: list[str], rtol: float,
                 report: dict[str, Any]) -> nn.Module:
    """Strip visadapt from the merged ``host``, write it in its library's layout to ``staging``, reload it there with
    that library alone and record the parity check; returns the reloaded model."""
    library = facts["library"]
    strip_adapters(host, dense_state_dict(host))
    if library == "timm":
        info = _write_timm(host, staging)
        fresh = _reload_timm(staging)
    elif library == "open_clip":
        info = _write_open_clip(host, staging, facts)
        fresh = _reload_open_clip(staging)
    else:
        info = _write_diffusers(host, staging)
        fresh = _reload_diffusers(staging, info["architecture"])
    fresh = fresh.float().eval()
    got = run_outputs(ModelOutputs(fresh, library, list(inputs)), inputs)
    check = compare(reference, got, names_out, rtol)
    report["checks"].append({"artifact": "dense", "library": library, **info, **check})
    return fresh


def _parity_message(failed: list[dict[str, Any]], to: Path) -> str:
    parts = []
    for check in failed:
        tolerance = "-" if check["tolerance"] is None else f"{check['tolerance']:.3g}"
        parts.append(f"{check['artifact']} ({', '.join(check['files'])}): max |diff| {check['max_abs_diff']:.3g} "
                     f"on output {check['worst_output']!r}, tolerance {tolerance}"
                     + (f" ({check['problem']})" if check.get("problem") else ""))
    return ("exported model does not reproduce the adapted model's outputs; nothing was kept. "
            + "; ".join(parts) + f". Report: {to / REPORT_FILE}")


def format_report(report: dict[str, Any]) -> str:
    """The export report as a few lines for the terminal."""
    adapter, base = report["adapter"], report["base_model"]
    lines = [(f"{adapter['plugin']} adapter {Path(adapter['file']).name} (sha256 {adapter['sha256'][:12]}) on "
              f"{base['spec']} [{base['library']}, pretrained={base['pretrained']}]")]
    probe = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in report["probe"]["inputs"].items())
    lines.append(f"  probe:   {probe}; model dtype {report['dtype']}")
    if report["folded"]:
        lines.append(f"  merged into the base weights (merging changed the outputs by "
                     f"{report['merge_output_difference']:.3g}); no visadapt module left")
    else:
        lines.append(f"  {adapter['plugin']} does not fold into base weights: ONNX of the adapted graph only")
    for check in report["checks"]:
        what = check.get("exporter") or f"{check['library']} layout"
        relation, verdict = ("<=", "ok") if check["passed"] else (">", "FAILED")
        tolerance = "-" if check["tolerance"] is None else f"{check['tolerance']:.3g}"
        lines.append(f"  {' + '.join(check['files'])} ({what}): max |diff| {check['max_abs_diff']:.3g} {relation} "
                     f"tolerance {tolerance} (output {check['worst_output']}): {verdict}")
        lines.append(f"      load with {check['loader']}")
    lines.append(f"  status:  {report['status']}")
    return "\n".join(lines)


__all__ = ["AdapterOnBase", "ExportError", "ExportParityError", "ModelOutputs", "build_base_model", "compare",
           "export_model", "format_report", "probe_inputs", "read_adapter_on_base", "resolve_library"]
