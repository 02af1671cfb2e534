"""Progress output (visadapt.progress) and the long jobs that show it: a tqdm bar on a terminal, clean lines without
carriage returns off a terminal, nothing with --no-progress / VISADAPT_NO_PROGRESS=1, and only on the main process."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visadapt import progress as progress_module
from visadapt.progress import ENV_VAR, Progress, set_progress_enabled


class TerminalStream(io.StringIO):
    """What tqdm writes to when stderr is a terminal: a text stream whose ``isatty()`` is True."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    """Progress switched on, as in a fresh process of rank 0 (another test's --no-progress run may have turned the
    process-wide switch off, and a launcher's RANK may be set)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    set_progress_enabled(True)
    yield
    set_progress_enabled(True)


# The jobs write to sys.stderr; it is replaced inside each test body (pytest's own capture sets sys.stderr again
# between a fixture's setup and the test, so a fixture cannot do it).
def on_terminal():
    return contextlib.redirect_stderr(TerminalStream())


def in_a_log():
    return contextlib.redirect_stderr(io.StringIO())


@pytest.fixture
def other_rank(monkeypatch):
    """This process as rank 1 of an Accelerate launch: a PartialState whose process index is 1."""
    from accelerate import PartialState

    PartialState(cpu=True)
    monkeypatch.setattr(PartialState, "_shared_state", {**PartialState._shared_state, "process_index": 1})
    assert not PartialState().is_main_process


# ------------------------------------------------------------------------------------------- building block


def test_bar_on_a_terminal():
    stream = TerminalStream()
    assert list(Progress(range(5), desc="work", unit="items", file=stream)) == [0, 1, 2, 3, 4]
    assert "\r" in stream.getvalue() and "work" in stream.getvalue() and "5/5" in stream.getvalue()


def test_lines_off_a_terminal_start_end_and_periodic():
    stream = io.StringIO()
    list(Progress(range(5), desc="work", unit="items", file=stream))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "work: started (5 items)"
    assert lines[1].startswith("work: done, 5/5 items in 00:00 (") and len(lines) == 2
    # a long job (here: the interval is 0 s) writes a line per update in between, still without '\r'
    stream = io.StringIO()
    with Progress(total=3, desc="long", unit="images", file=stream, line_interval=0.0) as bar:
        bar.update(2)
        bar.update(1)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 4
    assert lines[1].startswith("long: 2/3 images [") and lines[2].startswith("long: 3/3 images [")


def test_cut_short_work_says_stopped_and_transient_work_is_quiet_off_a_terminal():
    stream = io.StringIO()
    with pytest.raises(RuntimeError), Progress(total=4, desc="work", file=stream) as bar:
        bar.update(1)
        raise RuntimeError("boom")
    assert stream.getvalue().splitlines()[-1].startswith("work: stopped, 1/4 it in ")
    stream = io.StringIO()
    list(Progress(range(3), desc="eval", leave=False, file=stream))
    assert stream.getvalue() == ""
    # a long transient one (interval 0 s here) writes its periodic lines, then its end line
    stream = io.StringIO()
    list(Progress(range(2), desc="eval", leave=False, file=stream, line_interval=0.0))
    lines = stream.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines[:2]] == ["eval: 1/2 it", "eval: 2/2 it"]
    assert len(lines) == 3 and lines[2].startswith("eval: done, 2/2 it in ")


@pytest.mark.parametrize("switch", ["flag", "env"])
def test_switched_off_nothing_is_written(monkeypatch, switch):
    if switch == "flag":
        set_progress_enabled(False)
    else:
        monkeypatch.setenv(ENV_VAR, "1")
    for stream in (TerminalStream(), io.StringIO()):
        assert list(Progress(range(3), desc="work", file=stream)) == [0, 1, 2]
        progress_module.announce("generating", file=stream)
        assert stream.getvalue() == ""


def test_only_the_main_process_writes(other_rank):
    for stream in (TerminalStream(), io.StringIO()):
        bar = Progress(range(3), desc="work", file=stream)
        assert list(bar) == [0, 1, 2] and bar.n == 3 and not bar.active
        assert stream.getvalue() == ""


def test_rank_from_the_launcher_before_accelerate_has_a_state(monkeypatch):
    from accelerate import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})
    monkeypatch.setenv("RANK", "1")
    assert not progress_module.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert progress_module.is_main_process()


def test_no_progress_flag_of_the_train_jobs_switches_everything_off():
    import argparse

    from visadapt.engine import add_run_flags, finish_run_args

    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    finish_run_args(parser, parser.parse_args(["--no-progress"]))
    assert not progress_module.progress_enabled()
    finish_run_args(parser, parser.parse_args([]))
    assert progress_module.progress_enabled()


