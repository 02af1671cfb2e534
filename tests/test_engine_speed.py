"""The engine's speed paths on CPU: precision choice, torch.compile without per-step recompiles (MoSA draws,
PPAP routing), compiled == eager, the attention backends and the xformers fallback, and device-side transforms.

Compiles count graphs with ``torch._dynamo.testing.CompileCounter`` (a backend that only counts) or run them with
``aot_eager`` (autograd traced, eager kernels: no C++ build); one test compiles with inductor where a C++
compiler exists. TorchDynamo's caches are reset around every test.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import tiny_models
import torch
import torch._dynamo
import torch.nn.functional as F
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounter
from torch.utils.data import Dataset, Subset

import visadapt
from visadapt import attention
from visadapt.attention import attention_report, set_attention
from visadapt.engine import TrainConfig, default_eval_batch_size, device_transform, fit, resolve_precision
from visadapt.plugins.mosa import (
    MoSAPlugin,
    SparseModulesLinear,
    splitmix64_tensor,
    stable_hash,
    unsigned_mod,
)
from visadapt.plugins.ppap import use_expert
from visadapt.registry import get_plugin, list_plugins

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(seed: int = 0, n: int = 4, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


class _Images(Dataset):
    """``n`` random ``(3, 32, 32)`` images with labels in ``[0, classes)``; ``uint8=True`` stores them as uint8
    and carries a ``device_transform`` that maps a batch to the float images of the ``uint8=False`` twin."""

    def __init__(self, n: int, seed: int, uint8: bool = False, classes: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.raw = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.uint8 = uint8
        self.calls: list[tuple[torch.dtype, tuple]] = []
        if uint8:
            self.device_transform = self._to_float

    @staticmethod
    def _normalise(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - 0.5) / 0.25

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append((images.dtype, tuple(images.shape)))
        return self._normalise(images)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.raw[i] if self.uint8 else self._normalise(self.raw[i])
        return image, self.labels[i]


# ------------------------------------------------------------------------------------------------ precision


def test_precision_choices_and_the_eval_batch_default(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("visadapt.engine._initialized_precision", lambda: None)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision("fp32", cpu) == "no"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp16", cpu) == "fp16"
    assert resolve_precision("auto", cpu) == "no"  # no bf16 default off CUDA
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what a plain `accelerate launch` sets
    assert resolve_precision("auto", cpu) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "no"  # an explicit choice beats the launch
    with pytest.raises(ValueError, match="precision 'half'"):
        resolve_precision("half", cpu)
    with pytest.raises(ValueError, match="precision='half' must be one of auto, bf16, fp16, fp32"):
        TrainConfig(precision="half")
    with pytest.raises(ValueError, match="attention='flash' must be one of sdpa, eager, xformers"):
        TrainConfig(attention="flash")
    assert TrainConfig().eval_batch_size == default_eval_batch_size() == (512 if torch.cuda.is_available() else 256)


def test_explicit_precision_beats_the_launch_env_and_is_recorded(tmp_path):
    """In a process of its own (Accelerate keeps the precision of a process's first Accelerator): the launch
    says bf16, the run asks for fp32 and gets it; asking for bf16 afterwards in that process is refused."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import tiny_models, visadapt
        from test_engine_speed import _Images
        from visadapt.engine import TrainConfig, fit, make_accelerator
        torch.manual_seed(0)
        model = tiny_models.vit()
        visadapt.attach(model, "adapter", head="head")
        config = TrainConfig(epochs=1, batch_size=8, eval_batch_size=8, warmup_epochs=0, precision="fp32",
                             progress=False)
        result = fit(model, _Images(8, 0), _Images(8, 1), config)
        print("precision", result.precision)
        try:
            make_accelerator(precision="bf16")
        except ValueError as err:
            print("refused", "new process" in str(err))
    """)
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "PYTHONPATH": str(ROOT / "tests")}
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "precision fp32" in out.stdout and "refused True" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------------ compile


def test_splitmix_in_tensor_ops_matches_the_python_hash():
    g = torch.Generator().manual_seed(0)
    values = [int(v) for v in torch.randint(0, 2**62, (256,), generator=g)]
    values = [v * 4 + 3 for v in values[:128]] + values[128:]  # high bit set on half of them (after the shift)
    calls = [int(c) for c in torch.randint(0, 64, (256,), generator=g)]
    for n in (2, 3, 4, 7, 255):
        expected = [stable_hash(v, c) % n for v, c in zip(values, calls)]
        # stable_hash(v, c) = mix(mix(0 ^ v) ^ c): the tensor form takes the state after v, as set_step stores it
        state = torch.tensor([stable_hash(v) - (1 << 64) if stable_hash(v) >= 1 << 63 else stable_hash(v)
                              for v in values])
        got = unsigned_mod(splitmix64_tensor(state ^ torch.tensor(calls)), n)
        assert got.tolist() == expected, n


def test_mosa_draws_compile_once_and_match_eager_step_for_step():
    """MoSA draws a module per call from (seed, block, role, step, call). Eager draws with Python integers,
    which a compiled graph would bake in and guard (one recompile per step); the compiled forward draws the
    same indices with tensor ops on buffers, so the graph count stays at one while steps go by, and the
    compiled model's losses and gradients equal eager's step for step (two passes per step: consistency)."""
    torch.manual_seed(0)
    eager = tiny_models.vit()
    config = visadapt.attach(eager, "mosa", head="head", dropout=0.0)  # no RNG: the draws alone decide
    assert config.consistency_weight > 0  # two forward calls per step, each drawing
    compiled = copy.deepcopy(eager)
    counter = CompileCounter()
    compiled.compile(backend=counter)
    plugin = MoSAPlugin()
    frames = []
    for step in range(4):
        x, y = _batch(step)
        grads = []
        for model in (eager, compiled):
            plugin.on_step(model, step)
            model.zero_grad(set_to_none=True)
            loss = plugin.training_loss(model, config, x, y, F.cross_entropy)
            loss.backward()
            grads.append((loss.detach(), [p.grad for p in visadapt.trainable_parameters(model)]))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        frames.append(counter.frame_count)
    assert frames == [1] * 4, frames
    drawn = {layer.last_drawn for layer in eager.modules() if isinstance(layer, SparseModulesLinear)}
    assert drawn  # eager still records its draws


def test_ppap_routing_changes_do_not_recompile_after_each_route_was_seen():
    """PPAP routes all experts' modules to one index. The route picks which parameters take part, so each route
    is its own graph (a stacked, tensor-indexed form would hand zero gradients to the other experts, and AdamW
    moves parameters with zero gradients); after every route ran once, switching routes compiles nothing."""
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.attach(model, "ppap", num_experts=3)
    counter = CompileCounter()
    model.compile(backend=counter)
    routes = [0, 1, 2, None]
    x, _ = _batch()
    seen = []
    for _ in range(3):
        for route in routes:
            use_expert(model, route)
            model(x)
            seen.append(counter.frame_count)
    assert seen[: len(routes)] == [1, 2, 3, 4]
    assert set(seen[len(routes):]) == {len(routes)}, seen


def test_compiled_and_eager_agree_on_a_tiny_vit_with_an_adapter():
    """Outputs and adapter gradients of the compiled model equal eager's within float tolerance; inductor where
    a C++ compiler exists (the machine's real kernels), else aot_eager."""
    backend = "inductor" if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++") else "aot_eager"
    print(f"backend: {backend}")
    torch.manual_seed(0)
    eager = tiny_models.vit(depth=1)
    visadapt.attach(eager, "adapter", head="head", dropout=0.0)  # compiled RNG streams differ from eager's
    compiled = copy.deepcopy(eager)
    compiled.compile(backend=backend)
    x, y = _batch(3)
    results = []
    for model in (eager, compiled):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in visadapt.trainable_parameters(model)]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        compiled.eval(), eager.eval()
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    # compiled in place: the names a saved adapter or a checkpoint uses are the eager model's
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_fit_compiles_once_keeps_mosa_steps_free_of_recompiles_and_leaves_the_model_as_it_came(tmp_path):
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.attach(model, "mosa", head="head", consistency_weight=0.0)
    keys = list(model.state_dict())
    counter = CompileCounter()
    frames = []
    config = TrainConfig(epochs=3, batch_size=8, eval_batch_size=8, warmup_epochs=0, lr=1e-2, compile=True,
                         compile_backend=counter, progress=False)
    result = fit(model, _Images(24, 0), _Images(8, 1), config, output_dir=tmp_path,
                 before_epoch=lambda m, epoch: frames.append(counter.frame_count))
    assert result.compiled and result.precision == "fp32" and result.attention == {"sdpa": 2}
    # epoch 1 compiles the training and the evaluation graphs; epochs 2 and 3 (9 MoSA steps) compile nothing
    assert frames[0] == 0 and frames[1] > 0 and frames[2] == frames[1] == counter.frame_count, frames
    assert model._compiled_call_impl is None and list(model.state_dict()) == keys
    visadapt.save_adapter(model, tmp_path / "adapter.safetensors")  # an uncompiled model again
    checkpoint = next((tmp_path / "checkpoints").glob("step_*"))
    stored = load_file(str(checkpoint / "trainable.safetensors"))
    assert stored and not any("_draw_" in key for key in stored)  # per-step draw state is rebuilt, not stored


# ------------------------------------------------------------------------------------------------ attention


def test_set_attention_switches_every_timm_attention_module_and_reports_it():
    torch.manual_seed(0)
    vit, swin = tiny_models.vit(), tiny_models.swin()
    assert attention_report(swin).counts == {"eager": 3}  # timm leaves Swin's window attention unfused
    x, _ = _batch()
    with torch.no_grad():
        for model, n in ((vit, 2), (swin, 3)):
            model.eval()
            report = set_attention(model, "eager", notice=None)
            assert report.counts == {"eager": n} and not report.notices
            reference = model(x)
            assert set_attention(model, "sdpa", notice=None).counts == {"sdpa": n}
            assert all(m.fused_attn for _, m in attention.attention_modules(model))
            torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention backend 'flash' is not one of sdpa, eager, xformers"):
        set_attention(vit, "flash")


def _fake_xformers(monkeypatch, memory_efficient_attention):
    fake = types.ModuleType("xformers")
    fake.__version__ = "0.0.99"
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    monkeypatch.setattr(attention, "_XFORMERS_PROBES", {})
    return fake


def test_xformers_forward_computes_what_sdpa_computes(monkeypatch):
    """The xformers path with a stand-in kernel (SDPA in xformers' (B, N, heads, D) layout): same outputs and
    adapter gradients as the SDPA path, and switching back restores timm's own forward."""
    calls = []

    def memory_efficient_attention(q, k, v, p=0.0):
        calls.append(q.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p)
        return out.transpose(1, 2)

    _fake_xformers(monkeypatch, memory_efficient_attention)
    monkeypatch.setattr(attention, "xformers_usable", lambda device, dtype=None: (True, "xformers 0.0.99"))
    torch.manual_seed(0)
    sdpa = tiny_models.vit()
    visadapt.attach(sdpa, "lora", head="head")  # LoRA on qkv: the xformers forward must call self.qkv
    other = copy.deepcopy(sdpa)
    report = set_attention(other, "xformers", notice=None)
    assert report.counts == {"xformers": 2} and not report.notices
    x, y = _batch()
    grads = []
    for model in (sdpa, other):
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad for p in visadapt.trainable_parameters(model)])
    assert len(calls) == 2 and calls[0] == (4, 17, 2, 16)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert set_attention(other, "sdpa", notice=None).counts == {"sdpa": 2}
    assert all("forward" not in m.__dict__ for _, m in attention.attention_modules(other))


