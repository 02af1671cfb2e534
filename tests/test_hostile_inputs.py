"""Hostile adapter files and faults: every crafted input gets a clear error naming it, leaves every tensor of the
model as it was, and leaves no partial file behind; a header never drives an allocation or a write outside the
adapter and the model's classifier.

Property tests use ``hypothesis`` with few, bounded examples (tiny models from ``tests/tiny_models.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import visadapt
from visadapt import inject, io
from visadapt.load_report import AdapterLoadError

ROOT = Path(__file__).resolve().parents[1]


def lora_vit(seed: int = 0, **attach):
    """A tiny ViT with a LoRA (non-zero B) and its 5-class head attached, deterministic from ``seed``."""
    torch.manual_seed(seed)
    model = tm.vit().eval()
    visadapt.attach(model, "lora", rank=2, head="head", **attach)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if inject.ADAPTERS_ATTR in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


# ------------------------------------------------------------------------------------------------ writing


def test_adapter_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = visadapt.save_adapter(lora_vit(), tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # safetensors' own writer gives 0600 whatever the umask


_SAVE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch, visadapt
    from test_hostile_inputs import lora_vit
    path = visadapt.save_adapter(lora_vit(seed=3), {path!r}, metadata={{"visadapt.train": '{{"task": "x"}}',
                                                                      "b": "1", "a": "2", "z": "3"}})
""")


def save_in_subprocess(path: Path, env_extra: dict[str, str] | None = None) -> None:
    env = dict(os.environ, **(env_extra or {}))
    subprocess.run([sys.executable, "-c", _SAVE_SCRIPT.format(tests=str(ROOT / "tests"), path=str(path))],
                   check=True, env=env, cwd=ROOT)


def test_the_same_adapter_saved_by_two_processes_gives_the_same_bytes(tmp_path):
    # PYTHONHASHSEED differs too; the metadata order used to follow a per-process Rust HashMap seed
    save_in_subprocess(tmp_path / "one.safetensors", {"PYTHONHASHSEED": "1"})
    save_in_subprocess(tmp_path / "two.safetensors", {"PYTHONHASHSEED": "2"})
    one, two = (tmp_path / "one.safetensors").read_bytes(), (tmp_path / "two.safetensors").read_bytes()
    assert hashlib.sha256(one).digest() == hashlib.sha256(two).digest()
    header = one[8:8 + int.from_bytes(one[:8], "little")]
    assert header.index(b'"a":"2"') < header.index(b'"b":"1"') < header.index(b'"z":"3"')  # sorted keys
    tensors, meta = io.read_adapter_file(tmp_path / "one.safetensors")  # and safetensors reads it as written
    assert meta["a"] == "2" and len(tensors) == 10


_KILLED_SAVE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import visadapt
    from visadapt import io
    from test_hostile_inputs import lora_vit
    def killed(fd):  # the temporary file is written; the process dies before it is renamed
        os.kill(os.getpid(), signal.SIGKILL)
    io.os.fsync = killed
    visadapt.save_adapter(lora_vit(), {path!r})
""")


def test_a_killed_save_leaves_a_temporary_file_that_the_next_save_deletes(tmp_path):
    path = tmp_path / "a.safetensors"
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE_SCRIPT.format(tests=str(ROOT / "tests"),
                                                                              path=str(path))], check=False,
                            cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".a.safetensors.") and leftover.name.endswith(".tmp")
    other_host = tmp_path / ".a.safetensors.another-machine-1-0123abcd.tmp"  # a writer elsewhere: kept
    other_host.write_bytes(b"")
    mine = tmp_path / f".a.safetensors.{io._host_tag()}-{os.getpid()}-0123abcd.tmp"  # a live writer: kept
    mine.write_bytes(b"")
    visadapt.save_adapter(lora_vit(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_host.name, mine.name, "a.safetensors"])
    io.read_adapter_file(path)


# ------------------------------------------------------------------------------------------ crafted headers

CLEAN_ERRORS = (io.AdapterFileError, AdapterLoadError)


@pytest.fixture(scope="module")
def legit_file(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a real LoRA file (rank 2, head 'head') for the tiny ViT."""
    path = visadapt.save_adapter(lora_vit(), tmp_path_factory.mktemp("legit") / "a.safetensors")
    return io.read_adapter_file(path)


