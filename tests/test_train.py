"""The training engine and train/vtab.py on tiny procedural data: loss falls, 2 processes = 1, resume = no kill.

Runs go through the real script (in-process via ``main(argv)`` or as a subprocess where a second process
or a kill is the point), on a mini-VTAB folder with a few dozen images per split.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_scripts import load_train_script

from visadapt.backbones import embedded_weights_path
from visadapt.data.procedural import generate_mini_vtab
from visadapt.engine import EpochPermutation
from visadapt.io import TRAIN_METADATA, read_adapter_metadata

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "vtab.py"
TINY_SIZES = {"train800": 16, "val200": 8, "test": 20}  # 24 training images = 3 batches of 8


def _load_script():
    return load_train_script("vtab")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return generate_mini_vtab(tmp_path_factory.mktemp("minivtab"), seed=0, split_sizes=TINY_SIZES)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--output-dir", str(out), "--no-progress", "--pretrained", "none",
            "--batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "0", *extra]


def _metrics(out: Path, task: str) -> dict:
    return json.loads((out / task / "metrics.json").read_text())


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    a, b = EpochPermutation(50, seed=3), EpochPermutation(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(b) == first and sorted(first) == list(range(50))
    b.set_epoch(3)
    assert list(b) != first


def test_default_run_smoke_loss_falls(tiny_data, tmp_path):
    """The embedded default (shipped backbone + AdaptFormer) on a few images: training lowers the loss."""
    assert embedded_weights_path().is_file(), "assets/procvit_tiny.safetensors is shipped with the package"
    vtab = _load_script()
    args = _args(tiny_data, tmp_path, "--task", "textures", "--epochs", "4")
    args[args.index("none")] = "default"
    assert vtab.main(args) == 0
    m = _metrics(tmp_path, "textures")
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0] * 0.8, losses
    assert m["adapter"] == "adapter" and m["eval_samples"] == TINY_SIZES["test"]
    assert m["trainable_params"] == m["adapter_params"] + m["head_params"] and m["head_params"] == 96 * 8 + 8
    assert m["adapter_bytes"] == (tmp_path / "textures" / "adapter.safetensors").stat().st_size
    assert 0.0 <= m["accuracy_final"] <= m["accuracy_best"] <= 100.0


def test_bf16_autocast_trains_on_cpu_with_fp32_adapter_weights(tiny_data, tmp_path):
    """``accelerate launch --mixed_precision bf16`` on a CPU: the forward runs under bf16 autocast, the loss
    still falls, and the stored adapter (trainable parameters and optimiser state) stays float32. In a process
    of its own: Accelerate keeps the precision of the first Accelerator a process creates."""
    args = _args(tiny_data, tmp_path, "--task", "textures", "--epochs", "4")
    args[args.index("none")] = "default"
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, capture_output=True,
                   env={**_env(), "ACCELERATE_MIXED_PRECISION": "bf16"})
    m = _metrics(tmp_path, "textures")
    assert m["mixed_precision"] == "bf16"
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0] * 0.8, losses
    stored = load_file(str(tmp_path / "textures" / "adapter.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float32}


def test_linear_probe_and_metrics_file(tiny_data, tmp_path):
    vtab = _load_script()
    assert vtab.main(_args(tiny_data, tmp_path, "--task", "cells", "--epochs", "1", "--adapter", "linear")) == 0
    m = _metrics(tmp_path, "cells")
    assert m["adapter_params"] == 0 and m["head_params"] == 96 * 2 + 2
    assert m["train_split"] == "train800val200" and m["eval_split"] == "test" and m["normalize"] == "model"
    # what the run trained on and with: the data manifest of visadapt-data verify, device and versions
    from visadapt.data.verify import verify_benchmark
    expected = verify_benchmark(tiny_data, "mini-vtab", tasks=["cells"], check_images=False)
    assert m["data_manifest_sha256"] == expected.manifest_sha256() and m["data_problems"] == 0
    assert m["device"] == "cpu" and m["torch_version"] == torch.__version__ and m["timm_version"]
    # A finished task is kept on --resume and refused without it.
    assert vtab.main(_args(tiny_data, tmp_path, "--task", "cells", "--epochs", "1", "--adapter", "linear",
                           "--resume")) == 0
    assert vtab.main(_args(tiny_data, tmp_path, "--task", "cells", "--epochs", "1", "--adapter", "linear")) == 2


@pytest.mark.parametrize("bad, message", [
    (["--task", "digitz"], "did you mean 'digits'"),
    (["--set", "bottleneck"], "KEY=VALUE"),
    (["--set", "bottleneck", "4"], "e.g. --set bottleneck=8"),  # a space for '=': said before "unrecognized: 4"
    (["--adapter", "LoRA"], "did you mean 'lora'"),
    (["--set", "bottlenek=4"], "did you mean 'bottleneck'"),
    (["--adapter", "nope"], "'nope'"),
    (["--adapter-config", "missing.yaml"], "missing.yaml"),
])
def test_bad_arguments_exit_2_naming_the_input(tiny_data, tmp_path, capsys, bad, message):
    vtab = _load_script()
    try:
        code = vtab.main(_args(tiny_data, tmp_path, *bad))
    except SystemExit as exit_:  # argparse's own errors leave the process with 2 as well
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def _same_tensors(a: Path, b: Path, atol: float = 0.0) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        diff = float((ta[key].float() - tb[key].float()).abs().max()) if ta[key].numel() else 0.0
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=0 if atol == 0 else 1e-4,
                                   msg=f"{key}: max |difference| {diff:.3g}")


@pytest.mark.parametrize("adapter", ["adapter", "mosa"])
def test_resume_from_any_checkpoint_matches_uninterrupted_run(tiny_data, tmp_path, adapter):
    """Resuming from a mid-epoch or an epoch-end checkpoint ends bit-identical to the uninterrupted run
    (for mosa: the resumed run draws the modules the uninterrupted one drew at the same steps)."""
    vtab = _load_script()
    common = ("--task", "orientation", "--epochs", "3", "--checkpoint-every-steps", "1", "--keep-checkpoints",
              "100", "--adapter", adapter)
    full = tmp_path / "full"
    assert vtab.main(_args(tiny_data, full, *common)) == 0
    reference = _metrics(full, "orientation")
    checkpoints = sorted((full / "orientation" / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 9  # 3 steps per epoch x 3 epochs: 2 mid-epoch + 1 epoch-end per epoch
    for chosen in (checkpoints[1], checkpoints[5]):  # mid-epoch 1 (after batch 2), end of epoch 2
        run = tmp_path / chosen.name
        (run / "orientation" / "checkpoints").mkdir(parents=True)
        shutil.copytree(chosen, run / "orientation" / "checkpoints" / chosen.name)
        assert vtab.main(_args(tiny_data, run, *common, "--resume")) == 0
        resumed = _metrics(run, "orientation")
        assert resumed["resumed_from"].endswith(chosen.name)
        assert resumed["history"] == reference["history"]
        assert resumed["accuracy_final"] == reference["accuracy_final"]
        _same_tensors(run / "orientation" / "adapter.safetensors", full / "orientation" / "adapter.safetensors")


def test_killed_run_resumes_to_the_same_result(tiny_data, tmp_path):
    """SIGKILL a real training process after its first mid-run checkpoint, resume, compare."""
    common = ["--task", "position", "--epochs", "4", "--checkpoint-every-steps", "1"]
    full = tmp_path / "full"
    subprocess.run([sys.executable, str(SCRIPT), *_args(tiny_data, full, *common)], check=True, env=_env(),
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *_args(tiny_data, killed, *common)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed / "position" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any((p / "progress.json").is_file() and int(p.name.split("_")[1]) >= 2 for p in ckpts.glob("step_*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "position" / "metrics.json").exists()
    subprocess.run([sys.executable, str(SCRIPT), *_args(tiny_data, killed, *common, "--resume")], check=True,
                   env=_env(), capture_output=True)
    a, b = _metrics(killed, "position"), _metrics(full, "position")
    assert a["resumed_from"] is not None
    assert a["history"] == b["history"] and a["accuracy_final"] == b["accuracy_final"]
    _same_tensors(killed / "position" / "adapter.safetensors", full / "position" / "adapter.safetensors")


@pytest.mark.parametrize("adapter", ["adapter", "mosa"])
def test_two_processes_match_one(tiny_data, tmp_path, adapter):
    """Two CPU processes (gloo) = one process: same global batches, same accuracy, same adapter.

    For mosa this also shows that both processes draw the same module at every step (two forward passes per
    batch, symmetric KL): any disagreement would average gradients of different modules."""
    # Dropout draws differ between one batch of 8 and two of 4, so parity of the parameters is only
    # defined without it; everything else (data order, global batch, gradients) must agree.
    common = ["--task", "count", "--epochs", "2", "--adapter", adapter, "--set", "dropout=0"]
    if adapter == "mosa":
        common += ["--set", "keep_modules=true"]  # the file then holds the modules too, compared below
        # MoSA's consistency term starts at ~0 (the two passes nearly agree): its gradients are exact zeros in
        # one reduction order and 1e-12 residues in another, and AdamW's normalisation turns such a residue
        # into a full lr-sized step (1e-2 here), the size a wrong draw would give. SGD keeps float noise at
        # float size, so the comparison below can tell a draw that differs from noise.
        common += ["--optimizer", "sgd", "--momentum", "0.9"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(SCRIPT), *_args(tiny_data, one, *common)], check=True, env=_env(),
                   capture_output=True)
    # Accelerate 1.x starts ONE process for `launch --cpu --num_processes 2`; torchrun-style launching
    # (--multi_gpu) with ACCELERATE_USE_CPU=true is what gives several CPU processes (gloo).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "0"]
    result = subprocess.run([*launch, str(SCRIPT), *_args(tiny_data, two, *common)],
                            env={**_env(), "ACCELERATE_USE_CPU": "true"},
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _metrics(one, "count"), _metrics(two, "count")
    assert b["num_processes"] == 2 and a["num_processes"] == 1
    assert a["eval_samples"] == b["eval_samples"] == TINY_SIZES["test"]
    assert a["accuracy_final"] == b["accuracy_final"]
    for ha, hb in zip(a["history"], b["history"]):
        # float32 sums in another order (two shards, then an all-reduce): equal to about 5e-5 relative
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4, abs=1e-4)
    # Ranks drawing different modules would differ by the size of the updates themselves (1e-3 to 1e-2).
    _same_tensors(one / "count" / "adapter.safetensors", two / "count" / "adapter.safetensors", atol=1e-5)


@pytest.mark.parametrize("adapter", ["adapter", "mosa", "bitadapter"])
def test_visadapt_eval_reevaluation_matches_training_metrics(tiny_data, tmp_path, capsys, adapter):
    """Re-evaluating the saved adapter file gives exactly the final accuracy training recorded (for mosa the
    file holds the merged adapter, for bitadapter the packed 1-bit codes: what was evaluated is what is stored)."""
    from visadapt.eval.cli import main as eval_main

    vtab = _load_script()
    assert vtab.main(_args(tiny_data, tmp_path / "run", "--task", "digits", "cells", "--epochs", "2",
                           "--adapter", adapter)) == 0
    capsys.readouterr()
    out_json = tmp_path / "table.json"
    assert eval_main(["--benchmark", "mini-vtab", "--adapters", str(tmp_path / "run"), "--data-root",
                      str(tiny_data), "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "Digits" in table and "Cells" in table
    row = json.loads(out_json.read_text())["runs"][0]
    assert row["missing"] == ["textures", "landcover", "count", "position", "orientation"]
    for task in ("digits", "cells"):
        recorded = _metrics(tmp_path / "run", task)
        assert row["per_task"][task]["accuracy"] == pytest.approx(recorded["accuracy_final"], abs=1e-9)
        assert row["per_task"][task]["adapter_bytes"] == recorded["adapter_bytes"]
        # the file names the precision it was evaluated at, which re-evaluation uses
        run_meta = json.loads(read_adapter_metadata(tmp_path / "run" / task / "adapter.safetensors")[TRAIN_METADATA])
        assert run_meta["precision"] == recorded["precision"] == "fp32"


def test_cache_flag_trains_exactly_as_decoding(tiny_data, tmp_path):
    """``--cache`` feeds the same pixels (uint8, normalised on the device), so the run's numbers are the decode
    path's to the bit; evaluated once, only the training split is cached, evaluated twice every split is."""
    vtab = _load_script()
    common = ("--task", "cells", "--epochs", "2", "--eval-every", "2")
    assert vtab.main(_args(tiny_data, tmp_path / "decode", *common)) == 0
    assert vtab.main(_args(tiny_data, tmp_path / "cache", *common, "--cache-dir", str(tmp_path / "caches"))) == 0
    decoded, cached = _metrics(tmp_path / "decode", "cells"), _metrics(tmp_path / "cache", "cells")
    assert decoded["history"] == cached["history"] and decoded["accuracy_final"] == cached["accuracy_final"]
    assert decoded["data_cache"] == {"train800val200": None, "test": None}
    assert cached["data_cache"]["test"] is None  # read once: a cache would add a write to the same decode
    assert Path(cached["data_cache"]["train800val200"]).is_file()
    assert str(tmp_path / "caches") in cached["data_cache"]["train800val200"]
    _same_tensors(tmp_path / "decode" / "cells" / "adapter.safetensors",
                  tmp_path / "cache" / "cells" / "adapter.safetensors")

    assert vtab.main(_args(tiny_data, tmp_path / "every", "--task", "cells", "--epochs", "2", "--eval-every", "1",
                           "--cache-dir", str(tmp_path / "caches"))) == 0
    every = _metrics(tmp_path / "every", "cells")["data_cache"]
    assert every["train800val200"] == cached["data_cache"]["train800val200"]  # reused, not rebuilt
    assert Path(every["test"]).is_file()
    with pytest.raises(SystemExit) as refused:  # argparse's error exit
        vtab.main(_args(tiny_data, tmp_path / "x", *common, "--no-cache", "--cache-dir", "d"))
    assert refused.value.code == 2
