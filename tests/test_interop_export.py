"""Exact export to PEFT / diffusers / the official ResAdapter layout, checked against each owner's own loader
(``PeftModel.from_pretrained``, ``pipe.load_lora_weights``, ``unet.load_state_dict``) on tiny models."""
from __future__ import annotations

import copy
import json

import pytest
import tiny_models
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import visadapt
from tests.pipeline_helpers import generate_np as generate
from visadapt.export import ExportError
from visadapt.interop_export import export_diffusers, export_peft, export_resadapter
from visadapt.layers import LoRA
from visadapt.sites import find_sites

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("_one_thread")  # fixtures (base_pipe, pipe): tests/conftest.py


def randomize(model, head=None, std=0.1, seed=0):
    """Non-zero adapter (and head) weights: LoRA's B starts at zero, which would make every export trivially equal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visadapt_adapters" in name or (head and name.startswith(f"{head}.")):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def unet_out(unet, seed=3):
    (sample, timestep), kwargs = tiny_models.example_input("diffusers_unet", unet, seed=seed)
    with torch.no_grad():
        return tiny_models.output_tensor(unet(sample, timestep, **kwargs))


def vit_with_qv_lora(q_rank_alpha=(4, 8.0), v_rank_alpha=(2, 6.0)):
    """A tiny timm ViT with q and v LoRAs of different ranks/alphas on the fused qkv, an fc1 LoRA and a head.

    visadapt's config gives q and v of one layer the same rank (patterns are keyed by layer); the exporter reads
    each module's own rank and scale, so the v LoRAs are inserted with their own rank and alpha here."""
    model = tiny_models.vit().eval()
    base = copy.deepcopy(model)
    visadapt.attach(model, "lora", rank=q_rank_alpha[0], alpha=q_rank_alpha[1], targets=("q", "fc1"), head="head",
                    rank_pattern={"blocks.1.mlp.fc1": 3}, alpha_pattern={"blocks.1.mlp.fc1": 1.5})
    for site in find_sites(model, ["v"]):
        visadapt.inject.insert(site, "default", LoRA(site.in_features, site.out_features, *v_rank_alpha))
    randomize(model, head="head")
    return model, base


def vit_out(model):
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("v_rank_alpha", [(2, 6.0), (4, 8.0)], ids=["different_scales", "equal_scales"])
def test_timm_qv_lora_with_head_loads_in_peft_from_pretrained_with_visadapts_outputs(tmp_path, v_rank_alpha):
    from peft import PeftModel

    model, base = vit_with_qv_lora(v_rank_alpha=v_rank_alpha)
    expected = vit_out(model)
    written = export_peft(model, tmp_path / "peft")
    assert {p.name for p in written.values()} == {"adapter_config.json", "adapter_model.safetensors"}

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    got = vit_out(peft_model)
    assert (got - expected).abs().max().item() <= TOL
    assert (vit_out(base) - expected).abs().max().item() > 1e-2  # the adapter matters: the check can fail

    # one LoRA of rank r_q + r_v on qkv (96 wide = 3 x 32): A stacked, B block-structured, zero k rows
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    rank = 4 + v_rank_alpha[0]
    lora_a = tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"]
    lora_b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert lora_a.shape == (rank, 32) and lora_b.shape == (96, rank)
    assert torch.count_nonzero(lora_b[32:64]) == 0  # k rows
    assert torch.count_nonzero(lora_b[:32, 4:]) == 0 and torch.count_nonzero(lora_b[64:, :4]) == 0
    assert {"base_model.model.head.weight", "base_model.model.head.bias"} <= set(tensors)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head"]
    assert config["rank_pattern"][r"^blocks\.1\.mlp\.fc1"] == 3 and config["alpha_pattern"][r"^blocks\.1\.mlp\.fc1"]
    # qkv layers are the most common (r, alpha): scales 2 and 3 differ, so they are folded into B at scale 1;
    # equal scales (2) stay the layer's scale
    assert config["r"] == rank and config["lora_alpha"] == (rank if v_rank_alpha == (2, 6.0) else 2.0 * rank)
    peft_qkv = peft_model.base_model.model.blocks[0].attn.qkv
    assert peft_qkv.r["default"] == rank  # the anchored pattern reached exactly this layer


