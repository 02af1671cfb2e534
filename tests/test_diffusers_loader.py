"""``pipe.load_visadapt`` and friends on the embedded tiny Stable Diffusion pipeline (CPU, 32x32, 2 steps)."""
from __future__ import annotations

import copy
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import visadapt
from tests import tiny_models as tm
from tests.pipeline_helpers import assert_same_tensors, every_tensor, generate
from visadapt import diffusers as loader
from visadapt import inject, io
from visadapt.formats import CheckpointFormat, refuse_metadata, register_format

pytestmark = pytest.mark.usefixtures("_one_thread")  # fixtures (base_pipe, pipe, base_image): tests/conftest.py


# ------------------------------------------------------------------------------------------------- helpers


def lora_file(path: Path, unet: nn.Module, seed: int, rank: int = 4, targets=("q", "v", "conv2")) -> Path:
    """A visadapt LoRA file for ``unet``'s architecture, with random (non-zero) B so it changes the output."""
    unet = copy.deepcopy(unet)
    visadapt.attach(unet, "lora", rank=rank, alpha=float(rank), targets=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if inject.ADAPTERS_ATTR in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return visadapt.save_adapter(unet, path)


@pytest.fixture()
def lora_a(tmp_path, base_pipe) -> Path:
    return lora_file(tmp_path / "a.safetensors", base_pipe.unet, seed=1)


@pytest.fixture()
def lora_b(tmp_path, base_pipe) -> Path:
    return lora_file(tmp_path / "b.safetensors", base_pipe.unet, seed=2, targets=("k", "to_out", "conv1"))


# A test-only foreign layout: visadapt's LoRA tensors (q/v LoRA) under keys prefixed "plain::", in a file named
# test_plain_adapter.safetensors or given in memory. It stands for ResAdapter's and the diffusers LoRA layouts,
# whose formats are registered by their plugins: the loader must reach it through visadapt.formats only.
PLAIN_PREFIX = "plain::"
PLAIN_FILE = "test_plain_adapter.safetensors"


@register_format("test_plain_lora")
class PlainLoRAFormat(CheckpointFormat):
    file_names = (PLAIN_FILE,)

    @classmethod
    def detect(cls, files, state):
        if state is not None:
            return bool(state) and all(key.startswith(PLAIN_PREFIX) for key in state)
        return PLAIN_FILE in files

    def load(self, model, files, state, adapter_name, strict=True, metadata=None):
        refuse_metadata(self, metadata)
        state = dict(state) if state is not None else load_file(str(files[PLAIN_FILE]))
        tensors = {key[len(PLAIN_PREFIX):]: value for key, value in state.items()}
        rank = next(t.shape[0] for k, t in tensors.items() if k.endswith(".A.weight"))
        config = visadapt.attach(model, "lora", rank=rank, alpha=float(rank), targets=("q", "v"),
                                 adapter_name=adapter_name)
        try:
            inject.load_adapter_state(model, tensors, adapter_name, strict=strict)
        except Exception:
            visadapt.detach(model, adapter_name)
            raise
        return config


def plain_state(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = visadapt.read_adapter_file(path)
    return {PLAIN_PREFIX + key: value for key, value in tensors.items()}


@visadapt.register_plugin("test_unmergeable_lora")
class UnmergeableLoRA(visadapt.get_plugin("lora")):
    """LoRA declared non-mergeable, standing for methods with a non-linearity (bottleneck adapters)."""

    mergeable = False
    merge_refusal = "test plugin: declared non-mergeable"


# ------------------------------------------------------------------------------------- load / unload / weights


def test_methods_installed_on_every_pipeline(pipe):
    from diffusers import DiffusionPipeline

    for name in loader._MIXIN_METHODS:
        assert getattr(DiffusionPipeline, name) is getattr(loader.VisadaptLoaderMixin, name)
    assert pipe.list_visadapt() == {}


def test_methods_installed_lazily_when_diffusers_is_imported_after_visadapt():
    code = ("import sys, visadapt\n"
            "assert 'diffusers.pipelines.pipeline_utils' not in sys.modules, 'import visadapt pulled in diffusers'\n"
            "from diffusers import StableDiffusionPipeline\n"
            "assert StableDiffusionPipeline.load_visadapt is visadapt.diffusers.VisadaptLoaderMixin.load_visadapt\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_load_generate_unload_restores_every_tensor(pipe, lora_a, base_image):
    before = every_tensor(pipe)
    name = pipe.load_visadapt(str(lora_a))
    assert name == "default_0"
    assert pipe.list_visadapt() == {"unet": ["default_0"]}
    adapted = generate(pipe)
    assert (adapted - base_image).abs().max() > 1e-3
    pipe.unload_visadapt()
    assert pipe.list_visadapt() == {}
    assert_same_tensors(before, every_tensor(pipe))
    assert torch.equal(generate(pipe), base_image)


def test_fused_output_equals_unfused_and_unfuse_restores_weights(pipe, lora_a):
    before = every_tensor(pipe)
    pipe.load_visadapt(lora_a, adapter_name="a")
    with_adapter = every_tensor(pipe)
    unfused = generate(pipe)
    pipe.fuse_visadapt()
    unet_weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert not torch.equal(unet_weight, before["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    torch.testing.assert_close(generate(pipe), unfused, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="fused already"):
        pipe.fuse_visadapt()
    with pytest.raises(ValueError, match="unfuse_visadapt"):
        pipe.set_visadapt_weights("a", 0.5)
    pipe.unfuse_visadapt()
    assert_same_tensors(with_adapter, every_tensor(pipe))
    assert torch.equal(generate(pipe), unfused)

    # lora_scale folds weight * lora_scale, as diffusers' fuse_lora does; unfuse gives the old weight back
    pipe.set_visadapt_weights("a", 0.5)
    half = generate(pipe)
    pipe.set_visadapt_weights("a", 1.0)
    pipe.fuse_visadapt(lora_scale=0.5)
    torch.testing.assert_close(generate(pipe), half, atol=1e-5, rtol=1e-4)
    pipe.unload_visadapt()  # unloads fused adapters too
    assert_same_tensors(before, every_tensor(pipe))


def test_weight_zero_is_the_base_pipeline(pipe, lora_a, base_image):
    pipe.load_visadapt(lora_a, weight=0.0)
    assert torch.equal(generate(pipe), base_image)


def test_set_visadapt_weights(pipe, lora_a, lora_b, base_image):
    pipe.load_visadapt(lora_a, adapter_name="a", weight=0.5)
    loaded_at_half = generate(pipe)
    pipe.set_visadapt_weights("a", 1.0)
    assert visadapt.get_weight(pipe.unet, "a") == 1.0
    full = generate(pipe)
    assert (full - loaded_at_half).abs().max() > 1e-4
    pipe.set_visadapt_weights(["a"], [0.5])
    assert torch.equal(generate(pipe), loaded_at_half)
    pipe.set_visadapt_weights("a", 0)
    assert torch.equal(generate(pipe), base_image)

    pipe.load_visadapt(lora_b, adapter_name="b")
    pipe.set_visadapt_weights(["a", "b"], 0.25)  # one number for all
    assert visadapt.get_weight(pipe.unet, "a") == visadapt.get_weight(pipe.unet, "b") == 0.25
    pipe.set_visadapt_weights(["a", "b"])  # None: 1.0 each
    assert visadapt.get_weight(pipe.unet, "b") == 1.0
    with pytest.raises(ValueError, match="2 adapter names but 1 weights"):
        pipe.set_visadapt_weights(["a", "b"], [0.5])


def test_two_adapters_at_once(pipe, lora_a, lora_b, base_image):
    pipe.load_visadapt(lora_a)
    only_a = generate(pipe)
    pipe.unload_visadapt()
    pipe.load_visadapt(lora_b)
    only_b = generate(pipe)
    pipe.unload_visadapt()

    before = every_tensor(pipe)
    assert pipe.load_visadapt(lora_a) == "default_0"
    assert pipe.load_visadapt(lora_b) == "default_1"
    assert pipe.list_visadapt() == {"unet": ["default_0", "default_1"]}
    both = generate(pipe)
    assert (both - only_a).abs().max() > 1e-4 and (both - only_b).abs().max() > 1e-4
    pipe.set_visadapt_weights("default_1", 0.0)
    assert torch.equal(generate(pipe), only_a)
    pipe.set_visadapt_weights("default_1", 1.0)
    pipe.fuse_visadapt(adapter_names=["default_0"])
    torch.testing.assert_close(generate(pipe), both, atol=1e-5, rtol=1e-4)
    pipe.unload_visadapt("default_0")  # the fused one: unfused, then removed
    assert pipe.list_visadapt() == {"unet": ["default_1"]}
    assert torch.equal(generate(pipe), only_b)
    pipe.unload_visadapt(["default_1"])
    assert_same_tensors(before, every_tensor(pipe))
    assert torch.equal(generate(pipe), base_image)


# ------------------------------------------------------------------------------------------- input kinds


def test_state_dict_input_with_visadapt_metadata(pipe, lora_a):
    pipe.load_visadapt(lora_a)
    from_file = generate(pipe)
    pipe.unload_visadapt()
    tensors, meta = visadapt.read_adapter_file(lora_a)
    pipe.load_visadapt(tensors, adapter_name="mem", metadata=meta)
    assert pipe.list_visadapt() == {"unet": ["mem"]}
    assert torch.equal(generate(pipe), from_file)


def test_state_dict_and_folder_of_a_registered_format(pipe, lora_a, tmp_path):
    """Foreign layouts are dispatched through visadapt.formats: in memory and as a folder's known file."""
    lora_qv = lora_file(tmp_path / "qv.safetensors", pipe.unet, seed=3, targets=("q", "v"))
    pipe.load_visadapt(lora_qv)
    reference = generate(pipe)
    pipe.unload_visadapt()

    pipe.load_visadapt(plain_state(lora_qv), adapter_name="from_dict")
    assert torch.equal(generate(pipe), reference)
    pipe.unload_visadapt()
    # a header given with foreign tensors reaches the format, or the load is refused: never silently dropped
    with pytest.raises(TypeError, match="metadata"):
        pipe.load_visadapt(plain_state(lora_qv), metadata={"lora_adapter_metadata": "{}"})
    assert pipe.list_visadapt() == {}

    folder = tmp_path / "plain"
    folder.mkdir()
    save_file(plain_state(lora_qv), str(folder / PLAIN_FILE))
    pipe.load_visadapt(folder, adapter_name="from_folder")
    assert torch.equal(generate(pipe), reference)
    # whatever it was loaded from, it saves as one visadapt file that loads back the same
    saved = pipe.save_visadapt("from_folder", tmp_path / "converted")
    assert saved.name == "adapter.safetensors" and io.read_adapter_metadata(saved)["plugin"] == "lora"
    pipe.unload_visadapt()
    pipe.load_visadapt(saved)
    assert torch.equal(generate(pipe), reference)

    with pytest.raises(io.AdapterFileError, match="no visadapt metadata.*test_plain_lora"):
        pipe.load_visadapt({"some.weight": torch.zeros(2)})


def test_folder_input_and_weight_name(pipe, lora_a, lora_b, tmp_path):
    pipe.load_visadapt(lora_b)
    only_b = generate(pipe)
    pipe.unload_visadapt()

    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(lora_a.read_bytes())
    (folder / "other.safetensors").write_bytes(lora_b.read_bytes())
    pipe.load_visadapt(folder, adapter_name="from_folder")  # adapter.safetensors by default
    reference = generate(pipe)
    pipe.unload_visadapt()
    pipe.load_visadapt(lora_a)
    assert torch.equal(generate(pipe), reference)
    pipe.unload_visadapt()
    pipe.load_visadapt(folder, weight_name="other.safetensors")
    assert torch.equal(generate(pipe), only_b)
    with pytest.raises(io.AdapterFileError, match="weight_name='nope.safetensors' does not exist"):
        pipe.load_visadapt(folder, weight_name="nope.safetensors")


def _fake_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, Path]) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


def test_hub_repo_id_from_the_local_cache(pipe, lora_a, tmp_path):
    pipe.load_visadapt(lora_a)
    reference = generate(pipe)
    pipe.unload_visadapt()

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "visadapt-test/tiny-lora", {"adapter.safetensors": lora_a,
                                                       "sd15/mine.safetensors": lora_a})
    pipe.load_visadapt("visadapt-test/tiny-lora", cache_dir=cache, local_files_only=True)
    assert torch.equal(generate(pipe), reference)
    pipe.unload_visadapt()
    pipe.load_visadapt("visadapt-test/tiny-lora", cache_dir=cache, local_files_only=True, subfolder="sd15",
                       weight_name="mine.safetensors", revision="main")
    assert torch.equal(generate(pipe), reference)
    pipe.unload_visadapt()

    with pytest.raises(io.AdapterFileError, match="'visadapt-test/absent' was not found in the local cache.*Fix"):
        pipe.load_visadapt("visadapt-test/absent", cache_dir=cache, local_files_only=True)


# ------------------------------------------------------------------------------------------------- errors


def test_wrong_architecture_names_both(pipe, tmp_path):
    other = lora_file(tmp_path / "other_unet.safetensors", tm.unet(), seed=0)  # a 16/32-wide UNet
    before = every_tensor(pipe)
    with pytest.raises(io.AdapterFileError, match=r"trained for .*16 wide.*unet is .*32 wide"):
        pipe.load_visadapt(other)
    assert pipe.list_visadapt() == {}
    assert_same_tensors(before, every_tensor(pipe))


def test_missing_file_pickle_and_bad_arguments(pipe, lora_a, tmp_path):
    with pytest.raises(io.AdapterFileError, match="does not exist"):
        pipe.load_visadapt(tmp_path / "missing.safetensors")
    with pytest.raises(io.AdapterFileError, match="does not exist"):
        pipe.load_visadapt("./no/such/folder")
    pickled = tmp_path / "lora.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(io.AdapterFileError, match="pickle.*only reads safetensors"):
        pipe.load_visadapt(pickled)
    with pytest.raises(TypeError, match="unexpected keyword argument.*low_cpu_memory"):
        pipe.load_visadapt(lora_a, low_cpu_memory=True)
    with pytest.raises(ValueError, match="adaptable component.*unet"):
        pipe.load_visadapt(lora_a, component="vae")
    pipe.load_visadapt(lora_a, adapter_name="a")
    with pytest.raises(ValueError, match="'a' is already loaded"):
        pipe.load_visadapt(lora_a, adapter_name="a")
    assert pipe.list_visadapt() == {"unet": ["a"]}


def test_unknown_adapter_names(pipe, lora_a):
    pipe.load_visadapt(lora_a, adapter_name="a")
    for call in (lambda: pipe.set_visadapt_weights("b", 0.5), lambda: pipe.unload_visadapt("b"),
                 lambda: pipe.fuse_visadapt(adapter_names=["a", "b"]), lambda: pipe.save_visadapt("b", "x.safetensors")):
        with pytest.raises(KeyError, match=r"no visadapt adapter named 'b'.*loaded: 'a'"):
            call()
    assert pipe.list_visadapt() == {"unet": ["a"]}


def test_fusing_a_non_mergeable_adapter_raises_with_its_reason(pipe, lora_a, tmp_path):
    unet = copy.deepcopy(pipe.unet)
    visadapt.attach(unet, "test_unmergeable_lora", rank=2, targets=("q",))
    path = visadapt.save_adapter(unet, tmp_path / "unmergeable.safetensors")
    pipe.load_visadapt(lora_a, adapter_name="a")
    pipe.load_visadapt(path, adapter_name="u")
    before = every_tensor(pipe)
    with pytest.raises(ValueError, match="'u' \\(test_unmergeable_lora\\) cannot be fused: test plugin"):
        pipe.fuse_visadapt()
    assert_same_tensors(before, every_tensor(pipe))  # nothing fused, "a" included
    pipe.fuse_visadapt(adapter_names="a")


# ------------------------------------------------------------------------------- with diffusers' own LoRAs


def _peft_lora_folder(pipe, folder: Path) -> Path:
    """A LoRA written by diffusers' own save_lora_weights (PEFT layout) on to_q/to_k, random B."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(pipe.unet)
    torch.manual_seed(5)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(donor))
    return folder


def test_alongside_diffusers_load_lora_weights(pipe, lora_a, tmp_path, base_image):
    peft_folder = _peft_lora_folder(pipe, tmp_path / "peft")
    before = every_tensor(pipe)
    pipe.load_lora_weights(peft_folder, adapter_name="peft_lora")
    only_peft = generate(pipe)
    assert (only_peft - base_image).abs().max() > 1e-4

    pipe.load_visadapt(lora_a, adapter_name="vis")
    both = generate(pipe)
    assert (both - only_peft).abs().max() > 1e-4
    # both deltas act on the layer they share: W x + b + PEFT's B A x * s + visadapt's B A x * s
    to_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(1, 5, to_q.in_features)
    base = to_q.base_layer
    peft_delta = to_q.lora_B["peft_lora"](to_q.lora_A["peft_lora"](x)) * to_q.scaling["peft_lora"]
    vis_delta = getattr(base, inject.ADAPTERS_ATTR)["vis"]["to_q"](x)  # hooked onto the layer PEFT wraps
    with torch.no_grad():
        torch.testing.assert_close(to_q(x), nn.functional.linear(x, base.weight, base.bias) + peft_delta + vis_delta)

    pipe.fuse_visadapt()
    torch.testing.assert_close(generate(pipe), both, atol=1e-5, rtol=1e-4)
    pipe.unfuse_visadapt()
    pipe.unload_visadapt()
    assert torch.equal(generate(pipe), only_peft)  # the diffusers LoRA is untouched
    pipe.unload_lora_weights()
    assert_same_tensors(before, every_tensor(pipe))

    # the other order: visadapt first, then diffusers' LoRA, unloaded first
    pipe.load_visadapt(lora_a, adapter_name="vis")
    only_vis = generate(pipe)
    pipe.load_lora_weights(peft_folder, adapter_name="peft_lora")
    torch.testing.assert_close(generate(pipe), both, atol=1e-5, rtol=1e-4)  # other summation order
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), only_vis)
    pipe.unload_visadapt()
    assert_same_tensors(before, every_tensor(pipe))


# ------------------------------------------------------------------------------------------------- xformers


def test_xformers_falls_back_to_sdpa_with_one_notice(pipe, lora_a, caplog, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    monkeypatch.setitem(sys.modules, "xformers", None)  # absent, whatever this machine has installed
    monkeypatch.setattr(loader, "_XFORMERS_PROBES", {})
    pipe.load_visadapt(lora_a)
    sdpa = generate(pipe)
    with caplog.at_level(logging.WARNING, logger="visadapt.diffusers"):
        pipe.enable_xformers_memory_efficient_attention()
    notices = [r for r in caplog.records if r.name == "visadapt.diffusers"]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert "xformers is not installed" in notices[0].getMessage() and "SDPA" in notices[0].getMessage()
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert torch.equal(generate(pipe), sdpa)


def test_xformers_probe_runs_a_kernel_and_is_cached(monkeypatch):
    calls = []

    def memory_efficient_attention(q, k, v):
        calls.append(q.device)
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")

    fake = types.ModuleType("xformers")
    fake.__version__ = "0.0.35"
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    monkeypatch.setattr(loader, "_XFORMERS_PROBES", {})
    usable, reason = loader.xformers_usable("cpu")
    assert not usable
    assert reason == ("xformers 0.0.35 kernels do not run here (NotImplementedError: No operator found for "
                      "`memory_efficient_attention_forward` with inputs:)")
    assert loader.xformers_usable("cpu") == (usable, reason) and len(calls) == 1  # cached per device

    fake.ops.memory_efficient_attention = lambda q, k, v: q  # a kernel that runs, but diffusers needs CUDA
    monkeypatch.setattr(loader, "_XFORMERS_PROBES", {})
    expected = "diffusers runs xformers attention on CUDA only; this pipeline is on cpu"
    assert loader.xformers_usable("cpu") == (False, expected)


# --------------------------------------------------------------------- diffusers' loader keywords and verbs


def _diffusers_load_keywords() -> set[str]:
    """Every keyword ``load_lora_weights`` takes in the installed diffusers: its named parameters and what it and
    the ``lora_state_dict`` it forwards to pop from ``**kwargs`` (read from their source, so a keyword diffusers
    adds shows up here)."""
    import inspect
    import re

    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin

    named = set(inspect.signature(Mixin.load_lora_weights).parameters) - {"self", "kwargs",
                                                                         "pretrained_model_name_or_path_or_dict"}
    popped = set()
    for method in (Mixin.load_lora_weights, Mixin.lora_state_dict):
        popped |= set(re.findall(r'kwargs\.pop\("(\w+)"', inspect.getsource(method)))
    return named | popped


def test_every_load_lora_weights_keyword_is_accepted_or_refused_by_name(pipe, lora_a, tmp_path):
    keywords = _diffusers_load_keywords()
    assert {"hotswap", "low_cpu_mem_usage", "proxies", "use_safetensors", "unet_config"} <= keywords
    handled = {"adapter_name", "hotswap", *loader._LOAD_KWARGS}
    assert keywords <= handled, f"load_visadapt does not handle {sorted(keywords - handled)}"

    before = every_tensor(pipe)
    # refused, each naming itself and the fix, the pipeline untouched
    refusals = [
        ({"use_safetensors": False}, ValueError, r"use_safetensors=False asks for pickled.*unpickling can run"),
        ({"unet_config": {**pipe.unet.config, "cross_attention_dim": 768}}, ValueError,
         r"unet_config= differs from this pipeline's UNet config \(in cross_attention_dim\)"),
        ({"low_cpu_mem_usage": True, "strict": False}, ValueError, r"low_cpu_mem_usage=True .*strict=False"),
    ]
    for kwargs, error, pattern in refusals:
        with pytest.raises(error, match=pattern):
            pipe.load_visadapt(lora_a, **kwargs)
        assert pipe.list_visadapt() == {}
    assert_same_tensors(before, every_tensor(pipe))

    # accepted: a local path needs no proxy; safetensors only; the pipeline's own UNet config
    name, metadata = pipe.load_visadapt(lora_a, adapter_name="a", proxies={"https": "http://proxy:3128"},
                                        use_safetensors=True, unet_config=pipe.unet.config, force_download=False,
                                        return_lora_metadata=True)
    assert name == "a"
    assert metadata["component"] == "unet" and metadata["plugin"] == "lora" and metadata["config"]["rank"] == 4


def test_proxies_for_a_hub_download_are_refused_where_huggingface_hub_ignores_them(pipe, tmp_path, monkeypatch):
    import huggingface_hub

    from visadapt import hub

    proxies = {"https": "http://proxy:3128"}

    def old_hub_download(repo_id, filename, *, cache_dir=None, local_files_only=False, proxies=None):
        raise AssertionError("not called")

    def new_hub_download(repo_id, filename, *, cache_dir=None, local_files_only=False):
        raise AssertionError("not called")

    # a huggingface_hub that still takes per-call proxies gets them; one that ignores them (>= 1.0) is refused
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", old_hub_download)
    assert hub._download_kwargs({"proxies": proxies, "revision": None}) == {"proxies": proxies}
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", new_hub_download)
    with pytest.raises(TypeError, match="ignores per-call proxies; set the HTTPS_PROXY"):
        hub._download_kwargs({"proxies": proxies})
    monkeypatch.undo()
    # the installed one, end to end
    import inspect

    if "proxies" not in inspect.signature(huggingface_hub.hf_hub_download).parameters:
        with pytest.raises(TypeError, match="ignores per-call proxies; set the HTTPS_PROXY"):
            pipe.load_visadapt("visadapt-test/tiny-lora", proxies=proxies, cache_dir=tmp_path, local_files_only=True)
        assert pipe.list_visadapt() == {}


def test_low_cpu_mem_usage_skips_random_init_and_loads_the_same(pipe, lora_a, monkeypatch):
    calls = []
    original = torch.nn.init.kaiming_uniform_

    def counting_kaiming(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counting_kaiming)
    pipe.load_visadapt(lora_a, adapter_name="a")
    assert calls  # a plain load draws each LoRA A at random, then overwrites it with the file's
    normal_tensors, normal_image = every_tensor(pipe), generate(pipe)
    pipe.unload_visadapt()

    calls.clear()
    pipe.load_visadapt(lora_a, adapter_name="a", low_cpu_mem_usage=True)
    assert calls == []  # not drawn at all
    assert_same_tensors(normal_tensors, every_tensor(pipe))
    assert torch.equal(generate(pipe), normal_image)
    assert torch.nn.init.kaiming_uniform_ is original  # the initialisers are put back afterwards


def test_hotswap_replaces_weights_in_place(pipe, lora_a, tmp_path, base_image):
    lora_c = lora_file(tmp_path / "c.safetensors", pipe.unet, seed=7)  # same plugin, config and sites as lora_a
    pipe.load_visadapt(lora_c, adapter_name="c", weight=0.5)
    c_at_half = generate(pipe)
    pipe.unload_visadapt()

    pipe.load_visadapt(lora_a, adapter_name="x")
    pipe.set_visadapt_weights("x", 0.5)
    modules = {(i.host_path, i.kind): i.module for i in inject.attached(pipe.unet, "x")}
    params = {name: param for name, param in pipe.unet.named_parameters() if "x" in name.split(".")}
    assert (generate(pipe) - c_at_half).abs().max() > 1e-3  # lora_a's output, not lora_c's yet
    assert pipe.load_visadapt(lora_c, adapter_name="x", hotswap=True) == "x"
    assert {(i.host_path, i.kind): i.module for i in inject.attached(pipe.unet, "x")} == modules  # same objects
    assert all(param is dict(pipe.unet.named_parameters())[name] for name, param in params.items())
    assert pipe.list_visadapt() == {"unet": ["x"]}
    assert visadapt.get_weight(pipe.unet, "x") == 0.5  # kept: a compiled graph reads it
    assert torch.equal(generate(pipe), c_at_half)

    # a disabled adapter stays disabled; low_cpu_mem_usage and weight= combine with hotswap
    pipe.disable_visadapt()
    pipe.load_visadapt(lora_a, adapter_name="x", hotswap=True, low_cpu_mem_usage=True)
    assert torch.equal(generate(pipe), base_image)
    pipe.enable_visadapt()
    pipe.load_visadapt(lora_c, adapter_name="x", hotswap=True, weight=0.5)
    assert torch.equal(generate(pipe), c_at_half)


def test_hotswap_refuses_what_does_not_fit_and_changes_nothing(pipe, lora_a, lora_b, tmp_path):
    pipe.load_visadapt(lora_a, adapter_name="x")
    before, image = every_tensor(pipe), generate(pipe)
    rank_2 = lora_file(tmp_path / "rank2.safetensors", pipe.unet, seed=3, rank=2)
    cases = [
        (lambda: pipe.load_visadapt(lora_b, adapter_name="x", hotswap=True), loader.VisadaptPipelineError,
         (r"does not fit adapter 'x' in place[\s\S]*config targets: loaded \('q', 'v', 'conv2'\), new \('k', "
         r"'to_out', 'conv1'\)[\s\S]*only in the loaded adapter")),
        (lambda: pipe.load_visadapt(rank_2, adapter_name="x", hotswap=True), loader.VisadaptPipelineError,
         r"config rank: loaded 4, new 2[\s\S]*site .*\(4, 32\).*\(2, 32\)"),
        (lambda: pipe.load_visadapt(lora_a, adapter_name="nope", hotswap=True), ValueError,
         r"hotswap=True replaces the weights of an adapter already loaded.*\('x'\)"),
        (lambda: pipe.load_visadapt(lora_a, hotswap=True), ValueError, r"pass adapter_name="),
        (lambda: pipe.load_visadapt(tmp_path / "missing.safetensors", adapter_name="x", hotswap=True),
         io.AdapterFileError, "does not exist"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()
        assert pipe.list_visadapt() == {"unet": ["x"]}  # no scratch adapter left behind
        assert_same_tensors(before, every_tensor(pipe))
    assert torch.equal(generate(pipe), image)


def test_diffusers_own_hotswap_refuses_an_unknown_name_too(pipe, tmp_path):
    peft_folder = _peft_lora_folder(pipe, tmp_path / "peft")
    with pytest.raises(ValueError, match="no existing adapter by that name"):
        pipe.load_lora_weights(peft_folder, adapter_name="nope", hotswap=True)


def test_disable_enable_set_adapters_get_active(pipe, lora_a, lora_b, base_image):
    pipe.load_visadapt(lora_a, adapter_name="a")
    only_a = generate(pipe)
    pipe.load_visadapt(lora_b, adapter_name="b")
    both = generate(pipe)
    assert pipe.get_active_visadapt() == ["a", "b"]
    assert pipe.get_list_visadapt() == pipe.list_visadapt() == {"unet": ["a", "b"]}

    pipe.disable_visadapt()
    assert torch.equal(generate(pipe), base_image)  # the base pipeline exactly
    assert pipe.get_active_visadapt() == ["a", "b"]  # as diffusers: disabling does not change the choice
    pipe.enable_visadapt()
    assert torch.equal(generate(pipe), both)

    pipe.set_visadapt_adapters("a")  # diffusers' set_adapters: only the named run
    assert pipe.get_active_visadapt() == ["a"]
    assert torch.equal(generate(pipe), only_a)
    pipe.disable_visadapt()
    assert torch.equal(generate(pipe), base_image)
    pipe.enable_visadapt()
    assert torch.equal(generate(pipe), only_a)  # back to the chosen set, not to all
    pipe.set_visadapt_adapters(["a", "b"], [1.0, {"unet": 1.0, "text_encoder": 0.3}])  # diffusers' dict form
    assert torch.equal(generate(pipe), both)
    with pytest.raises(ValueError, match="names 'transformer', not a component"):
        pipe.set_visadapt_adapters(["a", "b"], {"transformer": 0.5})
    with pytest.raises(TypeError, match="per-block"):
        pipe.set_visadapt_adapters("a", {"unet": {"down": 0.5}})
    assert pipe.get_active_visadapt() == ["a", "b"] and visadapt.get_weight(pipe.unet, "a") == 1.0

    pipe.fuse_visadapt(adapter_names="a")
    with pytest.raises(ValueError, match="'a' on unet are fused.*unfuse_visadapt"):
        pipe.disable_visadapt()
    with pytest.raises(ValueError, match="'a' on unet are fused"):
        pipe.set_visadapt_adapters("b")
    pipe.unfuse_visadapt()


def test_disable_matches_diffusers_disable_lora_semantics(pipe, lora_a, tmp_path, base_image):
    """Each library's disable switches off its own adapters only: both off gives the base image exactly."""
    peft_folder = _peft_lora_folder(pipe, tmp_path / "peft")
    pipe.load_lora_weights(peft_folder, adapter_name="peft_lora")
    only_peft = generate(pipe)
    pipe.load_visadapt(lora_a, adapter_name="vis")
    both = generate(pipe)
    pipe.disable_visadapt()
    assert torch.equal(generate(pipe), only_peft)
    pipe.disable_lora()
    assert torch.equal(generate(pipe), base_image)
    pipe.enable_visadapt()
    only_vis = generate(pipe)
    assert (only_vis - base_image).abs().max() > 1e-3
    pipe.enable_lora()
    assert torch.equal(generate(pipe), both)


def test_loaded_while_disabled_waits_like_the_others(pipe, lora_a, lora_b, base_image):
    pipe.load_visadapt(lora_a, adapter_name="a")
    pipe.disable_visadapt()
    pipe.load_visadapt(lora_b, adapter_name="b")
    assert torch.equal(generate(pipe), base_image)
    pipe.enable_visadapt()
    assert pipe.get_active_visadapt() == ["a", "b"]


def test_delete_visadapt(pipe, lora_a, lora_b):
    pipe.load_visadapt(lora_b, adapter_name="b")
    only_b = generate(pipe)
    pipe.unload_visadapt()
    pipe.load_visadapt(lora_a, adapter_name="a")
    pipe.load_visadapt(lora_b, adapter_name="b")
    with pytest.raises(KeyError, match="no visadapt adapter named 'c'"):
        pipe.delete_visadapt(["a", "c"])
    assert pipe.list_visadapt() == {"unet": ["a", "b"]}  # nothing deleted
    pipe.fuse_visadapt(adapter_names="a")
    pipe.delete_visadapt("a")  # fused: unfused first
    assert pipe.list_visadapt() == {"unet": ["b"]}
    assert torch.equal(generate(pipe), only_b)


def test_fuse_components_and_argument_order(pipe, lora_a):
    pipe.load_visadapt(lora_a, adapter_name="a")
    unfused = generate(pipe)
    with pytest.raises(ValueError, match="'vae' is not a component .*visadapt adapts; adaptable: unet"):
        pipe.fuse_visadapt(components=["vae"])
    with pytest.raises(TypeError, match=r"these are adapter names; diffusers' order .*adapter_names=\['a'\]"):
        pipe.fuse_visadapt(["a"])
    pipe.fuse_visadapt(components=["unet"], lora_scale=1.0)
    torch.testing.assert_close(generate(pipe), unfused, atol=1e-5, rtol=1e-4)
    pipe.unfuse_visadapt(components=["unet"])
    assert torch.equal(generate(pipe), unfused)


def _nan_lora_file(path: Path, unet: nn.Module) -> Path:
    """A visadapt LoRA whose first B matrix holds a NaN: fusing it gives a NaN weight."""
    good = lora_file(path.with_name("good_for_nan.safetensors"), unet, seed=11)
    tensors, meta = visadapt.read_adapter_file(good)
    key = next(k for k in sorted(tensors) if k.endswith("B.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    meta = {**meta, "tensors_sha256": io.tensors_digest(tensors)}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_safe_fusing_refuses_nan_and_leaves_the_pipeline_unfused(pipe, lora_a, tmp_path):
    nan_lora = _nan_lora_file(tmp_path / "nan.safetensors", pipe.unet)
    pipe.load_visadapt(lora_a, adapter_name="good")
    pipe.load_visadapt(nan_lora, adapter_name="broken")
    before = every_tensor(pipe)
    with pytest.raises(ValueError, match=r"safe_fusing=True: fusing adapter 'broken' gives NaN/inf in .*nothing"):
        pipe.fuse_visadapt(safe_fusing=True)
    assert_same_tensors(before, every_tensor(pipe))  # "good", fused before "broken", was unfused again
    pipe.set_visadapt_weights("good", 0.5)  # not fused: its weight can change
    pipe.set_visadapt_weights("good", 1.0)
    pipe.fuse_visadapt(safe_fusing=True, adapter_names="good")  # a healthy adapter fuses
    pipe.unfuse_visadapt()
    pipe.fuse_visadapt(adapter_names="broken")  # without safe_fusing the NaN goes in, as in diffusers
    weight = pipe.unet.get_submodule(next(i.host_path for i in inject.attached(pipe.unet, "broken"))).weight
    assert not torch.isfinite(weight).all()


def test_diffusers_safe_fusing_refuses_a_nan_lora_too(pipe, tmp_path):
    """The owner's semantics: ``fuse_lora(safe_fusing=True)`` raises on a LoRA that fuses to NaN."""
    peft_folder = _peft_lora_folder(pipe, tmp_path / "peft")
    state = load_file(str(peft_folder / "pytorch_lora_weights.safetensors"))
    key = next(k for k in sorted(state) if "lora_B" in k)
    state[key][0, 0] = float("nan")
    pipe.load_lora_weights(state, adapter_name="broken")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        pipe.fuse_lora(components=["unet"], safe_fusing=True)


def test_hotswap_under_torch_compile_needs_no_recompilation(pipe, lora_a, tmp_path):
    """The point of hotswap in diffusers: a compiled UNet takes the new adapter without recompiling. Here dynamo
    (eager backend: tracing and guards, no code generation) must neither recompile nor keep the old weights."""
    import torch._dynamo

    lora_c = lora_file(tmp_path / "c.safetensors", pipe.unet, seed=7)
    reference = copy.deepcopy(pipe)
    reference.load_visadapt(lora_c, adapter_name="x")
    expected = generate(reference)

    torch._dynamo.reset()
    pipe.load_visadapt(lora_a, adapter_name="x")
    pipe.unet.forward = torch.compile(pipe.unet.forward, backend="eager")
    try:
        before = generate(pipe)
        assert (before - expected).abs().max() > 1e-3
        with torch._dynamo.config.patch(error_on_recompile=True):
            pipe.load_visadapt(lora_c, adapter_name="x", hotswap=True)
            assert torch.equal(generate(pipe), expected)
    finally:
        torch._dynamo.reset()


def test_disable_switches_a_resadapter_off_entirely(pipe, tmp_path, base_image):
    """Unlike weight 0 (which keeps a ResAdapter's norms, as the official loader does), disabling gives the base
    pipeline bit for bit, norms included."""
    unet = copy.deepcopy(pipe.unet)
    visadapt.attach(unet, "resadapter")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in visadapt.trainable_parameters(unet):
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    pipe.load_visadapt(visadapt.save_adapter(unet, tmp_path / "resadapter.safetensors"), adapter_name="res")
    adapted = generate(pipe)
    assert (adapted - base_image).abs().max() > 1e-3
    pipe.disable_visadapt()
    assert torch.equal(generate(pipe), base_image)
    pipe.enable_visadapt()
    assert torch.equal(generate(pipe), adapted)


def head_lora_file(path: Path, unet: nn.Module, seed: int) -> Path:
    """A visadapt LoRA file stored with a head (the UNet's ``conv_out``), both changed from the base at random."""
    unet = copy.deepcopy(unet)
    visadapt.attach(unet, "lora", rank=4, alpha=4.0, targets=("q", "v"), head="conv_out")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if inject.ADAPTERS_ATTR in name or name.startswith("conv_out."):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return visadapt.save_adapter(unet, path)


def test_a_file_whose_head_is_conv_out_is_refused_and_the_pipeline_stays_as_it_was(pipe, tmp_path):
    """A UNet has no classifier: a file naming its image output ``conv_out`` as head is refused, by a load and a
    hotswap alike, before anything is attached or written (conv_out used to be overwritten and stay so)."""
    plain = lora_file(tmp_path / "plain.safetensors", pipe.unet, seed=1, targets=("q", "v"))
    crafted = head_lora_file(tmp_path / "crafted.safetensors", pipe.unet, seed=2)
    before = every_tensor(pipe)
    with pytest.raises(io.AdapterFileError, match="header field 'head' names 'conv_out', which is not this model's "
                                                  "classifier; expected '' "):
        pipe.load_visadapt(crafted, adapter_name="x")
    assert pipe.list_visadapt() == {}
    assert_same_tensors(before, every_tensor(pipe))
    pipe.load_visadapt(plain, adapter_name="x")
    loaded = every_tensor(pipe)
    with pytest.raises(io.AdapterFileError, match="header field 'head' names 'conv_out'"):
        pipe.load_visadapt(crafted, adapter_name="x", hotswap=True)
    assert_same_tensors(loaded, every_tensor(pipe))
    pipe.unload_visadapt()
    assert_same_tensors(before, every_tensor(pipe))
