"""Loads never fail silently: every key is reported per site, strict raises with the report, strict=False loads what
fits and prints the rest, and nothing fitting is an error either way (issue 12)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file

import visadapt
from tests import tiny_models as tm
from visadapt import io
from visadapt.backbones import create_tiny_sd_pipeline
from visadapt.load_report import AdapterLoadError, LoadReport
from visadapt.lora_layouts import attach_lora_state, lora_state_to_peft
from visadapt.plugins.resadapter import load_official, official_state

torch.set_num_threads(1)

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TO_V = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"


@pytest.fixture(scope="module")
def base_unet():
    return create_tiny_sd_pipeline().unet


@pytest.fixture()
def unet(base_unet):
    return copy.deepcopy(base_unet)


def unet_state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def lora_file_state(unet, seed=0) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA (``unet.<path>.lora_A/B.weight``) on the attention projections of the tiny UNet."""
    donor = copy.deepcopy(unet)
    visadapt.attach(donor, "lora", rank=4, alpha=4.0, targets=("to_q", "to_v"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in donor.named_parameters():
            if "visadapt_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return lora_state_to_peft(donor, "default")


def rename_module(state, old: str, new: str) -> dict[str, torch.Tensor]:
    return {key.replace(f".{old}.", f".{new}."): value for key, value in state.items()}


# ------------------------------------------------------------------------------------------------ the report


def test_report_counts_per_site_and_formats_every_problem():
    report = LoadReport("f.safetensors", "adapter 'a'")
    given = {"b.0.q.visadapt_adapters.A": torch.zeros(4, 8), "b.0.q.visadapt_adapters.B": torch.zeros(8, 4),
             "b.1.q.visadapt_adapters.A": torch.zeros(4, 9), "b.9.q.visadapt_adapters.A": torch.zeros(4, 8)}
    expected = {"b.0.q.visadapt_adapters.A": torch.zeros(4, 8), "b.0.q.visadapt_adapters.B": torch.zeros(8, 4),
                "b.1.q.visadapt_adapters.A": torch.zeros(4, 8), "b.1.q.visadapt_adapters.B": torch.zeros(8, 4)}
    fits = report.compare(given, expected)
    assert fits == ["b.0.q.visadapt_adapters.A", "b.0.q.visadapt_adapters.B"]
    assert report.by_site() == {
        "b.0.q": {"matched": 2, "missing": 0, "unexpected": 0, "shape": 0},
        "b.1.q": {"matched": 0, "missing": 1, "unexpected": 0, "shape": 1},
        "b.9.q": {"matched": 0, "missing": 0, "unexpected": 1, "shape": 0},
    }
    text = report.format()
    assert "2 of 4 tensors matched; 1 missing, 1 unexpected, 1 shape mismatches over 3 sites" in text
    assert "missing    b.1.q.visadapt_adapters.B" in text
    assert "unexpected b.9.q.visadapt_adapters.A" in text
    assert "shape      b.1.q.visadapt_adapters.A  file (4, 9) vs model (4, 8)" in text
    assert "(1 other sites matched fully)" in text
    with pytest.raises(AdapterLoadError, match="strict=False to load the 2 tensors") as info:
        report.enforce(strict=True)
    assert info.value.report is report


def test_an_empty_load_is_an_error_even_when_not_strict():
    report = LoadReport("f.safetensors")
    report.compare({"x.weight": torch.zeros(2)}, {"y.weight": torch.zeros(2)})
    with pytest.raises(AdapterLoadError, match="nothing to load"):
        report.enforce(strict=False)
    with pytest.raises(AdapterLoadError, match="nothing to load"):
        LoadReport("an empty dict").enforce(strict=False)


# ------------------------------------------------------------------------------------------------ LoRA layouts


def test_lora_with_renamed_keys_fails_strictly_naming_every_unmatched_key(unet):
    state = rename_module(lora_file_state(unet), "to_v", "to_value")
    before = unet_state(unet)
    with pytest.raises(AdapterLoadError) as info:
        attach_lora_state(unet, state, "x", source="renamed.safetensors")
    message = str(info.value)
    renamed = sorted(k for k in state if ".to_value." in k)
    assert len(renamed) == 16  # lora_A and lora_B of to_v in attn1 and attn2 of four transformer blocks
    for key in renamed:
        assert f"unexpected {key}  this model has no such module" in message
    assert "renamed.safetensors" in message and "strict=False" in message
    assert not visadapt.api.records(unet)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_lora_not_strict_loads_the_rest_and_prints_the_report(unet, caplog):
    full = lora_file_state(unet)
    state = rename_module(full, "to_v", "to_value")
    state["unet.mid_block.not_a_lora_key"] = torch.zeros(3)
    with caplog.at_level(logging.WARNING, logger="visadapt"):
        config = attach_lora_state(unet, state, "x", strict=False, source="renamed.safetensors")
    assert "partial load (strict=False)" in caplog.text and "to_value" in caplog.text
    assert "not_a_lora_key" in caplog.text
    assert all(path.endswith("to_q") for path in config.target_modules) and config.target_modules
    report = visadapt.load_report(unet, "x")
    assert len(report.matched) == 16 and len(report.unexpected) == 17 and not report.ok
    # the modules that fit carry exactly the file's tensors
    loaded = lora_state_to_peft(unet, "x")
    assert loaded.keys() == {k for k in full if ".to_q." in k}
    assert all(torch.equal(loaded[k], full[k]) for k in loaded)


def test_lora_that_fits_nothing_is_refused_even_when_not_strict(unet):
    state = rename_module(rename_module(lora_file_state(unet), "to_v", "to_value"), "to_q", "to_query")
    with pytest.raises(AdapterLoadError, match="nothing to load"):
        attach_lora_state(unet, state, "x", strict=False)
    assert not visadapt.api.records(unet)


def test_pipeline_loader_strict_and_not_strict(tmp_path):
    pipe = create_tiny_sd_pipeline()
    state = rename_module(lora_file_state(pipe.unet), "to_v", "to_value")
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    with pytest.raises(AdapterLoadError, match="to_value"):
        pipe.load_visadapt(folder, adapter_name="x")
    assert pipe.list_visadapt() == {}
    pipe.load_visadapt(folder, adapter_name="x", strict=False)
    report = visadapt.load_report(pipe.unet, "x")
    assert str(folder / "pytorch_lora_weights.safetensors") in report.source
    assert len(report.matched) == 16 and len(report.unexpected) == 16
    pipe.load_visadapt(state, adapter_name="y", strict=False)  # an in-memory state dict takes the same path
    assert len(visadapt.load_report(pipe.unet, "y").matched) == 16


@pytest.mark.parametrize("mode", [True, False])
def test_pipeline_loaders_keep_the_train_or_eval_mode(mode, tmp_path):
    pipe = create_tiny_sd_pipeline()
    pipe.unet.train(mode)
    state = lora_file_state(pipe.unet)

    def changed():
        return [name for name, module in pipe.unet.named_modules() if module.training != mode]

    pipe.load_visadapt(state, adapter_name="a")
    assert not changed()
    pipe.load_visadapt(state, adapter_name="b", weight=0.5)
    pipe.set_visadapt_weights("a", 0.7)
    pipe.fuse_visadapt()
    assert not changed()
    pipe.unfuse_visadapt()
    path = pipe.save_visadapt("a", tmp_path / "a.safetensors")
    pipe.unload_visadapt()
    assert not changed()
    pipe.load_visadapt(path, adapter_name="c")
    assert not changed(), changed()


# ------------------------------------------------------------------------------------------------ visadapt files


def test_visadapt_tensors_with_a_renamed_key_strict_and_not(tmp_path):
    model = tm.vit(num_classes=5)
    visadapt.attach(model, "lora", rank=4, head="head")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visadapt_" in name:
                param.normal_()
    path = visadapt.save_adapter(model, tmp_path / "a.safetensors")
    tensors, meta = io.read_adapter_file(path)
    renamed = next(k for k in tensors if k.startswith("blocks.1.") and "visadapt_" in k)
    tensors = {(k.replace("blocks.1.", "blocks.7.") if k == renamed else k): v for k, v in tensors.items()}
    meta = dict(meta, tensors_sha256=io.tensors_digest(tensors))

    fresh = tm.vit(num_classes=5)
    with pytest.raises(AdapterLoadError) as info:
        io.load_adapter_tensors(fresh, tensors, meta, source="edited")
    assert f"missing    {renamed}" in str(info.value)
    assert f"unexpected {renamed.replace('blocks.1.', 'blocks.7.')}" in str(info.value)
    assert not visadapt.api.records(fresh)

    io.load_adapter_tensors(fresh, tensors, meta, source="edited", strict=False)
    report = visadapt.load_report(fresh)
    assert report.missing == [renamed] and len(report.unexpected) == 1
    assert torch.equal(fresh.head.weight, model.head.weight)  # the head fits and travels with the adapter
    loaded = visadapt.inject.adapter_state(fresh, "default")
    original = visadapt.inject.adapter_state(model, "default")
    assert all(torch.equal(loaded[k], original[k]) for k in loaded if k != renamed)


def test_a_clean_load_has_a_clean_report(tmp_path):
    model = tm.vit(num_classes=5)
    visadapt.attach(model, "lora", rank=4, head="head")
    path = visadapt.save_adapter(model, tmp_path / "a.safetensors")
    fresh = tm.vit(num_classes=5)
    visadapt.load_adapter(fresh, path)
    report = visadapt.load_report(fresh)
    assert report.ok and str(path) in report.source
    assert set(report.matched) == set(io.read_adapter_file(path)[0])


# ------------------------------------------------------------------------------------------------ ResAdapter


def test_resadapter_two_files_not_strict_skips_a_misshapen_norm(unet):
    donor = copy.deepcopy(unet)
    visadapt.attach(donor, "resadapter")
    lora, norms = official_state(donor)
    bad_key = next(iter(sorted(norms)))
    norms[bad_key] = torch.ones(norms[bad_key].shape[0] + 16)
    with pytest.raises(AdapterLoadError, match=f"shape      {bad_key}"):
        load_official(unet, lora, norms, "r")
    assert not visadapt.api.records(unet)
    load_official(unet, lora, norms, "r", strict=False)
    report = visadapt.load_report(unet, "r")
    assert report.mismatched == [bad_key]
    assert len(report.matched) == len(lora) + len(norms) - 1  # the LoRA keys (alphas included), the other norms
