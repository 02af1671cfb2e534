from __future__ import annotations

import pytest
import tiny_models as tm

import visadapt
from visadapt.cli import main


def test_list_shows_plugins_families_and_fields(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lora  [timm_vit, timm_swin, open_clip, diffusers_unet]  (mergeable)" in out
    assert "rank = 8" in out and "style = 'adaptformer'" in out


def test_inspect_prints_metadata_counts_and_bytes(tmp_path, capsys):
    model = tm.vit()
    visadapt.attach(model, "lora", rank=2, head="head")
    path = visadapt.save_adapter(model, tmp_path / "a.safetensors")
    assert main(["inspect", str(path), "--keys"]) == 0
    out = capsys.readouterr().out
    summary = visadapt.summary(model)
    assert "plugin:        lora" in out and "head:          head" in out
    assert f"parameters:    {summary.adapter_params + 5 * 32 + 5:,}" in out
    assert f"tensor bytes:  {summary.adapter_bytes:,}" in out
    assert "blocks.0.attn.qkv.visadapt_adapters.q.A.weight  (2, 32)  float32" in out


def test_inspect_error_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_text("nope")
    assert main(["inspect", str(bad)]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_sites_of_a_timm_model(capsys):
    assert main(["sites", "vit_tiny_patch16_224", "--kind", "q"]) == 0
    out = capsys.readouterr().out
    assert "timm_vit, 12 sites" in out and "blocks.11.attn.qkv" in out


HELP_SCRIPTS = ["vtab", "vpr", "rank", "dense", "resadapter", "selma", "selma_data", "selma_prompts", "ppap",
                "pretrain_backbone", "pretrain_ppap_world"]


@pytest.mark.parametrize("program", ["visadapt", "visadapt-eval", "visadapt-data", *HELP_SCRIPTS])
def test_help_shows_no_rst_markup(program, capsys):
    """``--help`` is read in a terminal: no reStructuredText ``literal`` or :func:`role` markup in it."""
    from train_scripts import load_train_script

    if program == "visadapt":
        from visadapt.cli import main
    elif program == "visadapt-eval":
        from eval.cli import main
    elif program == "visadapt-data":
        from visadapt.data.verify import main
    else:
        main = load_train_script(program).main
    try:
        code = main(["--help"])
    except SystemExit as exit_:  # argparse exits; some mains turn that into their return value
        code = exit_.code
    text = capsys.readouterr().out
    assert code in (0, None) and "usage:" in text
    assert "``" not in text and ":func:" not in text and ":class:" not in text, text
