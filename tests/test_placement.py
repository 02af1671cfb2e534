"""Each adapter style computes the published formula, checked against a block forward written out by hand."""
from __future__ import annotations

import pytest
import tiny_models as tm
import torch

import visadapt
from visadapt import inject


def adapted_block(style: str):
    model = tm.vit().eval()
    visadapt.attach(model, "adapter", style=style, dropout=0.0, blocks=(0,))
    with torch.no_grad():
        for item in inject.attached(model):
            for param in item.module.parameters():
                param.normal_(0, 0.2)
    block = model.blocks[0]
    adapters = {item.kind: item.module for item in inject.attached(model)}
    return block, adapters


def unhooked(module, x):
    """The module's own forward, without the adapter hooks visadapt put on it."""
    return type(module).forward(module, x)


@pytest.mark.parametrize("style", ["adaptformer", "houlsby", "pfeiffer"])
def test_vit_block_matches_the_formula(style):
    block, adapters = adapted_block(style)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        h = unhooked(block.ls1, block.attn(block.norm1(x)))
        if "attn_out" in adapters:  # Houlsby: serial after attention, h + f(h) before the residual add
            h = h + adapters["attn_out"](h)
        x1 = x + h
        m = unhooked(block.ls2, block.mlp(block.norm2(x1)))
        if "mlp_out" in adapters:  # Houlsby / Pfeiffer: serial after the MLP
            m = m + adapters["mlp_out"](m)
        expected = x1 + m
        if "mlp" in adapters:  # AdaptFormer: parallel branch fed the residual stream x1, not norm2(x1)
            expected = expected + adapters["mlp"](x1)
        assert torch.allclose(block(x), expected, atol=1e-6)


def test_adaptformer_scale_defaults_follow_the_papers():
    _, adapters = adapted_block("adaptformer")
    assert adapters["mlp"].scale == 0.1
    _, adapters = adapted_block("houlsby")
    assert adapters["attn_out"].scale == 1.0


def test_swin_parallel_adapter_sees_the_residual_stream():
    model = tm.swin().eval()
    visadapt.attach(model, "adapter", dropout=0.0, blocks=(0,))
    adapter = inject.attached(model)[0].module
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.2)
    block = model.layers[0].blocks[0]
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        B, H, W, C = x.shape
        x1 = (x + block.drop_path1(block._attn(block.norm1(x)))).reshape(B, -1, C)
        expected = (x1 + block.mlp(block.norm2(x1)) + adapter(x1)).reshape(B, H, W, C)
        assert torch.allclose(block(x), expected, atol=1e-6)
