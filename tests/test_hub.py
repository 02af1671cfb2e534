"""The hub round trip for timm and open_clip (and UNets): ``save_pretrained`` -> folder / hub repo / state dict ->
``load_adapter``, and ``push_to_hub`` through a recorded ``HfApi``; all offline (a local folder stands in for a
repo, and a local HF cache layout for the hub)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from torch import nn

import visadapt
from tests import tiny_models as tm
from tests.pipeline_helpers import assert_untouched, every_tensor
from visadapt import hub, inject, io

COMMIT_MAIN = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "89abcdef0123456789abcdef0123456789abcdef"

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py


def randomise(model: nn.Module, adapter_name: str = "default", seed: int = 0) -> None:
    """Random non-zero adapter tensors (and head), so a load that drops anything changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (adapter_name in name or inject.ADAPTERS_ATTR not in name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def output(model: nn.Module, family: str) -> torch.Tensor:
    args, kwargs = tm.example_input(family, model)
    model.eval()
    with torch.no_grad():
        return tm.output_tensor(model(*args, **kwargs))


def base(family: str) -> nn.Module:
    """The same random-init tiny base model at every call (a fixed seed), as a published checkpoint would be."""
    torch.manual_seed(1234)
    return {"timm_vit": tm.vit, "open_clip": tm.clip, "diffusers_unet": tm.unet}[family]()


def trained_vit(seed: int = 0) -> nn.Module:
    model = base("timm_vit")
    visadapt.attach(model, "lora", rank=4, alpha=8.0, targets=("qkv", "fc1"), head="head")
    randomise(model, seed=seed)
    return model


def fake_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT_MAIN,
                   ref: str = "main") -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/<files>}."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


# ------------------------------------------------------------------------------- save_pretrained / folders


@pytest.mark.parametrize("family", ["timm_vit", "open_clip"])
def test_save_pretrained_folder_loads_back_with_equal_outputs(family, tmp_path):
    if family == "timm_vit":
        model, fresh = trained_vit(), base(family)
    else:
        model, fresh = base(family), base(family)
        visadapt.attach(model, "lora", rank=2, targets=("q", "v", "fc2"))
        randomise(model)
    expected = output(model, family)
    folder = visadapt.save_pretrained(model, tmp_path / "repo", metrics={"accuracy": 0.75})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter.safetensors"]

    config = visadapt.load_adapter(fresh, folder)
    assert config == visadapt.api.get_record(model, "default").config
    assert torch.equal(output(fresh, family), expected)

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "visadapt"
    assert {"visadapt", "visadapt-lora", family} <= set(card.data.tags)
    assert card.data.metrics == ["accuracy"]
    counts = visadapt.summary(model).adapters["default"]
    for text in ("# visadapt adapter: lora", f"| trainable parameters | {counts['params']:,} |",
                 f"| bytes on disk (tensors) | {counts['bytes']:,} |", '"rank": ' + str(config.rank),
                 '"family": "' + family + '"', "## Metrics", "| accuracy | 0.75 |",
                 "visadapt.load_adapter(model, "):
        assert text in card.text, text
    assert card.data.base_model is None  # built from a config: no published base model to name


def test_card_names_the_training_run_and_base_model_and_the_file_keeps_the_run(tmp_path):
    model = trained_vit()
    run = {"benchmark": "vtab", "task": "cifar100", "model": "vit_tiny_patch16_224.augreg_in21k", "pretrained": True}
    path = visadapt.save_adapter(model, tmp_path / "trained.safetensors",
                                 metadata={io.TRAIN_METADATA: json.dumps(run)})
    reloaded = base("timm_vit")
    visadapt.load_adapter(reloaded, path)
    folder = visadapt.save_pretrained(reloaded, tmp_path / "repo")  # the run came with the file it was loaded from
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "timm/vit_tiny_patch16_224.augreg_in21k"
    assert ("timm.create_model('hf-hub:timm/vit_tiny_patch16_224.augreg_in21k', pretrained=True, num_classes=5)"
            in card.text)
    assert "## Training run" in card.text and "| task | cifar100 |" in card.text
    assert "## Metrics" not in card.text  # none known
    assert json.loads(io.read_adapter_metadata(folder / "adapter.safetensors")[io.TRAIN_METADATA]) == run


def test_folder_weight_name_and_subfolder(tmp_path):
    model_a, model_b = trained_vit(seed=1), trained_vit(seed=2)
    folder = tmp_path / "repo"
    visadapt.save_pretrained(model_a, folder)
    visadapt.save_adapter(model_b, folder / "other.safetensors")
    visadapt.save_pretrained(model_b, folder / "v2")

    for kwargs, expected in (({}, model_a), ({"weight_name": "other.safetensors"}, model_b),
                             ({"subfolder": "v2"}, model_b)):
        fresh = base("timm_vit")
        visadapt.load_adapter(fresh, folder, **kwargs)
        assert torch.equal(output(fresh, "timm_vit"), output(expected, "timm_vit")), kwargs


