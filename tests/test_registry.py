from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest
import tiny_models as tm
import torch

import visadapt
from visadapt import registry
from visadapt.inject import insert
from visadapt.layers import BottleneckAdapter
from visadapt.sites import find_sites


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_PLUGINS", dict(registry._PLUGINS))
    yield registry._PLUGINS


def test_builtin_plugins_are_listed():
    assert {"adapter", "lora"} <= set(visadapt.list_plugins())


def test_a_plugin_is_one_decorated_class(clean_registry, tmp_path):
    @dataclass
    class BlockOutConfig(visadapt.AdapterConfig):
        width: int = visadapt.config_field(4, "bottleneck width")

    @visadapt.register_plugin("block_out_toy")
    class BlockOut(visadapt.AdapterPlugin):
        Config = BlockOutConfig
        families = ("timm_vit",)

        def attach(self, model, config, adapter_name):
            for site in find_sites(model, ["block_out"]):
                insert(site, adapter_name, BottleneckAdapter(site.in_features, config.width))

    model = tm.vit().eval()
    visadapt.attach(model, "block_out_toy", width=3)
    assert len(visadapt.inject.attached(model)) == 2
    path = visadapt.save_adapter(model, tmp_path / "toy.safetensors")
    fresh = tm.vit()
    visadapt.load_adapter(fresh, path)
    assert visadapt.api.records(fresh)["default"].config.width == 3


def test_name_collision_is_refused(clean_registry):
    with pytest.raises(ValueError, match="plugin name 'lora' is already taken"):
        @visadapt.register_plugin("lora")
        class Other(visadapt.AdapterPlugin):
            def attach(self, model, config, adapter_name):
                pass


def test_decorator_rejects_non_plugins(clean_registry):
    with pytest.raises(TypeError, match="must decorate an AdapterPlugin subclass"):
        visadapt.register_plugin("x")(object)


def _fake_entry_points(monkeypatch, tmp_path, name, source):
    module = f"visadapt_ep_{name}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [EntryPoint(name=name, value=module, group=group)])
    return module


def test_third_party_plugin_found_through_entry_point(clean_registry, monkeypatch, tmp_path):
    module = _fake_entry_points(monkeypatch, tmp_path, "thirdparty", """
        import visadapt
        from visadapt.plugins.lora import LoRAPlugin

        @visadapt.register_plugin("thirdparty")
        class ThirdParty(LoRAPlugin):
            pass
    """)
    assert "thirdparty" in visadapt.list_plugins()
    visadapt.attach(tm.vit(), "thirdparty", rank=2)
    sys.modules.pop(module, None)


def test_entry_point_that_registers_nothing(clean_registry, monkeypatch, tmp_path):
    _fake_entry_points(monkeypatch, tmp_path, "silent", "x = 1\n")
    with pytest.raises(ImportError, match="registered no plugin under that name"):
        visadapt.get_plugin("silent")


def test_broken_entry_point_names_the_package(clean_registry, monkeypatch, tmp_path):
    _fake_entry_points(monkeypatch, tmp_path, "broken", "raise RuntimeError('boom')\n")
    with pytest.raises(ImportError, match="third-party visadapt plugin 'broken'.*boom"):
        visadapt.list_plugins()


def test_config_round_trips_through_json_types():
    plugin = visadapt.get_plugin("lora")
    config = plugin.Config(targets=("q", "k"), blocks=(0,))
    again = plugin.Config.from_dict(__import__("json").loads(__import__("json").dumps(config.to_dict())))
    assert again == config and isinstance(again.blocks, tuple)


def test_unmerge_without_merge_is_a_no_op_and_merge_is_idempotent():
    model = tm.vit().eval()
    visadapt.attach(model, "lora")
    w = model.blocks[0].attn.qkv.weight.detach().clone()
    visadapt.unmerge(model)
    visadapt.merge(model)
    visadapt.merge(model)
    visadapt.unmerge(model)
    assert torch.equal(model.blocks[0].attn.qkv.weight, w)
