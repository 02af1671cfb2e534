"""Bad input gets a clear error that names the input and the fix, and leaves no file or half-attached adapter."""
from __future__ import annotations

import json

import pytest
import tiny_models as tm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import visadapt
from visadapt import inject
from visadapt.io import AdapterFileError
from visadapt.load_report import AdapterLoadError
from visadapt.registry import UnknownPluginError
from visadapt.sites import UnsupportedModelError


def saved_vit_lora(tmp_path, **vit_kwargs):
    model = tm.vit(**vit_kwargs).eval()
    visadapt.attach(model, "lora", rank=2)
    with torch.no_grad():
        for item in inject.attached(model):
            item.module.B.weight.normal_()
    return model, visadapt.save_adapter(model, tmp_path / "a.safetensors")


def assert_untouched(model, reference_state):
    assert not inject.attached(model) and not visadapt.api.records(model)
    state = model.state_dict()
    assert list(state) == list(reference_state)
    assert all(torch.equal(state[k], v) for k, v in reference_state.items())


def test_unknown_plugin_lists_close_matches():
    with pytest.raises(UnknownPluginError, match="no visadapt plugin named 'lroa'.*did you mean 'lora'"):
        visadapt.attach(tm.vit(), "lroa")


def test_unsupported_model_family_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="Sequential.*timm VisionTransformer.*open_clip.*diffusers"):
        visadapt.attach(nn.Sequential(nn.Linear(4, 4)), "lora")


def test_plugin_that_does_not_support_the_family():
    with pytest.raises(ValueError, match="'adapter' supports timm_vit, timm_swin, open_clip models; this model is "
                                         "diffusers_unet"):
        visadapt.attach(tm.unet(), "adapter")


def test_config_field_that_does_not_exist():
    model = tm.vit()
    with pytest.raises(ValueError, match="no field 'rnak' \\(did you mean 'rank'\\?\\)"):
        visadapt.attach(model, "lora", rnak=4)
    assert not inject.attached(model)


@pytest.mark.parametrize("field, value, message", [
    ("rank", -1, "rank=-1 is out of range"),
    ("rank", 0, "rank=0 is out of range"),
    ("alpha", -2.0, "alpha=-2.0 is out of range"),
    ("dropout", 1.5, "dropout=1.5 is out of range"),
])
def test_out_of_range_values(field, value, message):
    model = tm.vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        visadapt.attach(model, "lora", **{field: value})
    assert_untouched(model, state)


def test_out_of_range_adapter_values():
    with pytest.raises(ValueError, match="bottleneck=-8 is out of range"):
        visadapt.attach(tm.vit(), "adapter", bottleneck=-8)
    with pytest.raises(ValueError, match="style='serial' is not one of"):
        visadapt.attach(tm.vit(), "adapter", style="serial")


def test_targets_that_match_nothing_raise_and_list_the_sites():
    with pytest.raises(ValueError, match="site 'query' does not exist on timm_vit models; sites there: attn_out"):
        visadapt.attach(tm.vit(), "lora", targets=("query",))
    with pytest.raises(ValueError, match="block indices \\[7\\] are out of range: this model has blocks 0..1"):
        visadapt.attach(tm.vit(), "lora", blocks=(7,))
    with pytest.raises(ValueError, match="no site matches.*visadapt sites"):
        visadapt.attach(tm.vit(), "lora", path_pattern="^nowhere")
    with pytest.raises(ValueError, match="lora adapts linear and convolution layers; site kind 'mlp'"):
        visadapt.attach(tm.vit(), "lora", targets=("mlp",))


def test_same_adapter_name_twice_is_refused_and_two_names_stack():
    model = tm.vit()
    visadapt.attach(model, "lora")
    with pytest.raises(ValueError, match="already attached"):
        visadapt.attach(model, "lora")
    visadapt.attach(model, "adapter", adapter_name="second")
    assert sorted(visadapt.inject.adapter_names(model)) == ["default", "second"]
    visadapt.detach(model, "default")
    assert visadapt.inject.adapter_names(model) == ["second"]


@pytest.mark.parametrize("change", [{"embed_dim": 48}, {"depth": 3}])
def test_loading_onto_another_width_or_depth(tmp_path, change):
    _, path = saved_vit_lora(tmp_path)
    other = tm.vit(**change)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterFileError, match="was trained for .*2 blocks, 32 wide.*this model is .*"
                                               + ("48 wide" if "embed_dim" in change else "3 blocks")):
        visadapt.load_adapter(other, path)
    assert_untouched(other, state)