def test_xformers_falls_back_to_sdpa_in_fit_when_its_kernels_do_not_run(monkeypatch, capsys, tmp_path):
    """A wheel built for another torch imports but raises "No operator found" at the first call: fit probes it,
    prints ONE notice, runs SDPA, and trains exactly as a run asked for SDPA does."""

    def memory_efficient_attention(q, k, v, p=0.0):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")

    _fake_xformers(monkeypatch, memory_efficient_attention)
    results = []
    for backend in ("xformers", "sdpa"):
        torch.manual_seed(0)
        model = tiny_models.vit()
        visadapt.attach(model, "adapter", head="head")
        config = TrainConfig(epochs=2, batch_size=8, eval_batch_size=8, warmup_epochs=0, attention=backend,
                             progress=False)
        capsys.readouterr()
        results.append(fit(model, _Images(16, 0), _Images(8, 1), config))
        printed = [line for line in capsys.readouterr().out.splitlines() if "xformers" in line]
        if backend == "xformers":
            assert len(printed) == 1 and "No operator found" in printed[0] and "SDPA" in printed[0], printed
        assert attention_report(model).counts == {"sdpa": 2}
    assert results[0].attention == results[1].attention == {"sdpa": 2}
    assert [h["train_loss"] for h in results[0].history] == [h["train_loss"] for h in results[1].history]
    assert results[0].score_final == results[1].score_final