# ----------------------------------------------------------------------------------------------- the jobs


def _evaluate() -> dict:
    """visadapt.engine.evaluate of a tiny classifier over 12 samples in batches of 4."""
    from visadapt.engine import evaluate, make_accelerator

    accelerator = make_accelerator(None, cpu=True)
    data = TensorDataset(torch.randn(12, 3), torch.arange(12) % 2)
    model, loader = accelerator.prepare(nn.Linear(3, 2), DataLoader(data, batch_size=4))
    return evaluate(model, loader, accelerator, len(data))


def test_evaluation_shows_a_bar_on_a_terminal():
    with on_terminal() as terminal:
        assert _evaluate()["samples"] == 12
    # a transient bar of batches: drawn, then cleared with carriage returns when the evaluation ends
    assert "evaluating:" in terminal.getvalue() and "/3 [" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_evaluation_is_transient_in_a_log():
    with in_a_log() as log:
        _evaluate()
    assert log.getvalue() == ""  # a short evaluation inside a training run adds nothing to a log


@pytest.mark.parametrize("why", ["flag", "rank"])
def test_evaluation_switched_off_or_on_another_rank_shows_nothing_on_a_terminal(request, why):
    if why == "flag":
        set_progress_enabled(False)
    else:
        request.getfixturevalue("other_rank")
    with on_terminal() as terminal:
        _evaluate()
    assert terminal.getvalue() == ""


def test_cache_build_progress(tmp_path):
    from tests.test_data_cache import write_vtab
    from visadapt.data.cache import load_cached_split

    write_vtab(tmp_path)
    with on_terminal() as terminal:
        load_cached_split("vtab", tmp_path, "dtd", "test", input_size=12, workers=1)
    assert "decoded-image cache dtd/test" in terminal.getvalue() and "7/7" in terminal.getvalue()
    assert "\r" in terminal.getvalue()