def test_unet_lora_to_diffusers_folder_loads_with_load_lora_weights_like_load_visadapt(pipe, base_pipe, tmp_path):
    visadapt.attach(pipe.unet, "lora", rank=4, alpha=8.0, targets=("to_q", "to_v", "conv1"),
                    rank_pattern={"down_blocks.1.resnets.0.conv1": 2},
                    alpha_pattern={"up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2.0})
    randomize(pipe.unet)
    adapter_file = visadapt.save_adapter(pipe.unet, tmp_path / "lora.safetensors")
    ours_pipe = copy.deepcopy(base_pipe)
    ours_pipe.load_visadapt(str(adapter_file))
    ours = generate(ours_pipe)

    export_diffusers(ours_pipe.unet, tmp_path / "diffusers")
    with safe_open(str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8.0
    assert metadata["unet.rank_pattern"] == {r"^down_blocks\.1\.resnets\.0\.conv1": 2}
    theirs = copy.deepcopy(base_pipe)
    theirs.load_lora_weights(str(tmp_path / "diffusers"))
    assert abs(generate(theirs) - ours).max() <= TOL
    assert abs(generate(base_pipe) - ours).max() > 1e-3


def test_unet_lora_to_peft_folder_loads_with_peft_from_pretrained(tmp_path):
    from peft import PeftModel

    unet = tiny_models.unet().eval()
    base = copy.deepcopy(unet)
    visadapt.attach(unet, "lora", rank=4, alpha=8.0, targets=("to_q", "to_v", "conv1"),
                    rank_pattern={"down_blocks.0.resnets.0.conv1": 2}, alpha_pattern={"down_blocks.0.resnets.0.conv1": 1.0})
    randomize(unet)
    expected = unet_out(unet)
    assert (unet_out(base) - expected).abs().max().item() > 1e-3  # the adapter matters: the check can fail
    export_peft(unet, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert (unet_out(loaded.base_model.model) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("config", [{}, {"lora_targets": ("conv1", "conv2"), "lora_blocks": ("down", "mid", "up")},
                                    {"norm": False}], ids=["released_layout", "resnet_convs", "interpolation_only"])
def test_resadapter_to_the_official_layout_loads_the_official_way(pipe, base_pipe, tmp_path, config):
    visadapt.attach(pipe.unet, "resadapter", **config)
    randomize(pipe.unet, std=0.05)
    with torch.no_grad():  # norms away from the base's, so that their loading matters
        for item in visadapt.inject.attached(pipe.unet):
            if not isinstance(item.module, LoRA):
                item.module.weight.add_(0.2)
    visadapt.set_weight(pipe.unet, "default", 0.5)
    ours = generate(pipe)
    with pytest.warns(UserWarning, match="hold it at weight 1"):
        written = export_resadapter(pipe.unet, tmp_path / "res")
    assert sorted(p.name for p in written.values()) == (["pytorch_lora_weights.safetensors"] if "norm" in config else
                                                        ["diffusion_pytorch_model.safetensors",
                                                         "pytorch_lora_weights.safetensors"])
    official = copy.deepcopy(base_pipe)
    official.load_lora_weights(str(tmp_path / "res"), weight_name="pytorch_lora_weights.safetensors",
                               adapter_name="res_adapter")
    official.set_adapters(["res_adapter"], adapter_weights=[0.5])
    if "norms" in written:
        official.unet.load_state_dict(load_file(str(written["norms"])), strict=False)
    assert abs(generate(official) - ours).max() <= TOL
    assert abs(generate(base_pipe) - ours).max() > 1e-3


def test_what_has_no_exact_form_is_refused_with_the_reason_and_nothing_is_written(pipe, tmp_path):
    out = tmp_path / "out"
    kbit = tiny_models.vit()
    visadapt.attach(kbit, "lora", bits=4, targets=("fc1",))
    with pytest.raises(ExportError, match=r"k-bit LoRA \(blocks\.0\.mlp\.fc1:fc1 \(4 bits\).*attach with bits=32"):
        export_peft(kbit, out)
    clip = tiny_models.clip()
    visadapt.attach(clip, "lora", targets=("q", "v"))
    with pytest.raises(ExportError, match=r"in_proj_weight and its q/k/v slices.*visual\.transformer\.resblocks"
                                          r"\.0\.attn:q.*no PEFT LoRA layer can"):
        export_peft(clip, out)
    bottleneck = tiny_models.vit()
    visadapt.attach(bottleneck, "adapter")
    with pytest.raises(ExportError, match="plugin 'adapter' holds modules that are not LoRA.*BottleneckAdapter"):
        export_peft(bottleneck, out)
    visadapt.attach(pipe.unet, "resadapter")
    with pytest.raises(ExportError, match="ResolutionNorm.*--format resadapter writes the official two files"):
        export_diffusers(pipe.unet, out)
    vit = tiny_models.vit()
    visadapt.attach(vit, "lora")
    with pytest.raises(ExportError, match="diffusers LoRA file is for a diffusers UNet.*--format peft"):
        export_diffusers(vit, out)
    with pytest.raises(ExportError, match="is a lora adapter; the ResAdapter layout holds resadapter adapters"):
        export_resadapter(vit, out)
    assert not out.exists()
    export_peft(vit, out)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ExportError, match="already holds adapter_config.json, adapter_model.safetensors; pass "
                                          "overwrite=True"):
        export_peft(vit, out)
    assert (out / "adapter_model.safetensors").read_bytes() == before and sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # no staging folder left behind


def test_lora_state_to_peft_keeps_both_slices_of_a_fused_qkv():
    from visadapt.lora_layouts import lora_state_to_peft

    model, _ = vit_with_qv_lora()
    state = lora_state_to_peft(model, "default", prefix="")
    assert state["blocks.0.attn.qkv.lora_B.weight"].shape == (96, 6)  # was (32, r): the q LoRA lost
    qkv = model.blocks[0].attn.qkv
    expected = sum(item.module.delta_weight() if item.module.site_rows is None else
                   torch.nn.functional.pad(item.module.delta_weight(),
                                           (0, 0, item.module.site_rows[0], 96 - item.module.site_rows[1]))
                   for item in visadapt.inject.attached(model) if item.host_path == "blocks.0.attn.qkv")
    got = state["blocks.0.attn.qkv.lora_B.weight"] @ state["blocks.0.attn.qkv.lora_A.weight"]
    assert qkv.weight.shape == got.shape and (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("format, files", [
    ("peft", ["adapter_config.json", "adapter_model.safetensors"]),
    ("diffusers", ["pytorch_lora_weights.safetensors"]),
    ("resadapter", ["diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors"]),
])
def test_cli_export_format_writes_the_folder_checked_by_the_owning_library(tmp_path, capsys, base_pipe, format,
                                                                          files):
    from visadapt.backbones import EMBEDDED_SD
    from visadapt.cli import main
    from visadapt.diffusion import load_pipeline

    unet = load_pipeline(EMBEDDED_SD).unet
    plugin = "resadapter" if format == "resadapter" else "lora"
    visadapt.attach(unet, plugin, **({} if plugin == "resadapter" else {"targets": ("to_q", "to_v", "conv1")}))
    randomize(unet, std=0.05)
    adapter = visadapt.save_adapter(unet, tmp_path / "adapter.safetensors")
    out = tmp_path / "out"
    assert main(["export", "--format", format, str(adapter), "--model", EMBEDDED_SD, "--to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loaded by its own library: max |diff|" in printed and ": ok" in printed
    assert sorted(p.name for p in out.iterdir()) == files
    assert main(["export", "--format", format, str(adapter), "--model", EMBEDDED_SD, "--to", str(out)]) == 2
    assert "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    if format == "diffusers":
        theirs = copy.deepcopy(base_pipe)
        theirs.load_lora_weights(str(out))
        ours = copy.deepcopy(base_pipe)
        ours.load_visadapt(str(adapter))
        assert abs(generate(theirs) - generate(ours)).max() <= TOL
    if format == "resadapter":
        lora_only = visadapt.save_adapter(unet, tmp_path / "lora_only.safetensors")  # not a lora plugin: refused
        assert main(["export", "--format", "peft", str(lora_only), "--model", EMBEDDED_SD, "--to",
                     str(tmp_path / "p")]) == 2
        assert "holds modules that are not LoRA" in capsys.readouterr().err


@pytest.mark.parametrize("every_module_rslora", [False, True],
                         ids=["mixed_modules_alpha_written_for_peft_formula", "use_rslora"])
def test_rslora_scale_is_read_from_each_module_not_from_a_formula(tmp_path, every_module_rslora):
    """rsLoRA scales by alpha / sqrt(r), attached for real (``use_rslora=True``). PEFT's ``use_rslora`` is one flag
    per config: when every module is rsLoRA it is written with the user's alpha; when a plain LoRA sits beside
    them (inserted on its own, so the adapter's config still says use_rslora) the export must read each module's
    flag, write use_rslora=False and give every module the alpha whose alpha / r is its scale."""
    from peft import PeftModel

    model = tiny_models.vit().eval()
    base = copy.deepcopy(model)
    visadapt.attach(model, "lora", rank=4, alpha=3.0, use_rslora=True, targets=("qkv", "fc1"),
                    rank_pattern={"blocks.1.mlp.fc1": 2})
    assert all(item.module.rslora for item in visadapt.inject.attached(model))
    if not every_module_rslora:
        for site in find_sites(model, ["proj"]):  # plain LoRA: scale 3 / 4, alpha 3 kept
            visadapt.inject.insert(site, "default", LoRA(site.in_features, site.out_features, 4, 3.0))
    assert visadapt.api.get_record(model, "default").config.use_rslora  # the config says rsLoRA either way
    randomize(model)
    expected = vit_out(model)
    assert (vit_out(base) - expected).abs().max().item() > 1e-2  # the adapter matters: the check can fail
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] is every_module_rslora
    if every_module_rslora:  # the user's alpha, PEFT applies sqrt itself
        assert config["lora_alpha"] == 3.0 and not config["alpha_pattern"]
    else:  # alpha = scale * r for the rsLoRA modules, so that PEFT's alpha / r is the module's alpha / sqrt(r)
        assert config["lora_alpha"] == pytest.approx(3.0 * 2) and config["alpha_pattern"]
        assert config["alpha_pattern"][r"^blocks\.0\.attn\.proj"] == 3.0
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert (vit_out(loaded) - expected).abs().max().item() <= TOL


def test_open_clip_mlp_lora_of_both_towers_loads_in_peft_with_visadapts_outputs(tmp_path):
    from peft import PeftModel

    model = tiny_models.clip().eval()
    base = copy.deepcopy(model)
    visadapt.attach(model, "lora", targets=("fc1", "fc2"), towers=("visual", "text"), rank=2, alpha=5.0)
    randomize(model)
    (image, text), _ = tiny_models.example_input("open_clip", model, seed=2)

    def features(clip):
        with torch.no_grad():
            return torch.cat([clip.encode_image(image), clip.encode_text(text)])

    expected, unadapted = features(model), features(base)
    assert (unadapted - expected).abs().max().item() > 1e-3  # the adapter matters: the check can fail
    export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert (features(loaded.base_model.model) - expected).abs().max().item() <= TOL


def test_cli_export_that_fails_its_parity_check_writes_nothing(tmp_path, capsys, monkeypatch):
    from visadapt import interop_export
    from visadapt.backbones import EMBEDDED_SD
    from visadapt.cli import main
    from visadapt.diffusion import load_pipeline

    unet = load_pipeline(EMBEDDED_SD).unet
    visadapt.attach(unet, "lora", targets=("to_q",))
    randomize(unet)
    adapter = visadapt.save_adapter(unet, tmp_path / "adapter.safetensors")
    # a loader that drops the adapter: the check compares the plain base model with visadapt's outputs
    monkeypatch.setattr(interop_export, "_owner_loaded", lambda base, folder, format: base)
    out = tmp_path / "out"
    assert main(["export", "--format", "diffusers", str(adapter), "--model", EMBEDDED_SD, "--to", str(out)]) == 1
    assert "does not reproduce visadapt's outputs" in capsys.readouterr().err
    assert not out.exists()


def test_cli_export_peft_of_a_timm_qv_lora_with_head_recorded_by_a_train_script(tmp_path, capsys):
    from peft import PeftModel

    from visadapt.backbones import create_backbone
    from visadapt.cli import main
    from visadapt.io import TRAIN_METADATA

    model = create_backbone("visadapt_procvit_tiny", "default", num_classes=5).eval()
    base = copy.deepcopy(model)
    visadapt.attach(model, "lora", rank=4, alpha=8.0, targets=("q", "v", "fc1"), head="head")
    randomize(model, head="head", std=0.05)
    run = {"model": "visadapt_procvit_tiny", "pretrained": "default", "seed": 0}  # what train/vtab.py records
    adapter = visadapt.save_adapter(model, tmp_path / "lora.safetensors", metadata={TRAIN_METADATA: json.dumps(run)})
    out = tmp_path / "peft"
    assert main(["export", "--format", "peft", str(adapter), "--to", str(out)]) == 0
    assert f"PeftModel.from_pretrained(base_model, '{out}')" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "visadapt_procvit_tiny" and config["r"] == 8  # q + v on qkv
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(images)
        got = PeftModel.from_pretrained(base, str(out)).eval()(images)
    assert (got - expected).abs().max().item() <= TOL
    assert main(["export", "--format", "diffusers", str(adapter), "--to", str(tmp_path / "d")]) == 2
    assert "a diffusers LoRA file is for a diffusers UNet; this model is timm" in capsys.readouterr().err


def test_target_modules_and_patterns_are_exact_even_when_a_path_is_the_suffix_of_another_modules_path():
    """PEFT's list form of target_modules also matches ``<anything>.<target>``, and its pattern keys match any
    dotted suffix; a model holding ``fc`` and ``inner.fc`` (visadapt's families have no such pair, so the config
    is built for a plain module) gets one full-match regex and anchored pattern keys, which PEFT's own
    ``get_peft_model`` applies to ``fc`` alone."""
    from peft import get_peft_model

    from visadapt.interop_export import ExactLora, lora_config

    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.inner = torch.nn.Sequential()
            self.inner.fc = torch.nn.Linear(8, 8)
            self.other = torch.nn.Linear(8, 8)

    loras = {"fc": ExactLora("fc", torch.zeros(2, 8), torch.zeros(8, 2), 4.0, 2.0),
             "other": ExactLora("other", torch.zeros(3, 8), torch.zeros(8, 3), 4.0, 4 / 3)}
    config = lora_config(Nested(), loras)
    assert config.target_modules == "^(?:fc|other)$" and config.rank_pattern == {r"^other": 3}
    wrapped = get_peft_model(Nested(), config)
    adapted = {name.removeprefix("base_model.model."): module.r["default"]
               for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"fc": 2, "other": 3}  # inner.fc untouched


def test_exact_loras_read_the_layer_under_a_peft_wrapper_as_without_it():
    """Host paths are canonical (no ``.base_layer``): with PEFT's own LoRA wrapping the same layers, the export
    resolves the real layer under the wrapper and gives exactly what it gives without PEFT."""
    from peft import LoraConfig, inject_adapter_in_model

    from visadapt.interop_export import exact_loras

    model, _ = vit_with_qv_lora()
    unwrapped = exact_loras(model, "default")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["qkv", "fc1"]), model, adapter_name="other")
    assert hasattr(model.blocks[0].attn.qkv, "base_layer")  # PEFT wrapped the layer visadapt adapts
    wrapped = exact_loras(model, "default")
    assert sorted(wrapped) == sorted(unwrapped) and "blocks.0.attn.qkv" in wrapped
    for path, lora in unwrapped.items():
        other = wrapped[path]
        assert torch.equal(other.down, lora.down) and torch.equal(other.up, lora.up)
        assert (other.alpha, other.scale, other.rslora) == (lora.alpha, lora.scale, lora.rslora)


def test_an_earlier_exports_norm_file_is_removed_by_every_resadapter_export(base_pipe, tmp_path):
    """An adapter without norms (``norm=False``) writes the LoRA file only; a norm file left in the folder by an
    earlier export would be loaded with it by the official code, so each way of exporting removes it (and leaves
    no staging folder behind)."""
    from visadapt.backbones import EMBEDDED_SD
    from visadapt.diffusion import load_pipeline
    from visadapt.interop_export import export_file
    from visadapt.plugins.resadapter import export_official

    with_norms, lora_only = copy.deepcopy(base_pipe.unet), load_pipeline(EMBEDDED_SD).unet
    visadapt.attach(with_norms, "resadapter")
    visadapt.attach(lora_only, "resadapter", norm=False)
    adapter = visadapt.save_adapter(lora_only, tmp_path / "lora_only.safetensors")
    exports = {"export_official": lambda folder: export_official(lora_only, folder),
               "export_resadapter": lambda folder: export_resadapter(lora_only, folder, overwrite=True),
               "export_file": lambda folder: export_file(adapter, "resadapter", folder, model=EMBEDDED_SD,
                                                         overwrite=True)}
    for name, export in exports.items():
        folder = tmp_path / name
        export_official(with_norms, folder)
        assert sorted(p.name for p in folder.iterdir()) == ["diffusion_pytorch_model.safetensors",
                                                            "pytorch_lora_weights.safetensors"]
        export(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["pytorch_lora_weights.safetensors"], name
    folder = tmp_path / "export_official"
    export_official(with_norms, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ExportError, match="already holds pytorch_lora_weights.safetensors, "
                                          "diffusion_pytorch_model.safetensors; pass overwrite=True"):
        export_official(lora_only, folder, overwrite=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # refused: nothing removed or replaced


def test_export_on_another_model_than_the_recorded_one_does_not_take_the_recorded_seed(tmp_path, monkeypatch):
    """A file records the backbone and seed of its training run; the seed describes that backbone only. Both
    exports (dense and --format) build the recorded backbone with the recorded seed, and a --model of another
    spec from seed 0 (the --format export kept the recorded seed there)."""
    from visadapt import export
    from visadapt.backbones import EMBEDDED_SD
    from visadapt.diffusion import load_pipeline
    from visadapt.export import export_model
    from visadapt.interop_export import export_file
    from visadapt.io import TRAIN_METADATA

    unet = load_pipeline(EMBEDDED_SD).unet
    other = tmp_path / "unet"  # the same UNet as a folder: another --model spec
    unet.save_pretrained(str(other))
    visadapt.attach(unet, "lora", targets=("to_q",))
    randomize(unet, std=0.05)
    run = {"pipeline": EMBEDDED_SD, "seed": 7}  # as train/selma.py and train/resadapter.py record it
    adapter = visadapt.save_adapter(unet, tmp_path / "lora.safetensors", metadata={TRAIN_METADATA: json.dumps(run)})
    built = []
    build = export.build_base_model

    def recording_build(spec, pretrained="default", num_classes=0, seed=0):
        built.append((spec, seed))
        return build(spec, pretrained, num_classes=num_classes, seed=seed)

    monkeypatch.setattr(export, "build_base_model", recording_build)
    export_file(adapter, "diffusers", tmp_path / "recorded")
    export_file(adapter, "diffusers", tmp_path / "other", model=str(other))
    export_model(adapter, to=tmp_path / "dense_recorded")
    export_model(adapter, str(other), to=tmp_path / "dense_other")
    assert built == [(EMBEDDED_SD, 7), (str(other), 0), (EMBEDDED_SD, 7), (str(other), 0)]


def test_the_exported_peft_config_and_visadapts_own_config_share_defaults_and_patterns():
    """One builder picks the most common rank / alpha (the first seen on a tie) and the patterns of the others,
    for visadapt's config of a loaded LoRA and for the PEFT config an export writes (there keyed by anchored
    regexes)."""
    from visadapt.interop_export import ExactLora, lora_config
    from visadapt.lora_layouts import lora_config_for

    def exact(path, rank, alpha):
        return ExactLora(path, torch.zeros(rank, 8), torch.zeros(8, rank), alpha, alpha / rank)

    model = torch.nn.Sequential()
    for name in ("fc", "other", "third"):
        model.add_module(name, torch.nn.Linear(8, 8))
    loras = {"fc": exact("fc", 2, 4.0), "other": exact("other", 3, 6.0), "third": exact("third", 3, 4.0)}
    ours, peft = lora_config_for(loras), lora_config(model, loras)
    assert (ours.rank, ours.alpha, ours.rank_pattern, ours.alpha_pattern) == (3, 4.0, {"fc": 2}, {"other": 6.0})
    assert (peft.r, peft.lora_alpha, peft.rank_pattern, peft.alpha_pattern) == (3, 4.0, {"^fc": 2}, {"^other": 6.0})
    tie = {"fc": exact("fc", 4, 8.0), "other": exact("other", 2, 2.0)}
    ours, peft = lora_config_for(tie), lora_config(model, tie)
    assert (ours.rank, ours.alpha, peft.r, peft.lora_alpha) == (4, 8.0, 4, 8.0)