def test_truncated_file(tmp_path):
    _, path = saved_vit_lora(tmp_path)
    data = path.read_bytes()
    for cut in (len(data) - 7, 40, 5, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(AdapterFileError, match="truncated or corrupted"):
            visadapt.load_adapter(tm.vit(), path)


def test_corrupted_tensor_bytes_are_caught_by_the_checksum(tmp_path):
    _, path = saved_vit_lora(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor: safetensors itself cannot notice this
    path.write_bytes(bytes(data))
    fresh = tm.vit()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(AdapterFileError, match="is corrupted: its tensors do not match the checksum"):
        visadapt.load_adapter(fresh, path)
    assert_untouched(fresh, state)


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the pickle was executed",))

    path = tmp_path / "adapter.bin"
    torch.save({"x": torch.zeros(2), "boom": Boom()}, path)
    with pytest.raises(AdapterFileError, match="pickle/zip checkpoint.*only reads safetensors"):
        visadapt.load_adapter(tm.vit(), path)
    path.write_text("hello, not a tensor file")
    with pytest.raises(AdapterFileError, match="not a safetensors file"):
        visadapt.load_adapter(tm.vit(), path)
    with pytest.raises(AdapterFileError, match="does not exist"):
        visadapt.load_adapter(tm.vit(), tmp_path / "missing.safetensors")


def test_foreign_safetensors_file_is_named_as_such(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(2, 32)}, str(path))
    with pytest.raises(AdapterFileError, match="weights.safetensors has no visadapt metadata, and no registered"):
        visadapt.load_adapter(tm.vit(), path)
    # a LoRA layout (here unloadable alone) goes to the format that reads it, whose report names the file
    path = tmp_path / "peft.safetensors"
    save_file({"base_model.model.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 32)}, str(path))
    with pytest.raises(AdapterLoadError, match=r"peft\.safetensors into adapter 'default': 0 of 1 tensors matched"):
        visadapt.load_adapter(tm.vit(), path)


def test_file_whose_keys_do_not_fit_gives_a_full_report_and_leaves_model_clean(tmp_path):
    _, path = saved_vit_lora(tmp_path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    key = min(tensors)
    tensors[key.replace("blocks.0", "blocks.9")] = tensors.pop(key)
    meta["tensors_sha256"] = visadapt.io.tensors_digest(tensors)
    save_file(tensors, str(path), metadata=meta)
    fresh = tm.vit()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(visadapt.inject.AdapterLoadError) as info:
        visadapt.load_adapter(fresh, path)
    assert f"missing    {key}" in str(info.value)
    assert f"unexpected {key.replace('blocks.0', 'blocks.9')}" in str(info.value)
    assert_untouched(fresh, state)


def test_unknown_config_field_inside_a_file(tmp_path):
    _, path = saved_vit_lora(tmp_path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    config = json.loads(meta["config"])
    config["ranks"] = 3
    meta["config"] = json.dumps(config)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="no field 'ranks' \\(did you mean 'rank'\\?\\)"):
        visadapt.load_adapter(tm.vit(), path)


def test_interrupted_save_leaves_no_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    model, path = saved_vit_lora(tmp_path)
    previous = path.read_bytes()

    def fail_after_writing(fd):  # the temporary file is written, its flush to disk fails
        raise OSError("disk full")

    monkeypatch.setattr(visadapt.io.os, "fsync", fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        visadapt.save_adapter(model, path)
    with pytest.raises(OSError, match="disk full"):
        visadapt.save_adapter(model, tmp_path / "new.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert path.read_bytes() == previous


def test_reserved_metadata_and_unknown_adapter_name(tmp_path):
    model, _ = saved_vit_lora(tmp_path)
    with pytest.raises(ValueError, match="metadata key 'plugin' is reserved"):
        visadapt.save_adapter(model, tmp_path / "b.safetensors", metadata={"plugin": "x"})
    with pytest.raises(KeyError, match="no adapter named 'other' is attached.*'default'"):
        visadapt.save_adapter(model, tmp_path / "b.safetensors", adapter_name="other")
    assert not (tmp_path / "b.safetensors").exists()


def test_head_with_another_class_count_is_a_clear_error(tmp_path):
    model = tm.vit(num_classes=5)
    visadapt.attach(model, "lora", head="head")
    path = visadapt.save_adapter(model, tmp_path / "a.safetensors")
    other = tm.vit(num_classes=7)
    with pytest.raises(visadapt.inject.AdapterLoadError, match="(?s)head.weight  file \\(5, 32\\) vs model \\(7, 32\\).*head 'head' has 5 classes"):
        visadapt.load_adapter(other, path)
    assert not inject.attached(other)


def test_unknown_head_path():
    with pytest.raises(ValueError, match="head='classifier' is not a submodule.*top-level modules: patch_embed"):
        visadapt.attach(tm.vit(), "lora", head="classifier")