_REQUIRED_CONFIG = {"polyhistor": {"tasks": ("semseg",)}}  # plugins whose config has no usable default


@pytest.mark.parametrize("family, build", [("timm_vit", tiny_models.vit), ("timm_swin", tiny_models.swin)])
def test_attention_stays_fused_after_every_plugin_attaches(family, build):
    """Adapters hook ``qkv`` / ``proj`` / blocks in place: no registered plugin may switch timm's fused attention
    off or replace the attention modules."""
    plugins = [name for name in list_plugins() if family in get_plugin(name).families]
    assert len(plugins) >= 4, plugins
    for name in plugins:
        torch.manual_seed(0)
        model = build()
        n = set_attention(model, "sdpa", notice=None).total
        visadapt.attach(model, name, **_REQUIRED_CONFIG.get(name, {}))
        assert attention_report(model).counts == {"sdpa": n}, name


def test_fit_names_attention_modules_it_found_unfused(capsys):
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.attach(model, "adapter", head="head")
    model.blocks[1].attn.fused_attn = False
    config = TrainConfig(epochs=1, batch_size=8, eval_batch_size=8, warmup_epochs=0, progress=False)
    fit(model, _Images(8, 0), _Images(8, 1), config)
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]
    assert notices == ["notice: 1 timm attention modules were not fused (blocks.1.attn); running them on sdpa"]
    assert model.blocks[1].attn.fused_attn