def test_cache_build_lines_in_a_log_and_nothing_on_another_rank(tmp_path, request):
    from tests.test_data_cache import write_vtab
    from visadapt.data.cache import load_cached_split

    write_vtab(tmp_path)
    with in_a_log() as log:
        load_cached_split("vtab", tmp_path, "dtd", "test", input_size=12, workers=1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "decoded-image cache dtd/test: started (7 images)"
    assert lines[-1].startswith("decoded-image cache dtd/test: done, 7/7 images in ")
    # the same build on a rank other than the main one says nothing
    request.getfixturevalue("other_rank")
    with in_a_log() as log:
        load_cached_split("vtab", tmp_path, "dtd", "val200", input_size=12, workers=1)
    assert log.getvalue() == ""


SIZES = {"train800": 2, "val200": 1, "test": 1}  # 7 tasks x 4 images


def test_mini_vtab_generation_announces_itself_then_shows_a_bar(tmp_path):
    from visadapt.data.procedural import generate_mini_vtab

    with on_terminal() as terminal:
        generate_mini_vtab(tmp_path / "suite", split_sizes=SIZES)
    text = terminal.getvalue()
    first = text.splitlines()[0]
    assert first.startswith("generating the embedded mini-VTAB data once (7 tasks, 28 images") and "about" in first
    assert str(tmp_path / "suite") in first
    assert "mini-VTAB" in text and "28/28" in text and "\r" in text
    with on_terminal() as terminal:
        generate_mini_vtab(tmp_path / "suite", split_sizes=SIZES)  # reused: nothing to say
    assert terminal.getvalue() == ""


@pytest.mark.parametrize("where", ["log", "env", "rank"])
def test_mini_vtab_generation_in_a_log_switched_off_and_on_another_rank(tmp_path, monkeypatch, request, where):
    from visadapt.data.procedural import generate_mini_vtab

    if where == "env":
        monkeypatch.setenv(ENV_VAR, "1")
    elif where == "rank":
        request.getfixturevalue("other_rank")
    with in_a_log() as log:
        generate_mini_vtab(tmp_path / "suite", split_sizes=SIZES)
    if where == "log":
        lines = log.getvalue().splitlines()
        assert "\r" not in log.getvalue() and len(lines) == 3
        assert lines[1] == "mini-VTAB: started (28 images)" and lines[2].startswith("mini-VTAB: done, 28/28 images")
    else:
        assert log.getvalue() == ""


def _eval_command(tmp_path, *extra) -> tuple[int, list[str]]:
    """``visadapt-eval --data-root`` over a run of 3 task folders and one bare file (4 files), fake evaluator."""
    from visadapt.eval.cli import main

    run_dir = tmp_path / "lora"
    for name in ["digits", "cells", "count"]:
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        (run_dir / name / "adapter.safetensors").write_bytes(b"fake")
    (tmp_path / "other.safetensors").write_bytes(b"fake")
    seen = []

    def fake_evaluate(path, data_root, *, benchmark=None, task=None, **kwargs):
        seen.append(path)
        return {"benchmark": benchmark, "task": task or "textures", "accuracy": 50.0}

    code = main(["--benchmark", "mini-vtab", "--adapters", str(run_dir), str(tmp_path / "other.safetensors"),
                 "--data-root", str(tmp_path), *extra], evaluate=fake_evaluate)
    return code, seen


def test_eval_command_counts_adapter_files(tmp_path):
    with on_terminal() as terminal, contextlib.redirect_stdout(io.StringIO()):
        code, seen = _eval_command(tmp_path)
    assert code == 0 and len(seen) == 4
    assert "visadapt-eval: 100%" in terminal.getvalue() and "4/4" in terminal.getvalue()
    with in_a_log() as log, contextlib.redirect_stdout(io.StringIO()):
        assert _eval_command(tmp_path)[0] == 0
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "visadapt-eval: started (4 files)" and lines[-1].startswith("visadapt-eval: done, 4/4 files")
    assert sum(line.startswith("visadapt-eval: evaluating ") for line in lines) == 4


def test_eval_command_no_progress_keeps_only_the_per_file_lines(tmp_path):
    with on_terminal() as terminal, contextlib.redirect_stdout(io.StringIO()):
        assert _eval_command(tmp_path, "--no-progress")[0] == 0
    lines = terminal.getvalue().splitlines()
    assert "\r" not in terminal.getvalue() and len(lines) == 4
    assert all(line.startswith("visadapt-eval: evaluating ") for line in lines)


def _help(main, argv) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        main(argv)
    return " ".join(out.getvalue().split())


def test_every_command_has_no_progress_in_the_train_jobs_words():
    import argparse

    from visadapt.cli import main as visadapt_main
    from visadapt.data.verify import main as data_main
    from visadapt.engine import add_run_flags
    from visadapt.eval.cli import _parser as eval_parser
    from visadapt.train.selma_data import parse_args as selma_data_args

    train = argparse.ArgumentParser()
    add_run_flags(train)
    words = next(a.help for a in train._actions if a.dest == "no_progress")
    assert words == progress_module.NO_PROGRESS_HELP
    expected = f"--no-progress {words}"
    assert expected in " ".join(eval_parser().format_help().split())
    assert expected in _help(visadapt_main, ["export", "--help"])
    assert expected in _help(selma_data_args, ["--help"])
    with contextlib.redirect_stdout(io.StringIO()) as out:  # visadapt-data returns argparse's exit code
        assert data_main(["verify", "--help"]) == 0
    assert expected in " ".join(out.getvalue().split())


def test_data_verify_shows_tasks_and_no_progress_silences_it(tmp_path):
    from visadapt.data.procedural import generate_mini_vtab
    from visadapt.data.verify import main as data_main

    root = generate_mini_vtab(tmp_path / "suite", split_sizes=SIZES)
    with in_a_log() as log, contextlib.redirect_stdout(io.StringIO()):
        assert data_main(["verify", str(root), "--benchmark", "mini-vtab"]) == 0
    lines = log.getvalue().splitlines()
    assert lines == ["visadapt-data verify: started (7 tasks)", lines[1]] and "done, 7/7 tasks" in lines[1]
    with in_a_log() as log, contextlib.redirect_stdout(io.StringIO()):
        assert data_main(["verify", str(root), "--benchmark", "mini-vtab", "--no-progress"]) == 0
    assert log.getvalue() == ""


class FakeTextToImage:
    """What train/selma_data.py calls of a diffusers pipeline, drawing 8x8 grey images (the real pipeline's output
    is tested in test_selma.py; here only the counting matters)."""

    unet = type("Unet", (), {"config": type("Config", (), {"sample_size": 8})()})()
    vae_scale_factor = 1

    def to(self, device):
        return self

    def set_progress_bar_config(self, **options):
        self.bar_options = options

    def __call__(self, prompts, **kwargs):
        from PIL import Image

        return type("Output", (), {"images": [Image.new("RGB", (8, 8), 128) for _ in prompts]})()


def test_selma_data_counts_every_image_of_the_whole_job(tmp_path, monkeypatch):
    import visadapt.diffusion
    from tests.train_scripts import load_train_script

    monkeypatch.setattr(visadapt.diffusion, "load_pipeline", lambda name: FakeTextToImage())
    script = load_train_script("selma_data")
    (tmp_path / "count.txt").write_text("one circle\ntwo squares\na red star\n")
    (tmp_path / "color.txt").write_text("a blue circle\na green square\n")
    argv = ["--prompts", f"counting={tmp_path / 'count.txt'}", "--prompts", f"color={tmp_path / 'color.txt'}",
            "--output-dir", str(tmp_path / "data"), "--shard-size", "2", "--steps", "1", "--batch-size", "2"]
    with in_a_log() as log, contextlib.redirect_stdout(io.StringIO()) as out:
        assert script.main(argv) == 0
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "selma_data: started (5 images)" and lines[-1].startswith("selma_data [color]: done, 5/5 images")
    assert "[counting] 3 prompts: 2 shards written" in out.getvalue()  # the summaries stay on stdout
    with on_terminal() as terminal, contextlib.redirect_stdout(io.StringIO()) as out:
        assert script.main(argv) == 0  # every shard complete: skipped ones count too
    assert "5/5" in terminal.getvalue() and "0 shards written, 1 already complete" in out.getvalue()
    with on_terminal() as terminal, contextlib.redirect_stdout(io.StringIO()):
        assert script.main([*argv, "--no-progress"]) == 0
    assert terminal.getvalue() == ""


def test_generated_datasets_announce_themselves_and_count(tmp_path):
    from visadapt.data.ranking import generate_mini_counting

    with in_a_log() as log:
        generate_mini_counting(tmp_path / "counting", sizes={"train": 3, "val": 1, "test": 1})
    lines = log.getvalue().splitlines()
    assert lines[0] == f"generating the mini-counting data once into {tmp_path / 'counting'}; later runs reuse it"
    assert lines[1] == "mini-counting: started (5 images)" and lines[2].startswith("mini-counting: done, 5/5 images")
    with in_a_log() as log:
        generate_mini_counting(tmp_path / "counting", sizes={"train": 3, "val": 1, "test": 1})  # reused
    assert log.getvalue() == ""


def test_export_shows_its_steps(tmp_path):
    from tests.test_export import EMBEDDED, procvit_adapter
    from visadapt.cli import main

    path, _ = procvit_adapter(tmp_path, rank=4)
    argv = ["export", str(path), "--model", EMBEDDED, "--pretrained", "none", "--to", str(tmp_path / "out")]
    with in_a_log() as log, contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    lines = log.getvalue().splitlines()
    assert lines[0] == "visadapt export: building the base model: started (3 steps)"
    assert lines[-1].startswith("visadapt export: writing and reloading the dense model: done, 3/3 steps")
    with on_terminal() as terminal, contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--overwrite", "--no-progress"]) == 0
    assert terminal.getvalue() == ""


def test_place_recognition_and_ranking_evaluators_show_transient_bars():
    from visadapt.eval.ranking import score_table
    from visadapt.eval.vpr import extract_place_features

    class Places(nn.Module):  # (B, 3, H, W) -> global (B, 4), local (B, 2, 2, 4), as PlaceRecognitionModel
        def forward(self, images):
            pooled = images.mean(dim=(2, 3)).repeat(1, 2)[:, :4]
            return pooled, pooled[:, None, None, :].expand(-1, 2, 2, -1)

    class Table:  # what score_table reads of a RankingTable
        def __init__(self):
            self.rows = [type("Row", (), {"title": title})() for title in ("a", "a", "b")]

        def __len__(self):
            return 3

        def load(self, i):
            return torch.full((3, 4, 4), float(i))

    images = TensorDataset(torch.randn(6, 3, 4, 4), torch.arange(6))
    with on_terminal() as terminal:
        global_desc, _ = extract_place_features(Places(), images, batch_size=2, device="cpu",
                                                desc="database features")
        scores = score_table(lambda batch, title: batch.mean(dim=(1, 2, 3)), Table())
    assert global_desc.shape == (6, 4) and scores.tolist() == [0.0, 1.0, 2.0]
    assert "database features:" in terminal.getvalue() and "scoring images:" in terminal.getvalue()
    with in_a_log() as log:
        extract_place_features(Places(), images, batch_size=2, device="cpu")
        score_table(lambda batch, title: batch.mean(dim=(1, 2, 3)), Table())
    assert log.getvalue() == ""
