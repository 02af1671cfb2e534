from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visadapt.layers import BottleneckAdapter, LoRA, add_rows


def test_lora_scaling_is_the_same_in_forward_and_merge_linear():
    base = nn.Linear(12, 6)
    lora = LoRA(12, 6, rank=4, alpha=16.0)  # scaling 4, not 1: a wrong factor would show
    nn.init.normal_(lora.B.weight)
    assert lora.scaling == 4.0
    x = torch.randn(5, 3, 12)
    unmerged = base(x) + lora(x)
    expected = F.linear(x, base.weight + 4.0 * lora.B.weight @ lora.A.weight, base.bias)
    assert torch.allclose(unmerged, expected, atol=1e-5)
    lora.merge_into(base.weight.data)
    assert torch.allclose(base(x), unmerged, atol=1e-5)


def test_lora_conv_matches_its_weight_delta():
    base = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    lora = LoRA(4, 6, rank=2, alpha=6.0, conv=base)
    nn.init.normal_(lora.B.weight)
    x = torch.randn(2, 4, 9, 9)
    unmerged = base(x) + lora(x)
    merged = F.conv2d(x, base.weight + lora.delta_weight(), base.bias, stride=2, padding=1)
    assert torch.allclose(unmerged, merged, atol=1e-5)


def test_lora_refuses_grouped_conv_and_bad_rank():
    with pytest.raises(ValueError, match="grouped convolution"):
        LoRA(4, 4, 2, 2.0, conv=nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRA(4, 4, 0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_restores_rows_bit_for_bit(dtype):
    weight = torch.randn(9, 4).to(dtype)
    original = weight.clone()
    lora = LoRA(4, 3, rank=2, alpha=2.0)
    nn.init.normal_(lora.B.weight)
    lora.merge_into(weight, rows=(3, 6))
    assert torch.equal(weight[:3], original[:3]) and torch.equal(weight[6:], original[6:])
    expected = (original[3:6].float() + lora.delta_weight(torch.float32)).to(dtype)
    assert torch.equal(weight[3:6], expected)  # fp32 arithmetic, one rounding at the end
    lora.unmerge_from(weight, rows=(3, 6))
    assert torch.equal(weight, original)


def test_bottleneck_adapter_starts_at_zero_and_has_the_right_shapes():
    adapter = BottleneckAdapter(16, 4, out_features=8, activation="gelu", layer_norm=True, bias=False, scale=0.5)
    out = adapter(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 8) and torch.count_nonzero(out) == 0
    assert adapter.down.bias is None and isinstance(adapter.norm, nn.LayerNorm)
    with pytest.raises(ValueError, match="activation 'swish' is not one of"):
        BottleneckAdapter(4, 2, activation="swish")


def test_add_rows_on_channel_dim():
    full = torch.zeros(2, 6, 3, 3)
    part = torch.ones(2, 2, 3, 3)
    out = add_rows(full, part, (2, 4), dim=1)
    assert out[:, 2:4].eq(1).all() and out[:, :2].eq(0).all() and out[:, 4:].eq(0).all()
