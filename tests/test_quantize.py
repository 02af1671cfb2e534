"""The shared k-bit quantiser: codebook values, straight-through gradients, bit packing, exact reload."""
from __future__ import annotations

import pytest
import torch

from visadapt.layers import (
    BottleneckAdapter,
    QuantizedLinear,
    dequantize,
    fake_quantize,
    normal_codebook,
    pack_codes,
    unpack_codes,
)


def test_codebooks_match_the_official_median_lloyd_values():
    codes, thresholds = normal_codebook(1)
    torch.testing.assert_close(codes, torch.tensor([-0.6745, 0.6745]), atol=1e-4, rtol=0)
    assert thresholds.tolist() == [0.0]
    codes, thresholds = normal_codebook(2)
    torch.testing.assert_close(codes, torch.tensor([-1.2657, -0.3778, 0.3778, 1.2657]), atol=1e-4, rtol=0)
    torch.testing.assert_close(thresholds, torch.tensor([-0.8217, 0.0, 0.8217]), atol=1e-4, rtol=0)
    for bits in (4, 8):
        codes, thresholds = normal_codebook(bits)
        assert codes.numel() == 2 ** bits and bool((codes.diff() > 0).all())
        torch.testing.assert_close(codes, -codes.flip(0), atol=1e-5, rtol=0)  # symmetric about 0


@pytest.mark.parametrize("bits", [0, 3, 16, 32])
def test_codebook_refuses_other_widths(bits):
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        normal_codebook(bits)


def test_one_bit_is_mean_plus_sign_times_0_6745_std():
    w = torch.randn(16, 8)
    w_hat, codes, mean, std = fake_quantize(w, 1)
    expected = mean + 0.6745 * (std) * torch.sign(w - mean)
    torch.testing.assert_close(w_hat, expected, atol=1e-4, rtol=0)
    assert codes.dtype == torch.uint8 and set(codes.unique().tolist()) <= {0, 1}


def test_straight_through_gradient_reaches_the_latent_weight():
    w = torch.randn(6, 5, requires_grad=True)
    w_hat, *_ = fake_quantize(w, 1)
    (w_hat * torch.arange(30.0).reshape(6, 5)).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_packing_round_trips_exactly(bits, numel):
    codes = torch.randint(0, 2 ** bits, (numel,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_packing_puts_the_first_code_in_the_low_bits():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10000001]
    assert pack_codes(torch.tensor([3, 0, 2, 1], dtype=torch.uint8), 2).tolist() == [0b01100011]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_exported_codes_reload_to_the_trained_forward_exactly(bits):
    torch.manual_seed(0)
    layer = QuantizedLinear(12, 5, bits)
    x = torch.randn(3, 12)
    trained = layer(x)
    packed, stats = layer.export_codes()
    fresh = QuantizedLinear(12, 5, bits)
    fresh.load_codes(packed, stats)
    assert not fresh.fake_quant
    assert torch.equal(fresh(x), trained)
    again, again_stats = fresh.export_codes()  # a loaded layer saves the very bytes it loaded
    assert torch.equal(again, packed) and torch.equal(again_stats, stats)


def test_dequantize_matches_fake_quantize():
    w = torch.randn(9, 4)
    w_hat, codes, mean, std = fake_quantize(w, 2)
    assert torch.equal(dequantize(codes, mean, std, 2), w_hat.detach())


def test_quantized_bottleneck_starts_near_zero_not_at_zero():
    adapter = BottleneckAdapter(16, 4, bits=1, bias=False)
    assert isinstance(adapter.up, QuantizedLinear) and adapter.up.weight.std() > 0
    assert adapter.up.weight.abs().max() <= 2e-3
    out = adapter(torch.randn(2, 16))
    assert out.shape == (2, 16) and out.abs().max() < 0.1
    assert isinstance(BottleneckAdapter(16, 4).up, torch.nn.Linear)