def write_crafted(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """What an attacker writes: any header, with a checksum that matches its tensors (anyone can compute it)."""
    meta = dict(meta)
    if "tensors_sha256" in meta:
        meta["tensors_sha256"] = io.tensors_digest(tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


def every_tensor(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before), "the model's tensors were added or removed"
    changed = [key for key, value in before.items() if not torch.equal(after[key], value)]
    assert not changed, f"tensors changed: {changed[:5]}"
    assert not visadapt.api.records(model) and not inject.attached(model)


def edited(meta: dict[str, str], field: str, change) -> dict[str, str]:
    """``meta`` with JSON field ``field`` passed through ``change`` (a function of the parsed object)."""
    meta = dict(meta)
    meta[field] = json.dumps(change(json.loads(meta[field])))
    return meta


def _without(meta, field):
    return {k: v for k, v in meta.items() if k != field}


HEADER_CASES = {
    # case: (how the header is changed, the field the error names, what it says)
    "missing plugin": (lambda m: _without(m, "plugin"), "plugin", "is missing"),
    "missing config": (lambda m: _without(m, "config"), "config", "is missing"),
    "missing base_model": (lambda m: _without(m, "base_model"), "base_model", "is missing"),
    "base_model null": (lambda m: {**m, "base_model": "null"}, "base_model", "is a JSON NoneType"),
    "config a JSON list": (lambda m: {**m, "config": "[1, 2]"}, "config", "is a JSON list"),
    "site_widths not JSON": (lambda m: {**m, "site_widths": "{blocks"}, "site_widths", "is not JSON"),
    "alpha 'x'": (lambda m: edited(m, "config", lambda c: {**c, "alpha": "x"}), "config",
                  "sets alpha='x'; expected alpha of type float"),
    "targets 123": (lambda m: edited(m, "config", lambda c: {**c, "targets": 123}), "config",
                    "sets targets=123; expected targets of type tuple"),
    "rank 1e8": (lambda m: edited(m, "config", lambda c: {**c, "rank": 1e8}), "config",
                 "sets rank=100000000.0; expected rank of type int"),
    "unknown plugin": (lambda m: {**m, "plugin": "lroa"}, "plugin", "no visadapt plugin named 'lroa'"),
    "towers not an object": (lambda m: edited(m, "base_model", lambda b: {**b, "towers": [1]}), "base_model",
                             "expected a JSON object"),
    "site width not integers": (lambda m: edited(m, "site_widths", lambda w: {k: ["a", 1] for k in w}),
                                "site_widths", "to ['a', 1]"),
    "training run not JSON": (lambda m: {**m, "visadapt.train": '{"task": '}, "visadapt.train", "is not JSON"),
    "head not the classifier": (lambda m: {**m, "head": "blocks.1.mlp.fc2"}, "head",
                                ("names 'blocks.1.mlp.fc2', which is not this model's classifier; expected one "
                                 "of 'head'")),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_each_crafted_header_is_a_clear_error_naming_the_file_and_field(case, legit_file, tmp_path):
    tensors, meta = legit_file
    change, field, says = HEADER_CASES[case]
    path = write_crafted(tmp_path / "crafted.safetensors", tensors, change(meta))
    model = tm.vit().eval()
    before = every_tensor(model)
    with pytest.raises(io.AdapterFileError) as info:
        visadapt.load_adapter(model, path)
    message = str(info.value)
    assert str(path) in message and f"'{field}'" in message and says in message, message
    assert_unchanged(model, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.safetensors"]
    if case in READER_CASES:  # what inspect, export and visadapt-eval read first is checked the same way
        with pytest.raises(io.AdapterFileError) as info:
            io.read_adapter_metadata(path)
        assert str(path) in str(info.value) and f"header field '{field}'" in str(info.value) and says in str(info.value)


READER_CASES = ("missing plugin", "missing config", "missing base_model", "base_model null", "config a JSON list",
                "site_widths not JSON", "towers not an object", "site width not integers", "training run not JSON")


def test_a_huge_rank_in_the_header_is_refused_before_anything_is_allocated(legit_file, tmp_path, monkeypatch):
    """rank 3,000,000 on a 4.5 KB file: the adapter it asks for (384 MB a tensor) is never built on the model; only
    the meta-device dry run sees it."""
    tensors, meta = legit_file
    path = write_crafted(tmp_path / "huge.safetensors", tensors,
                         edited(meta, "config", lambda c: {**c, "rank": 3_000_000}))
    assert path.stat().st_size < 8_000
    attached_to = []
    real_attach = visadapt.api.attach

    def spy(model, *args, **kwargs):
        attached_to.append(model)
        config = real_attach(model, *args, **kwargs)
        built = [p for item in inject.attached(model, kwargs.get("adapter_name", "default"))
                 for p in item.module.parameters()]
        assert all(p.is_meta for p in built), "a header-sized adapter was allocated"
        return config

    monkeypatch.setattr(visadapt.api, "attach", spy)
    model = tm.vit().eval()
    before = every_tensor(model)
    with pytest.raises(io.AdapterFileError, match=r"header field 'config' does not match the file's tensors.*"
                                                  r"\(3000000, 32\), file \(2, 32\)"):
        visadapt.load_adapter(model, path)
    assert attached_to and all(m is not model for m in attached_to)
    assert_unchanged(model, before)


def test_a_model_holding_an_uncopyable_attribute_still_gets_the_shape_check(legit_file, tmp_path):
    """A lock on the model cannot be deep-copied: the tensor-free copy shares it, the huge rank is still refused
    without touching the model, and the legitimate file still loads."""
    import threading

    tensors, meta = legit_file
    huge = write_crafted(tmp_path / "huge.safetensors", tensors,
                         edited(meta, "config", lambda c: {**c, "rank": 3_000_000}))
    model = tm.vit().eval()
    model.blocks[0].lock = threading.Lock()
    before = every_tensor(model)
    with pytest.raises(io.AdapterFileError, match="does not match the file's tensors"):
        visadapt.load_adapter(model, huge)
    assert_unchanged(model, before)
    visadapt.load_adapter(model, write_crafted(tmp_path / "ok.safetensors", tensors, meta))
    assert model.blocks[0].lock is not None and inject.attached(model, "default")


def test_a_model_that_refuses_to_be_copied_gets_one_clear_error(legit_file, tmp_path):
    class Uncopyable(torch.nn.Identity):
        def __deepcopy__(self, memo):
            raise TypeError("no copies of me")

    tensors, meta = legit_file
    model = tm.vit().eval()
    model.blocks[0].ls1 = Uncopyable()
    before = every_tensor(model)
    with pytest.raises(AdapterLoadError, match=r"cannot be copied \(TypeError: no copies of me"):
        visadapt.load_adapter(model, write_crafted(tmp_path / "ok.safetensors", tensors, meta))
    assert_unchanged(model, before) and not inject.attached(model, "default")


def test_a_config_that_builds_more_than_the_file_stores_is_refused_also_when_not_strict(legit_file, tmp_path):
    tensors, meta = legit_file
    path = write_crafted(tmp_path / "big.safetensors", tensors,
                         edited(meta, "config", lambda c: {**c, "rank": 64}))
    model = tm.vit().eval()
    before = every_tensor(model)
    with pytest.raises(io.AdapterFileError, match="holds 16,384 elements in 8 tensors, the file stores 512 in 8"):
        visadapt.load_adapter(model, path, strict=False)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------- heads


def test_a_head_inside_the_backbone_is_refused_and_the_classifier_is_restored_by_detach(legit_file, tmp_path):
    tensors, meta = legit_file
    model = tm.vit().eval()
    before = every_tensor(model)
    # the attack of the issue: head = blocks.1.mlp.fc2 with tensors of exactly that layer's shapes
    fc2 = {f"blocks.1.mlp.fc2.{k}": torch.full_like(v, 7.0) for k, v in model.blocks[1].mlp.fc2.state_dict().items()}
    adapter = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    path = write_crafted(tmp_path / "fc2.safetensors", {**adapter, **fc2}, {**meta, "head": "blocks.1.mlp.fc2"})
    with pytest.raises(io.AdapterFileError, match="header field 'head' names 'blocks.1.mlp.fc2'.*expected one of 'head'"):
        visadapt.load_adapter(model, path)
    assert_unchanged(model, before)
    # the classifier is allowed; detach gives back the model's own head bit for bit
    legit = write_crafted(tmp_path / "legit.safetensors", tensors, meta)
    visadapt.load_adapter(model, legit)
    assert torch.equal(model.head.weight, tensors["head.weight"])
    visadapt.detach(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("make, allowed", [(tm.vit, ["head"]), (tm.swin, ["head.fc", "head"]), (tm.clip, []),
                                           (tm.unet, [])])
def test_the_heads_a_file_may_name_are_the_classifier_only(make, allowed):
    assert visadapt.api.classifier_paths(make()) == allowed


# --------------------------------------------------------------------------------------- property-based

FIELDS = sorted(io.RESERVED_METADATA)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3),
                           max_leaves=8)
header_texts = st.one_of(json_values.map(json.dumps), st.text(max_size=40),
                         st.sampled_from(["", "null", "{", "[]", '{"a": 1}', "\x1b[31mred", "1e400", "-1"]))


@st.composite
def mutated_headers(draw, meta: dict[str, str]) -> dict[str, str]:
    meta = dict(meta)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from([*FIELDS, "extra"]))
        how = draw(st.sampled_from(["drop", "replace", "truncate", "config-field", "swap"]))
        if how == "drop":
            meta.pop(field, None)
        elif how == "replace":
            meta[field] = draw(header_texts)
        elif how == "truncate" and field in meta:
            meta[field] = meta[field][:draw(st.integers(0, max(len(meta[field]) - 1, 0)))]
        elif how == "swap" and field in meta:
            meta[field] = meta[draw(st.sampled_from([f for f in FIELDS if f in meta] or [field]))]
        elif how == "config-field":
            try:
                config = json.loads(meta.get("config", "{}"))
            except ValueError:
                continue
            if isinstance(config, dict):
                key = draw(st.sampled_from([*config, "rank", "alpha", "targets", "path_pattern", "blocks", "x"]))
                config[key] = draw(json_values | st.integers(-5, 10**7))
                meta["config"] = json.dumps(config)
    return meta


def assert_clean_refusal_or_load(model, path: Path, before: dict[str, torch.Tensor]) -> None:
    """Either the load succeeds (then detach restores the model) or it fails with a clear error naming the file
    and leaves every tensor of the model as it was."""
    try:
        visadapt.load_adapter(model, path)
    except CLEAN_ERRORS as err:
        assert str(path) in str(err), str(err)
    else:
        visadapt.detach(model)
    assert_unchanged(model, before)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing written, nothing left behind


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_mutated_headers_give_a_clear_error_or_a_clean_load(legit_file, data):
    tensors, meta = legit_file
    crafted = data.draw(mutated_headers(meta))
    model = tm.vit().eval()
    before = every_tensor(model)
    with tempfile.TemporaryDirectory() as folder:
        path = write_crafted(Path(folder) / "crafted.safetensors", tensors, crafted)
        assert_clean_refusal_or_load(model, path, before)


@settings(max_examples=30, deadline=None)
@given(cut=st.floats(0.0, 1.0, exclude_max=True), flip=st.one_of(st.none(), st.integers(0, 10**6)))
def test_truncated_or_garbled_files_give_a_clear_error(legit_file, cut, flip):
    tensors, meta = legit_file
    with tempfile.TemporaryDirectory() as folder:
        path = write_crafted(Path(folder) / "a.safetensors", tensors, meta)
        data = bytearray(path.read_bytes())
        if flip is None:
            data = data[:int(cut * len(data))]
        else:  # one byte changed anywhere: header JSON, lengths or tensor bytes
            data[flip % len(data)] ^= 0x5A
        path.write_bytes(bytes(data))
        model = tm.vit().eval()
        before = every_tensor(model)
        if flip is None:
            with pytest.raises(CLEAN_ERRORS) as info:
                visadapt.load_adapter(model, path)
            assert str(path) in str(info.value)
            assert_unchanged(model, before)
        else:  # a changed byte in a free-text field (adapter_name, visadapt_version) still loads
            assert_clean_refusal_or_load(model, path, before)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_crafted_heads_write_only_into_the_classifier(legit_file, data):
    tensors, meta = legit_file
    model = tm.vit().eval()
    before = every_tensor(model)
    names = [name for name, module in model.named_modules() if name and list(module.parameters(recurse=False))]
    head = data.draw(st.sampled_from(names))
    stored = {f"{head}.{k}": torch.randn(v.shape) for k, v in model.get_submodule(head).state_dict().items()}
    adapter = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    with tempfile.TemporaryDirectory() as folder:
        path = write_crafted(Path(folder) / "head.safetensors", {**adapter, **stored}, {**meta, "head": head})
        if head == "head":
            visadapt.load_adapter(model, path)
            changed = [k for k, v in before.items() if not torch.equal(model.state_dict()[k], v)]
            assert changed == ["head.weight", "head.bias"]
            visadapt.detach(model)
        else:
            with pytest.raises(io.AdapterFileError, match=f"header field 'head' names '{head}'"):
                visadapt.load_adapter(model, path)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_prints_control_characters_from_a_header_escaped(legit_file, tmp_path, capsys):
    from visadapt.cli import main

    tensors, meta = legit_file
    evil = "\x1b[2J\x1b[31mpwned\u202e"
    crafted = {**meta, "adapter_name": evil, "visadapt_version": evil,
               "config": json.dumps({**json.loads(meta["config"]), "path_pattern": evil})}
    renamed = {k.replace("blocks.0.", f"blocks.0.{evil}") if "blocks.0." in k else k: v for k, v in tensors.items()}
    path = write_crafted(tmp_path / "evil.safetensors", renamed, crafted)
    assert main(["inspect", str(path), "--keys"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    # adapter_name, visadapt_version and 4 tensor keys (the config is printed as JSON, which escapes it itself)
    assert out.count("\\x1b[2J\\x1b[31mpwned\\u202e") == 2 + 4
    bad = write_crafted(tmp_path / f"bad{evil}.safetensors", tensors, {**meta, "plugin": evil})
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "header field 'plugin'" in err


# ------------------------------------------------------------------------------------- every plugin alike

INFLATED = [  # plugin, model, attach config, the config field that sizes its tensors
    ("adapter", tm.vit, {}, "bottleneck"),
    ("bitadapter", tm.vit, {"dim": 4}, "dim"),
    ("lora", tm.clip, {}, "rank"),
    ("lora", tm.unet, {}, "rank"),
    ("mosa", tm.swin, {"keep_modules": True}, "dim"),
    ("polyhistor", tm.swin, {"tasks": ("a", "b")}, "hidden_dim"),
    ("ppap", tm.vit, {}, "rank"),
    ("ranking_clip", tm.clip, {}, "prompt_tokens"),
    ("resadapter", tm.unet, {}, "rank"),
    ("selavpr", tm.vit, {}, "local_dim"),
    ("selma", tm.unet, {}, "rank"),
]


@pytest.mark.parametrize("plugin, make, config, field", INFLATED, ids=[f"{p}-{f}" for p, _, _, f in INFLATED])
def test_every_plugin_refuses_a_config_that_its_tensors_do_not_match(plugin, make, config, field, tmp_path):
    """The shapes a config implies come from the plugin's own attach on a meta-device copy, so the check holds for
    every plugin: a file whose sizing field was raised is refused before the adapter is built, and the file as
    saved loads."""
    torch.manual_seed(0)
    model = make()
    visadapt.attach(model, plugin, **config)
    path = visadapt.save_adapter(model, tmp_path / "a.safetensors")
    tensors, meta = io.read_adapter_file(path)
    crafted = write_crafted(tmp_path / "crafted.safetensors", tensors,
                            edited(meta, "config", lambda c: {**c, field: c[field] * 64}))
    fresh = make()
    before = every_tensor(fresh)
    with pytest.raises(io.AdapterFileError, match="header field '(config|site_widths)'"):
        visadapt.load_adapter(fresh, crafted)
    assert_unchanged(fresh, before)
    visadapt.load_adapter(fresh, path)
    stored = visadapt.api.stored_tensors(model, "default")  # the stored form (1-bit adapters load dequantised)
    assert {k: v for k, v in visadapt.api.stored_tensors(fresh, "default").items()}.keys() == stored.keys()
    assert all(torch.equal(v, stored[k]) for k, v in visadapt.api.stored_tensors(fresh, "default").items())


def test_concurrent_json_writers_leave_a_whole_file_and_no_temporary(tmp_path):
    """Two writers of one JSON file (two runs updating a metrics file) each write aside under their own temporary
    name and rename: readers see one whole file, and nothing is left next to it."""
    import json
    import threading

    from visadapt.io import write_json_atomic

    target = tmp_path / "metrics.json"
    errors = []

    def writer(value):
        try:
            for step in range(50):
                write_json_atomic(target, {"writer": value, "step": step, "pad": "x" * 4096})
        except Exception as err:  # noqa: BLE001 (any failure of a writer fails the test)
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert json.loads(target.read_text())["step"] == 49
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# --------------------------------------------------------------------------- the recorded training run


GOOD_RUN = {"benchmark": "vtab", "task": "cifar", "model": "visadapt_procvit_tiny", "pretrained": "none",
            "seed": 0, "input_size": 32}
CRAFTED_RUNS = {
    "benchmark missing": ({k: v for k, v in GOOD_RUN.items() if k != "benchmark"}, "benchmark"),
    "model a number": ({**GOOD_RUN, "model": 123}, "model"),
    "model with an escape": ({**GOOD_RUN, "model": "vit\x1b[2J"}, "model"),
    "seed a string": ({**GOOD_RUN, "seed": "x"}, "seed"),
    "seed negative": ({**GOOD_RUN, "seed": -1}, "seed"),
    "input_size huge": ({**GOOD_RUN, "input_size": 10**9}, "input_size"),
    "input_size a float": ({**GOOD_RUN, "input_size": 32.5}, "input_size"),
    "pretrained a list": ({**GOOD_RUN, "pretrained": ["a"]}, "pretrained"),
    "precision an object": ({**GOOD_RUN, "precision": {"a": 1}}, "precision"),
}


def file_with_run(tmp_path: Path, run) -> Path:
    return visadapt.save_adapter(lora_vit(), tmp_path / "run.safetensors",
                                 metadata={io.TRAIN_METADATA: json.dumps(run)})


@pytest.mark.parametrize("case", list(CRAFTED_RUNS))
def test_a_crafted_training_record_is_refused_by_name_before_anything_is_built(case, tmp_path, monkeypatch):
    from visadapt import engine

    run, field = CRAFTED_RUNS[case]
    path = file_with_run(tmp_path, run)
    built = []
    monkeypatch.setattr("visadapt.backbones.create_backbone", lambda *a, **k: built.append(a))
    with pytest.raises(io.AdapterFileError) as err:
        engine.evaluate_adapter_file(path, tmp_path)
    assert str(path) in str(err.value) and f"visadapt.train.{field}" in str(err.value)
    assert "\x1b" not in str(err.value) and not built


@pytest.mark.parametrize("case", ["model a number", "seed a string", "pretrained a list"])
def test_export_reads_the_recorded_base_model_through_the_same_checks(case, tmp_path):
    from visadapt.export import read_adapter_on_base

    run, field = CRAFTED_RUNS[case]
    path = file_with_run(tmp_path, run)
    with pytest.raises(io.AdapterFileError, match=rf"visadapt\.train\.{field}"):
        read_adapter_on_base(path)


def test_vpr_evaluation_refuses_a_crafted_input_size_before_building_a_backbone(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from eval.vpr import evaluate_vpr_adapter_file

    path = file_with_run(tmp_path, {**GOOD_RUN, "benchmark": "vpr", "input_size": 10**7})
    monkeypatch.setattr("visadapt.backbones.create_backbone", lambda *a, **k: pytest.fail("built a backbone"))
    with pytest.raises(io.AdapterFileError, match=r"visadapt\.train\.input_size.*from 1 to 8192"):
        evaluate_vpr_adapter_file(path, tmp_path)