def test_bad_sources_name_the_input_and_leave_the_model_as_it_was(tmp_path):
    model = trained_vit()
    good = visadapt.save_pretrained(model, tmp_path / "good")
    fresh = base("timm_vit")
    before = every_tensor(fresh)

    empty = tmp_path / "no_adapter"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    data = (good / "adapter.safetensors").read_bytes()
    (corrupt / "adapter.safetensors").write_bytes(data[: len(data) - 64])  # truncated tensor bytes
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    cases = [
        (lambda: visadapt.load_adapter(fresh, empty), io.AdapterFileError,
         r"folder .*no_adapter holds no adapter file .*it holds: notes.txt.*weight_name="),
        (lambda: visadapt.load_adapter(fresh, good, weight_name="nope.safetensors"), io.AdapterNotFoundError,
         r"weight_name='nope.safetensors' does not exist in .*good \(it holds: README.md, adapter.safetensors\)"),
        (lambda: visadapt.load_adapter(fresh, good, subfolder="v9"), io.AdapterNotFoundError,
         r"subfolder='v9' does not exist"),
        (lambda: visadapt.load_adapter(fresh, tmp_path / "missing.safetensors"), FileNotFoundError,
         r"missing.safetensors' does not exist"),
        (lambda: visadapt.load_adapter(fresh, corrupt), io.AdapterFileError,
         r"corrupt.adapter.safetensors is not a readable safetensors file|corrupt.adapter.safetensors is corrupted"),
        (lambda: visadapt.load_adapter(fresh, pickled), io.AdapterFileError, r"pickle.*only reads safetensors"),
        (lambda: visadapt.load_adapter(fresh, good / "adapter.safetensors", weight_name="x.safetensors"), TypeError,
         r"is a file already: drop weight_name"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()
        assert_untouched(fresh, before)


# ------------------------------------------------------------------------------------------- hub repo ids


def test_hub_repo_id_from_the_local_cache_with_revision_and_subfolder(tmp_path, monkeypatch):
    model_main, model_v1 = trained_vit(seed=1), trained_vit(seed=2)
    main = visadapt.save_pretrained(model_main, tmp_path / "main")
    v1 = visadapt.save_pretrained(model_v1, tmp_path / "v1")
    cache = tmp_path / "hf_cache"
    fake_hub_cache(cache, "visadapt-test/vit-lora", {"adapter.safetensors": main / "adapter.safetensors",
                                                     "README.md": main / "README.md",
                                                     "cifar/adapter.safetensors": v1 / "adapter.safetensors"})
    fake_hub_cache(cache, "visadapt-test/vit-lora", {"adapter.safetensors": v1 / "adapter.safetensors"},
                   commit=COMMIT_V1, ref="v1")

    # local_files_only with an explicit cache_dir
    fresh = base("timm_vit")
    visadapt.load_adapter(fresh, "visadapt-test/vit-lora", cache_dir=cache, local_files_only=True)
    assert torch.equal(output(fresh, "timm_vit"), output(model_main, "timm_vit"))
    # HF_HUB_OFFLINE and the HF cache location as huggingface_hub reads them (HF_HOME / HF_HUB_CACHE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    for kwargs, expected in (({"revision": "v1"}, model_v1), ({"revision": COMMIT_V1}, model_v1),
                             ({"subfolder": "cifar"}, model_v1), ({"revision": "main"}, model_main)):
        fresh = base("timm_vit")
        visadapt.load_adapter(fresh, "visadapt-test/vit-lora", **kwargs)
        assert torch.equal(output(fresh, "timm_vit"), output(expected, "timm_vit")), kwargs


def test_hub_repo_id_not_cached_offline_names_the_cache_and_the_fix(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    fresh = base("timm_vit")
    before = every_tensor(fresh)
    with pytest.raises(io.AdapterNotFoundError,
                       match=r"'visadapt-test/absent' was not found in the local cache \(.*hf_cache\).*"
                             r"local_files_only=True.*Fix: run once with network access"):
        visadapt.load_adapter(fresh, "visadapt-test/absent", cache_dir=cache, local_files_only=True)
    assert_untouched(fresh, before)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"at revision 'v2' was not found .*HF_HUB_OFFLINE is set"):
        visadapt.load_adapter(fresh, "visadapt-test/absent", cache_dir=cache, revision="v2")
    assert_untouched(fresh, before)


def test_selma_load_expert_resolves_hub_ids_like_load_adapter(tmp_path, monkeypatch):
    from visadapt.plugins.selma import load_expert

    unet = base("diffusers_unet")
    visadapt.attach(unet, "lora", rank=2, targets=("q", "v"))
    randomise(unet)
    folder = visadapt.save_pretrained(unet, tmp_path / "expert")
    cache = tmp_path / "hf_cache"
    fake_hub_cache(cache, "visadapt-test/counting-expert", {"adapter.safetensors": folder / "adapter.safetensors"})
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    fresh = base("diffusers_unet")
    load_expert(fresh, "visadapt-test/counting-expert", "counting")
    assert torch.equal(output(fresh, "diffusers_unet"), output(unet, "diffusers_unet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_expert(tm.unet(), tmp_path / "missing.safetensors", "x")


# ---------------------------------------------------------------------------------------- in-memory input


def test_state_dict_with_its_metadata(tmp_path):
    model = trained_vit()
    tensors, meta = visadapt.read_adapter_file(visadapt.save_adapter(model, tmp_path / "a.safetensors"))
    fresh = base("timm_vit")
    visadapt.load_adapter(fresh, tensors, "mem", metadata=meta)
    assert torch.equal(output(fresh, "timm_vit"), output(model, "timm_vit"))

    other = base("timm_vit")
    before = every_tensor(other)
    broken = dict(tensors)
    key = next(k for k in broken if inject.ADAPTERS_ATTR in k)
    broken[key] = broken[key] + 1
    with pytest.raises(io.AdapterFileError, match=r"the state dict given \(\d+ tensors\) is corrupted"):
        visadapt.load_adapter(other, broken, metadata=meta)
    with pytest.raises(io.AdapterFileError, match=r"the state dict given \(1 tensors\) has no visadapt metadata.*"
                                                r"registered formats: .*diffusers_lora"):
        visadapt.load_adapter(other, {"some.weight": torch.zeros(2)})
    with pytest.raises(TypeError, match="files carry their own metadata"):
        visadapt.load_adapter(other, tmp_path / "a.safetensors", metadata=meta)
    assert_untouched(other, before)


# ------------------------------------------------------------------------- foreign layouts via visadapt.formats


def _diffusers_lora_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """A UNet LoRA in the diffusers/PEFT layout, made by PEFT (``add_adapter``) and read back with PEFT's own
    ``get_peft_model_state_dict``; alpha = rank, so no metadata is needed for its scale."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(unet)
    torch.manual_seed(3)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    return {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(donor).items()}


def test_foreign_lora_folder_renamed_file_and_state_dict_match_diffusers_own_loader(tmp_path):
    """A folder in a registered format, a LoRA file under another name and the same tensors in memory all load
    through visadapt.formats, with the outputs diffusers' own ``load_lora_adapter`` gives."""
    unet = tm.unet()
    state = _diffusers_lora_state(unet)
    reference = copy.deepcopy(unet)
    reference.load_lora_adapter({k[len("unet."):]: v for k, v in state.items()}, prefix=None,
                                adapter_name="ref")
    expected = output(reference, "diffusers_unet")

    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    renamed = tmp_path / "counting_expert.safetensors"
    shutil.copy(folder / "pytorch_lora_weights.safetensors", renamed)
    for source in (folder, renamed, state):
        fresh = copy.deepcopy(unet)
        visadapt.load_adapter(fresh, source, "lora")
        torch.testing.assert_close(output(fresh, "diffusers_unet"), expected, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="replace_head=True .*diffusers_lora layout"):
        visadapt.load_adapter(copy.deepcopy(unet), folder, replace_head=True)


def test_state_dict_with_a_foreign_header_is_read_at_its_scale_or_refused(tmp_path):
    """A diffusers LoRA file's tensors plus its header (``lora_adapter_metadata``: alpha 8 for rank 4) given in
    memory: loaded at the producer's scale, as diffusers' own ``load_lora_adapter`` loads the file, where a format
    reads that header (``visadapt.formats.load_checkpoint``); refused, never loaded at a guessed scale, where none
    does."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open


    unet = base("diffusers_unet")
    donor = copy.deepcopy(unet)
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False)
    donor.add_adapter(config)
    folder = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(donor),
                                              unet_lora_adapter_metadata=config.to_dict())
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    assert "lora_adapter_metadata" in header

    fresh = copy.deepcopy(unet)
    reference = copy.deepcopy(unet)
    reference.load_lora_adapter(str(folder), weight_name=path.name, prefix="unet", adapter_name="ref")
    visadapt.load_adapter(fresh, tensors, "lora", metadata=header)
    torch.testing.assert_close(output(fresh, "diffusers_unet"), output(reference, "diffusers_unet"), atol=1e-5,
                               rtol=0)


def test_peft_folder_on_a_timm_vit_matches_peft(tmp_path):
    """A PEFT folder (adapter_config.json + adapter_model.safetensors) loads on a timm ViT through the registered
    format that reads it (visadapt.formats), by folder as by hub id, with PEFT's own outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from visadapt import formats

    vit = base("timm_vit")
    torch.manual_seed(4)
    peft_model = get_peft_model(copy.deepcopy(vit), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"],
                                                                 init_lora_weights=False))
    folder = tmp_path / "peft"
    peft_model.save_pretrained(folder)
    files = {p.name: p for p in folder.iterdir()}
    fmt = formats.find_format(files)
    assert fmt is not None and fmt.name == "peft"  # not the generic LoRA format, which would ignore the config
    expected = output(PeftModel.from_pretrained(copy.deepcopy(vit), folder), "timm_vit")

    cache = tmp_path / "hf_cache"
    fake_hub_cache(cache, "visadapt-test/vit-peft", files)
    for source, kwargs in ((folder, {}), (folder, {"weight_name": "adapter_model.safetensors"}),
                           ("visadapt-test/vit-peft", {"cache_dir": cache, "local_files_only": True}),
                           ("visadapt-test/vit-peft", {"cache_dir": cache, "local_files_only": True,
                                                       "weight_name": "adapter_model.safetensors"})):
        fresh = copy.deepcopy(vit)
        visadapt.load_adapter(fresh, source, "peft", **kwargs)  # the config comes along with a picked weight file
        torch.testing.assert_close(output(fresh, "timm_vit"), expected, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- push_to_hub


def test_push_to_hub_uploads_exactly_the_saved_folder(tmp_path, monkeypatch):
    calls: dict[str, dict] = {}
    uploaded = tmp_path / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        shutil.copytree(kwargs["folder_path"], uploaded)  # the temporary folder is gone after the call
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    model = base("open_clip")
    fresh = copy.deepcopy(model)
    visadapt.attach(model, "lora", rank=2, targets=("q", "v"), adapter_name="style")
    randomise(model, "style")
    before = every_tensor(model)
    result = visadapt.push_to_hub(model, "me/clip-style", "style", private=True, token="hf_test",
                                  commit_message="first adapter", revision="dev")
    assert result == "commit-info"
    assert calls["create_repo"] == {"repo_id": "me/clip-style", "private": True, "exist_ok": True,
                                    "token": "hf_test"}
    assert calls["create_branch"] == {"repo_id": "me/clip-style", "branch": "dev", "exist_ok": True,
                                      "token": "hf_test"}
    upload = calls["upload_folder"]
    assert (upload["repo_id"], upload["commit_message"], upload["revision"], upload["token"]) == (
        "me/clip-style", "first adapter", "dev", "hf_test")
    assert not Path(upload["folder_path"]).exists()  # the temporary folder was cleaned up
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "adapter.safetensors"]
    assert "visadapt.load_adapter(model, 'me/clip-style')" in (uploaded / "README.md").read_text()
    after = every_tensor(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # pushing changes nothing

    visadapt.load_adapter(fresh, uploaded, "style")
    assert torch.equal(output(fresh, "open_clip"), output(model, "open_clip"))


def test_resolve_refuses_unknown_hub_keywords_and_other_types():
    with pytest.raises(TypeError, match="unexpected hub argument.*mirror"):
        hub.resolve("org/name", hub_kwargs={"mirror": "x"})
    with pytest.raises(TypeError, match="not int"):
        hub.resolve(3)


def test_a_source_that_is_neither_a_path_nor_a_repo_id_is_named(tmp_path, monkeypatch):
    """A missing folder written with a trailing slash, or a string no hub accepts as a repo id, is one visadapt error
    naming it (not huggingface_hub's validation traceback), before any download is tried; the model is untouched."""
    from visadapt.io import AdapterNotFoundError

    monkeypatch.chdir(tmp_path)
    vit = base("timm_vit")
    before = every_tensor(vit)
    with pytest.raises(AdapterNotFoundError, match=r"'missing_dir/' does not exist"):
        visadapt.load_adapter(vit, "missing_dir/")
    with pytest.raises(AdapterNotFoundError, match=r"'bad--name' is neither an existing file or folder nor a valid "
                                                   r"hub repo id"):
        visadapt.load_adapter(vit, "bad--name", local_files_only=True)
    assert_untouched(vit, before)