# ------------------------------------------------------------------------------------------------ device transform


def test_fit_applies_each_datasets_device_transform_to_every_batch(tmp_path):
    """uint8 images in, the dataset's device_transform maps every train / eval / test batch on the device, and
    the run is the same as one on the float images."""
    histories = []
    for uint8 in (True, False):
        torch.manual_seed(0)
        model = tiny_models.vit()
        visadapt.attach(model, "adapter", head="head")
        train, val, test = _Images(16, 0, uint8), _Images(8, 1, uint8), _Images(6, 2, uint8)
        config = TrainConfig(epochs=2, batch_size=8, eval_batch_size=4, warmup_epochs=0, progress=False)
        result = fit(model, train, val, config, test_dataset=test, keep_best=True)
        histories.append(result.history)
        if uint8:
            assert train.calls == [(torch.uint8, (8, 3, 32, 32))] * 4  # 2 epochs x 2 batches
            assert val.calls == [(torch.uint8, (4, 3, 32, 32))] * 4
            assert test.calls == [(torch.uint8, (4, 3, 32, 32)), (torch.uint8, (2, 3, 32, 32))] * 2
    assert json.dumps(histories[0]) == json.dumps(histories[1])


def test_a_subset_takes_its_datasets_device_transform():
    images = _Images(8, 0, True)
    assert device_transform(Subset(Subset(images, range(6)), range(3))) == images.device_transform
    assert device_transform(Subset(_Images(8, 0), range(3))) is None  # float images: nothing to apply


def test_a_device_transform_that_is_not_callable_is_refused():
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.attach(model, "adapter", head="head")
    train = _Images(8, 0)
    train.device_transform = "normalise"
    with pytest.raises(TypeError, match="_Images.device_transform is a str, not a callable"):
        fit(model, train, _Images(8, 1), TrainConfig(epochs=1, batch_size=8, progress=False))
