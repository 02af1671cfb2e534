from __future__ import annotations

import pytest
import tiny_models as tm

from visadapt.sites import TRANSFORMER_KINDS, all_sites, find_sites, fingerprint, model_family


def by_kind(sites, kind):
    return [s for s in sites if s.kind == kind]


def test_vit_offers_every_transformer_site_per_block():
    sites = all_sites(tm.vit())
    for kind in TRANSFORMER_KINDS:
        assert [s.block for s in by_kind(sites, kind)] == [0, 1], kind
    q, k, v = (by_kind(sites, x)[0] for x in "qkv")
    assert (q.rows, k.rows, v.rows) == ((0, 32), (32, 64), (64, 96))
    assert by_kind(sites, "fc1")[0].out_features == 128 and by_kind(sites, "mlp")[0].tap == "norm2"


def test_dinov2_with_registers_and_layerscale_is_a_vit():
    model = tm.vit_dinov2()
    assert model_family(model) == "timm_vit"
    assert type(model.blocks[0].ls1).__name__ == "LayerScale"
    assert by_kind(all_sites(model), "attn_out")[0].path == "blocks.0.ls1"


def test_swin_sites_report_each_stage_width():
    sites = all_sites(tm.swin())
    assert [(s.path, s.in_features) for s in by_kind(sites, "mlp")] == [
        ("layers.0.blocks.0", 16), ("layers.1.blocks.0", 32), ("layers.1.blocks.1", 32)]
    assert by_kind(sites, "attn_out")[0].how == "input"  # Swin has no LayerScale: adapt drop_path's input


def test_open_clip_offers_both_towers_with_weight_sites_for_multihead_attention():
    model = tm.clip()
    sites = all_sites(model)
    assert {s.tower for s in sites} == {"visual", "text"}
    q = find_sites(model, ["q"], towers=["text"])
    assert [s.path for s in q] == ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    assert q[0].how == "weight" and q[0].param == "in_proj_weight" and q[0].rows == (0, 32)
    with pytest.raises(ValueError, match="tower\\(s\\) \\['audio'\\] not in this model"):
        find_sites(model, ["q"], towers=["audio"])


def test_unet_sites_and_transformer_aliases():
    model = tm.unet()
    sites = all_sites(model)
    kinds = {s.kind for s in sites}
    assert kinds == {"to_q", "to_k", "to_v", "to_out", "conv1", "conv2", "norm", "downsample", "upsample"}
    cross_k = [s for s in by_kind(sites, "to_k") if s.path.endswith("attn2.to_k")]
    assert cross_k and all(s.in_features == 16 for s in cross_k)  # cross_attention_dim
    assert {s.kind for s in find_sites(model, ["q", "proj"])} == {"to_q", "to_out"}
    conv = by_kind(sites, "conv1")[0]
    assert (conv.in_features, conv.out_features) == (16, 16)


def test_fingerprint_records_depth_and_width_per_tower():
    assert fingerprint(tm.vit())["towers"] == {"model": {"depth": 2, "width": 32}}
    assert fingerprint(tm.clip())["towers"] == {"visual": {"depth": 2, "width": 32}, "text": {"depth": 2, "width": 32}}
    assert fingerprint(tm.vit())["name"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def test_vit_classifier_is_a_replace_site_after_the_blocks():
    model = tm.vit()
    (head,) = find_sites(model, ["head"])
    assert (head.path, head.how, head.block) == ("head", "replace", 2)
    assert (head.in_features, head.out_features) == (model.head.in_features, model.head.out_features)
    with pytest.raises(ValueError, match="does not exist on timm_swin"):
        find_sites(tm.swin(), ["head"])
