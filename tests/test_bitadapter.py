"""The bitadapter plugin (1-bit AdaptFormer / LoRA): exact reload, packed file size, bad files, training."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from train_scripts import load_train_script

import visadapt
from visadapt.data.procedural import generate_mini_vtab
from visadapt.layers import QuantizedLinear


def _vit(num_classes: int = 5, **kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=num_classes, **kwargs)


def _train_a_little(model, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(visadapt.trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 32, 32)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _reloaded(model, path, num_classes: int = 5):
    """A fresh model with ``model``'s backbone weights and the adapter file ``path`` loaded, in eval mode."""
    fresh = _vit(num_classes=num_classes)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "visadapt_" not in k}, strict=False)
    visadapt.load_adapter(fresh, path)
    return fresh.eval()


@pytest.mark.parametrize("method", ["adaptformer", "lora"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_saved_file_reloads_to_the_trained_outputs_exactly(tmp_path, method, bits):
    torch.manual_seed(0)
    model = _vit()
    visadapt.attach(model, "bitadapter", method=method, dim=4, bits=bits, head="head")
    _train_a_little(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = visadapt.save_adapter(model, tmp_path / "bit.safetensors")
    fresh = _reloaded(model, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    if bits < 32:
        tensors, _ = visadapt.read_adapter_file(path)
        assert set(tensors) == {"codes", "stats", "head.weight", "head.bias"}
        layers = [m for m in fresh.modules() if isinstance(m, QuantizedLinear)]
        assert tensors["codes"].numel() == sum(-(-m.weight.numel() * bits // 8) for m in layers)
        assert not any(m.fake_quant for m in layers)


def test_one_bit_file_is_the_official_byte_stream_plus_a_small_header(tmp_path):
    """ViT-B/16, AdaptFormer dim 32, 1 bit, fp32 head, 8 classes: official raw size + < 2 KiB."""
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=8)
    visadapt.attach(model, "bitadapter", head="head")
    path = visadapt.save_adapter(model, tmp_path / "b.safetensors")
    # official stream: 24 matrices x (768*32 bits / 8 + float32 mean + std), then head weight and bias (fp32)
    official = 24 * (768 * 32 // 8 + 8) + 8 * 768 * 4 + 8 * 4
    assert official == 98_528
    assert 0 < os.path.getsize(path) - official <= 2048
    summary = visadapt.summary(model)
    assert summary.adapter_bytes == official
    assert summary.adapters["default"]["params"] == 24 * 768 * 32 + 8 * 768 + 8


def test_file_for_another_dim_is_refused_and_the_model_left_clean(tmp_path):
    model = _vit()
    visadapt.attach(model, "bitadapter", dim=4, head="head")
    path = visadapt.save_adapter(model, tmp_path / "d4.safetensors")
    tensors, meta = visadapt.read_adapter_file(path)
    config = json.loads(meta["config"])
    config["dim"] = 8
    meta["config"] = json.dumps(config)
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "d8.safetensors"), metadata=meta)
    fresh = _vit()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    # refused from the header and the stored shapes, before the dim-8 adapter is built
    with pytest.raises(visadapt.io.AdapterFileError, match=r"header field 'config' does not match the file's "
                                                           r"tensors.*codes: config \(192,\), file \(96,\)"):
        visadapt.load_adapter(fresh, tmp_path / "d8.safetensors")
    assert fresh.state_dict().keys() == before.keys()


def test_merge_is_refused_with_a_reason():
    model = _vit()
    visadapt.attach(model, "bitadapter")
    with pytest.raises(ValueError, match="ReLU"):
        visadapt.merge(model)


@pytest.mark.parametrize("field, value, message", [("bits", 3, "bits"), ("method", "houlsby", "method"),
                                                   ("dim", 0, "dim")])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        visadapt.attach(_vit(), "bitadapter", **{field: value})


def test_trains_with_train_vtab_and_the_loss_falls(tmp_path):
    vtab = load_train_script("vtab")
    data = generate_mini_vtab(tmp_path / "data", split_sizes={"train800": 16, "val200": 8, "test": 20})
    args = ["--data-root", str(data), "--output-dir", str(tmp_path / "run"), "--no-progress", "--task", "textures",
            "--epochs", "4", "--batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "0", "--adapter",
            "bitadapter", "--set", "dim=8"]
    assert vtab.main(args) == 0
    metrics = json.loads((tmp_path / "run" / "textures" / "metrics.json").read_text())
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0], losses
    assert metrics["adapter_config"]["bits"] == 1


def _official_bytes(model_for_shapes, bits: int, seed: int = 0) -> tuple[bytes, list]:
    """An official-format .bin written independently here: per matrix codes (low bits first), mean, std."""
    import struct

    gen = torch.Generator().manual_seed(seed)
    blob, expected = b"", []
    for layer in [m for m in model_for_shapes.modules() if isinstance(m, QuantizedLinear)]:
        n = layer.weight.numel()
        codes = torch.randint(0, 2 ** bits, (n,), generator=gen).tolist()
        per_byte = 8 // bits
        packed = bytearray()
        for start in range(0, n, per_byte):
            byte = 0
            for j, code in enumerate(codes[start:start + per_byte]):
                byte |= code << (j * bits)
            packed.append(byte)
        mean, std = 0.01 * (len(expected) + 1), 0.5 + 0.1 * len(expected)
        blob += bytes(packed) + struct.pack("<ff", mean, std)
        expected.append((codes, mean, std))
    return blob, expected


def test_official_checkpoint_converts_to_the_same_weights(tmp_path):
    from visadapt.layers import normal_codebook
    from visadapt.plugins.bitadapter import convert_official_checkpoint

    shapes = _vit(num_classes=3)
    visadapt.attach(shapes, "bitadapter", method="lora", dim=4, bits=2)
    blob, expected = _official_bytes(shapes, bits=2)
    head_w, head_b = torch.randn(3, 48), torch.randn(3)
    blob += head_w.numpy().astype("<f4").tobytes() + head_b.numpy().astype("<f4").tobytes()
    (tmp_path / "task.bin").write_bytes(blob)
    (tmp_path / "task.yaml").write_text("backbone: ViT-B_16\nbit: 2\ndataset: dtd\ndim: 4\nmethod: lora\n"
                                        "num_class: 3\nscale: 10\n")
    model = _vit(num_classes=3)
    out = convert_official_checkpoint(tmp_path / "task.bin", tmp_path / "task.yaml", model, tmp_path / "c.safetensors")
    codebook = normal_codebook(2)[0]
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(expected) == 2 * 2 * 2  # 2 blocks x (q, v) x (down, up)
    for layer, (codes, mean, std) in zip(layers, expected):
        want = codebook[torch.tensor(codes)].reshape(layer.weight.shape) * torch.tensor(std) + torch.tensor(mean)
        torch.testing.assert_close(layer.weight.detach(), want, atol=1e-6, rtol=0)
    assert torch.equal(model.head.weight.detach(), head_w) and torch.equal(model.head.bias.detach(), head_b)
    # the converted file loads on a fresh model to the same outputs
    fresh = _reloaded(model, out, 3)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert json.loads(visadapt.read_adapter_file(out)[1]["config"])["scale"] == 10.0


def test_official_checkpoint_of_the_wrong_size_is_refused_cleanly(tmp_path):
    from visadapt.plugins.bitadapter import convert_official_checkpoint

    (tmp_path / "t.bin").write_bytes(b"\0" * 100)
    (tmp_path / "t.yaml").write_text("bit: 1\ndim: 4\nmethod: adaptformer\nnum_class: 5\nscale: 1\n")
    model = _vit(num_classes=5)
    with pytest.raises(ValueError, match="has 100 bytes"):
        convert_official_checkpoint(tmp_path / "t.bin", tmp_path / "t.yaml", model, tmp_path / "o.safetensors")
    assert not any("visadapt_" in k for k in model.state_dict())


def test_spec_worked_example_bihead_file_size(tmp_path):
    """adaptformer-bihead dim 32 on clevr_count (8 classes): official 74,696 bytes; ours adds a header only."""
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=8)
    visadapt.attach(model, "bitadapter", quantize_head=True)
    path = visadapt.save_adapter(model, tmp_path / "bihead.safetensors")
    assert 24 * (768 * 32 // 8 + 8) + (768 * 8 // 8 + 8) == 74_696
    assert visadapt.summary(model).adapter_bytes == 74_696
    assert 0 < os.path.getsize(path) - 74_696 <= 2048
    assert not model.head.weight.requires_grad  # the model's own head idles


def test_quantized_head_replaces_the_classifier_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _vit(num_classes=4)
    visadapt.attach(model, "bitadapter", dim=4, quantize_head=True)
    _train_a_little(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        head = next(m for n, m in model.named_modules() if n.endswith("visadapt_adapters.default.head"))
        assert torch.equal(expected, head(features))  # the quantised head, not model.head, gives the logits
    path = visadapt.save_adapter(model, tmp_path / "h.safetensors")
    fresh = _reloaded(model, path, 4)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    visadapt.detach(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), fresh.head(fresh.forward_head(fresh.forward_features(x), pre_logits=True)))


def test_official_bihead_checkpoint_converts(tmp_path):
    from visadapt.plugins.bitadapter import convert_official_checkpoint

    shapes = _vit(num_classes=3)
    visadapt.attach(shapes, "bitadapter", dim=4, quantize_head=True)
    blob, expected = _official_bytes(shapes, bits=1)
    (tmp_path / "b.bin").write_bytes(blob)
    (tmp_path / "b.yaml").write_text("bit: 1\ndim: 4\nmethod: adaptformer-bihead\nnum_class: 3\nscale: 1\n")
    model = _vit(num_classes=3)
    convert_official_checkpoint(tmp_path / "b.bin", tmp_path / "b.yaml", model, tmp_path / "o.safetensors")
    head = next(m for n, m in model.named_modules() if n.endswith("visadapt_adapters.default.head"))
    codes, mean, std = expected[-1]
    from visadapt.layers import normal_codebook
    want = normal_codebook(1)[0][torch.tensor(codes)].reshape(3, 48) * torch.tensor(std) + torch.tensor(mean)
    torch.testing.assert_close(head.weight.detach(), want, atol=1e-6, rtol=0)
    assert json.loads(visadapt.read_adapter_file(tmp_path / "o.safetensors")[1]["config"])["quantize_head"]


def test_convert_bitadapter_command(tmp_path, capsys):
    from visadapt.cli import main

    shapes = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    visadapt.attach(shapes, "bitadapter", dim=2)
    blob, _ = _official_bytes(shapes, bits=1)
    blob += torch.zeros(3 * 192 + 3).numpy().astype("<f4").tobytes()
    (tmp_path / "dtd-bit1-dim2.bin").write_bytes(blob)
    (tmp_path / "dtd-bit1-dim2.yaml").write_text("bit: 1\ndim: 2\nmethod: adaptformer\nnum_class: 3\nscale: 0.01\n")
    out = tmp_path / "dtd.safetensors"
    assert main(["convert-bitadapter", str(tmp_path / "dtd-bit1-dim2.bin"), str(tmp_path / "dtd-bit1-dim2.yaml"),
                 "--model", "vit_tiny_patch16_224", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    _, meta = visadapt.read_adapter_file(out)
    assert meta["plugin"] == "bitadapter" and meta["converted_from"] == "dtd-bit1-dim2.bin"
    assert main(["convert-bitadapter", str(tmp_path / "missing.bin"), str(tmp_path / "dtd-bit1-dim2.yaml"),
                 "--model", "vit_tiny_patch16_224", "-o", str(out)]) == 2
    assert "missing.bin" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [1, 4])
def test_any_bottleneck_plugin_stores_k_bit_weights_packed(tmp_path, bits):
    """The plain `adapter` plugin with bits < 32: shared quantiser, packed storage, fp32 biases, exact reload."""
    torch.manual_seed(0)
    model = _vit()
    visadapt.attach(model, "adapter", style="houlsby", bottleneck=4, bits=bits, head="head")
    _train_a_little(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = visadapt.save_adapter(model, tmp_path / "a.safetensors")
    tensors, _ = visadapt.read_adapter_file(path)
    assert not any(k.endswith(("down.weight", "up.weight")) for k in tensors)
    assert any(k.endswith("down.bias") for k in tensors) and tensors["stats"].shape == (2 * 2 * 2, 2)
    assert tensors["codes"].numel() == 2 * 2 * 2 * (-(-48 * 4 * bits // 8))
    fresh = _reloaded(model, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("bits", [1, 2])
def test_lora_plugin_at_k_bits_stores_packed_reloads_exactly_and_merges(tmp_path, bits):
    """The plain `lora` plugin with bits < 32: A and B go through the quantiser in the forward, the merge
    folds the same quantised product into the base weight, and the file holds packed codes only."""
    torch.manual_seed(0)
    model = _vit()
    visadapt.attach(model, "lora", rank=4, alpha=4.0, bits=bits, head="head")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 2 * 2 * 2  # 2 blocks x q, v x A, B
    _train_a_little(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        visadapt.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        visadapt.unmerge(model)
    path = visadapt.save_adapter(model, tmp_path / "lora.safetensors")
    tensors, _ = visadapt.read_adapter_file(path)
    assert not any(k.endswith(("A.weight", "B.weight")) for k in tensors)
    assert tensors["codes"].numel() == 2 * 2 * (-(-48 * 4 * bits // 8)) * 2
    with torch.no_grad():
        assert torch.equal(_reloaded(model, path)(x), expected)


def test_lora_plugin_refuses_k_bits_on_a_convolution():
    import tiny_models

    with pytest.raises(ValueError, match="convolution, use bits=32"):
        visadapt.attach(tiny_models.unet(), "lora", targets=("conv1",), bits=1)


# ------------------------------------------------------------------ fidelity: the head's bits, the codebook start


def _quantized_head(model):
    return next(m for n, m in model.named_modules() if n.endswith("visadapt_adapters.default.head"))


@pytest.mark.parametrize("bits", [2, 8])
def test_quantized_head_is_one_bit_whatever_the_adapter_bits_as_official(bits):
    """Official main.py: `vit.head = QLinear(768, C, 1)` for every --bit; the adapters use --bit."""
    model = _vit(num_classes=4)
    visadapt.attach(model, "bitadapter", dim=4, bits=bits, quantize_head=True)
    head = _quantized_head(model)
    assert isinstance(head, QuantizedLinear) and head.bits == 1 and head.bias is None
    assert {m.bits for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m is not head} == {bits}
    # the 1-bit head's forward is mean + 0.6745 * std * sign(w - mean) (official codebook {ppf(.25), ppf(.75)})
    w = head.weight.detach()
    want = w.mean() + 0.6745 * w.std() * torch.sign(w - w.mean())
    torch.testing.assert_close(head.forward_weight().detach(), want, atol=1e-4, rtol=0)


def test_head_bits_option_quantizes_the_head_at_another_width(tmp_path):
    model = _vit(num_classes=4)
    visadapt.attach(model, "bitadapter", dim=4, bits=1, quantize_head=True, head_bits=4)
    assert _quantized_head(model).bits == 4
    _train_a_little(model, steps=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = visadapt.save_adapter(model, tmp_path / "h4.safetensors")
    fresh = _reloaded(model, path, 4)
    assert _quantized_head(fresh).bits == 4
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    fp32 = _vit(num_classes=4)
    visadapt.attach(fp32, "bitadapter", dim=4, quantize_head=True, head_bits=32)
    assert type(_quantized_head(fp32)) is torch.nn.Linear


def test_file_saved_before_head_bits_keeps_its_k_bit_head(tmp_path):
    """A header without head_bits (or codebook_start) is an old file: its head was quantised at `bits`."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _vit(num_classes=4)
    visadapt.attach(model, "bitadapter", dim=4, bits=2, quantize_head=True, head_bits=2)
    _train_a_little(model, steps=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = visadapt.save_adapter(model, tmp_path / "new.safetensors")
    tensors, meta = visadapt.read_adapter_file(path)
    config = json.loads(meta["config"])
    del config["head_bits"], config["codebook_start"]
    meta["config"] = json.dumps(config)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    fresh = _reloaded(model, tmp_path / "old.safetensors", 4)
    assert _quantized_head(fresh).bits == 2
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    # the same header fields given by a user (not a file) get today's defaults: the official 1-bit head
    assert visadapt.get_plugin("bitadapter")().Config.from_dict(config).head_bits == 1


def _official_codebook(bit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Restatement of the official `QLinear.quantize(bit)` (binary_adapter/utils.py): codewords from ALL ZEROS,
    500 rounds of (thresholds = midpoints; codeword = ppf of the cell's probability midpoint); the quantiser is
    `sum_i delta_i * sign(z - t_i)`, t the thresholds of the last round, delta half the final gaps."""
    values = torch.zeros(2 ** bit, dtype=torch.float64)
    ranges = None
    for _ in range(500):
        ranges = (values[1:] + values[:-1]) / 2
        pv = torch.cat([torch.zeros(1, dtype=torch.float64), torch.special.ndtr(ranges),
                        torch.ones(1, dtype=torch.float64)])
        values = torch.special.ndtri((pv[1:] + pv[:-1]) / 2)
    value, pos = values.float(), ranges.float()
    return value, pos, (value[1:] - value[:-1]) / 2


def test_zero_start_codebook_reproduces_the_official_8_bit_quantiser():
    from visadapt.layers import fake_quantize, normal_codebook

    value, pos, delta = _official_codebook(8)
    codes, thresholds = normal_codebook(8, start="zero")
    torch.testing.assert_close(codes, value, atol=1e-6, rtol=0)
    torch.testing.assert_close(thresholds, pos, atol=1e-6, rtol=0)
    assert (value.abs() < 0.1).sum() > 150  # not converged, levels crowd at 0: the departure the default avoids
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    mean, std = w.mean(), w.std()
    z = (w - mean) / (std + 1e-5)
    official = (torch.sign(z.unsqueeze(-1) - pos) * delta).sum(-1) * std + mean
    torch.testing.assert_close(fake_quantize(w, 8, start="zero")[0], official, atol=1e-5, rtol=0)
    # the default (quantile start) differs at 8 bits and has a lower error on normal data
    assert (fake_quantize(w, 8)[0] - official).abs().max() > 1e-3
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    errors = {start: (fake_quantize(z, 8, start=start)[0] - z).square().mean().item() for start in ("quantile", "zero")}
    assert errors["quantile"] * 5 < errors["zero"], errors


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_both_codebook_starts_agree_below_8_bits(bits):
    from visadapt.layers import normal_codebook

    value, *_ = _official_codebook(bits)
    for start in ("quantile", "zero"):
        torch.testing.assert_close(normal_codebook(bits, start=start)[0], value, atol=1e-6, rtol=0)


def test_codebook_start_zero_is_used_in_training_and_storage(tmp_path):
    torch.manual_seed(0)
    model = _vit()
    visadapt.attach(model, "bitadapter", method="lora", dim=4, bits=8, codebook_start="zero", head="head")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and {m.codebook_start for m in layers} == {"zero"}
    _train_a_little(model, steps=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    fresh = _reloaded(model, visadapt.save_adapter(model, tmp_path / "z.safetensors"))
    assert {m.codebook_start for m in fresh.modules() if isinstance(m, QuantizedLinear)} == {"zero"}
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_official_8_bit_checkpoint_converts_with_the_official_codebook(tmp_path):
    from visadapt.plugins.bitadapter import convert_official_checkpoint

    shapes = _vit(num_classes=3)
    visadapt.attach(shapes, "bitadapter", dim=4, bits=8, quantize_head=True)
    blob, expected = _official_bytes(shapes, bits=8)
    # _official_bytes wrote every matrix at 8 bits; the official head is 1 bit: swap its 3 x 48 codes for 1-bit ones
    (tmp_path / "b.bin").write_bytes(blob[:-(3 * 48 + 8)])
    head_blob, head_expected = _official_bytes(torch.nn.Sequential(QuantizedLinear(48, 3, 1)), bits=1, seed=1)
    (tmp_path / "b.bin").write_bytes((tmp_path / "b.bin").read_bytes() + head_blob)
    (tmp_path / "b.yaml").write_text("bit: 8\ndim: 4\nmethod: adaptformer-bihead\nnum_class: 3\nscale: 1\n")
    model = _vit(num_classes=3)
    convert_official_checkpoint(tmp_path / "b.bin", tmp_path / "b.yaml", model, tmp_path / "o.safetensors")
    official_8bit = _official_codebook(8)[0]
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer, (codes, mean, std) in zip(layers[:-1], expected[:-1]):
        want = official_8bit[torch.tensor(codes)].reshape(layer.weight.shape) * std + mean
        torch.testing.assert_close(layer.weight.detach(), want, atol=1e-5, rtol=0)
    (head_codes, head_mean, head_std), = head_expected
    assert layers[-1].bits == 1
    want = _official_codebook(1)[0][torch.tensor(head_codes)].reshape(3, 48) * head_std + head_mean
    torch.testing.assert_close(layers[-1].weight.detach(), want, atol=1e-6, rtol=0)
    config = json.loads(visadapt.read_adapter_file(tmp_path / "o.safetensors")[1]["config"])
    assert config["codebook_start"] == "zero" and config["head_bits"] == 1
