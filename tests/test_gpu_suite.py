"""``eval/bench/gpu_suite.py``: the prepared GPU measurement run, kept from rotting by its CPU ``--dry-run``.

The dry run goes through every part's real code path (the bench functions, the child processes, the JSON and the
markdown) with tiny sizes; the time caps, the process-group kill and the command-line checks are tested on their
own, quickly, in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "bench" / "gpu_suite.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_suite
from children import run_child


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One ``--dry-run`` of the whole suite in its own process: ``(results JSON, markdown text, stdout)``."""
    folder = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(folder / "out"),
                           "--work-dir", str(folder / "work")], capture_output=True, text=True, env=env, cwd=ROOT,
                          check=False, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((folder / "out" / gpu_suite.JSON_NAME).read_text())
    return results, (folder / "out" / gpu_suite.MARKDOWN_NAME).read_text(), done.stdout


def test_the_dry_run_measures_every_part_through_its_bench_code(dry_run):
    results, _markdown, _stdout = dry_run
    assert results["dry_run"] is True and results["note"] == gpu_suite.DRY_RUN_NOTE
    assert {"cpu", "gpu", "driver", "cuda", "torch", "timm", "diffusers", "peft"} <= set(results["machine"])
    assert results["machine"]["torch"] == torch.__version__ and results["date"][:4].isdigit()
    assert list(results["parts"]) == list(gpu_suite.PARTS)
    for name, part in results["parts"].items():
        assert part["status"] == "complete", (name, part["reason"], part["notes"])
        assert part["readme_section"] == gpu_suite.PARTS[name].readme and part["wall_s"] <= part["cap_s"]
        assert any(row["status"] == "measured" for row in part["rows"]), name
        for row in part["rows"]:
            assert row["status"] == "measured" or row["reason"], (name, row)
    rows = {name: {row["name"]: row for row in part["rows"]} for name, part in results["parts"].items()}

    train = rows["train"]
    assert list(train) == list(gpu_suite.TRAIN_ORDER)
    for name in gpu_suite.DRY_RUN_TRAIN:  # each trained in its own process through visadapt.engine.fit
        figures = train[name]["figures"]
        assert train[name]["status"] == "measured" and figures["imgs_per_s"] > 0 and figures["trainable"] > 0
    assert train["reference style"]["figures"]["attention"] == "eager 12"
    assert train["reference style"]["figures"]["loader"] == "decode" and train["visadapt"]["figures"]["loader"] == "cache"
    assert train["reference style"]["figures"]["vs_reference"] == 1.0
    assert train["visadapt"]["figures"]["vs_reference"] == pytest.approx(
        train["visadapt"]["figures"]["imgs_per_s"] / train["reference style"]["figures"]["imgs_per_s"])
    assert train["visadapt xformers"]["status"] == "skipped" and "xformers" in train["visadapt xformers"]["reason"]

    loader = rows["loader"]
    build = loader["cache build (once) and re-open"]["figures"]
    assert build["images"] == 1000 and build["build_s"] > 0
    figures = loader["0 workers"]["figures"]
    fastest = max(train[n]["figures"]["imgs_per_s"] for n in gpu_suite.DRY_RUN_TRAIN)
    assert figures["cache_vs_gpu"] == pytest.approx(figures["cache_imgs_per_s"] / fastest)

    diffusers = rows["diffusers"]
    for scenario in ("attn", "attn+conv", "resadapter"):
        figures = diffusers[scenario]["figures"]
        assert figures["base ms"] > 0 and figures["base x base"] == 1.0 and figures["visadapt fused ms"] > 0
        assert figures["max_abs_differences"]["adapter effect |unfused - base|"] > 0
    assert diffusers["attn"]["figures"]["max_abs_differences"]["|visadapt - PEFT| unfused"] < 1e-5
    assert diffusers["resadapter"]["figures"]["PEFT unfused ms"] is None  # PEFT has no ResAdapter

    (vtab,) = rows["vtab"].values()
    figures = vtab["figures"]
    assert figures["wall_s"] >= figures["fit_s"] > 0 and figures["test_images"] > 0 and figures["evaluations"] == 1
    assert [r["figures"]["k"] for r in rows["vpr"].values()] == gpu_suite.SETTINGS["dry-run"]["vpr"]["ks"]
    overhead = rows["lora_overhead"]
    assert overhead["training step: peft lora qkv"]["figures"]["vs_peft"] == 1.0
    assert overhead["inference: lora q,v merged"]["figures"]["max_abs_diff"] <= 1e-4


def test_the_markdown_renders_one_table_per_part(dry_run):
    markdown_it = pytest.importorskip("markdown_it")
    results, markdown, _stdout = dry_run
    assert gpu_suite.DRY_RUN_NOTE in markdown and f"torch {torch.__version__}" in markdown
    assert results["date"] in markdown
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(markdown)
    tables = html.split("<table>")[1:]
    assert len(tables) == len(gpu_suite.PARTS)
    for (name, part), table in zip(results["parts"].items(), tables, strict=True):
        body = table.split("<tbody>")[1].split("</tbody>")[0]
        assert body.count("<tr>") == len(part["rows"]), name
        header = table.split("</thead>")[0]
        assert header.count("<th>") == 2 + len(gpu_suite.PARTS[name].columns), name
        assert f"<h2>{name}: " in html


def _fake_part(units, cap_s: float = 0.6) -> tuple[gpu_suite.PartRun, list[int]]:
    part = gpu_suite.Part("fake", "nowhere", "a test part", cap_s, cap_s, lambda run: units,
                          [gpu_suite.Column("value", gpu_suite.number("value"))])
    suite = gpu_suite.Suite(Path("unused"), Path("unused"), dry_run=True, total_cap_s=10)
    return gpu_suite.PartRun(suite, part, cap_s), []


def test_a_time_cap_stops_the_unit_running_and_records_the_rest_as_skipped():
    Unit = gpu_suite.Unit

    def broken():
        raise ValueError("no such thing")

    units = [Unit("quick", lambda: {"value": 1.0}), Unit("broken", broken), Unit("planned skip", skip="not here"),
             Unit("slow", lambda: time.sleep(5) or {"value": 2.0}), Unit("never", lambda: {"value": 3.0})]
    run, saves = _fake_part(units)
    started = time.monotonic()
    gpu_suite.run_part(run, lambda: saves.append(len(run.result["rows"])))
    assert time.monotonic() - started < 3  # the alarm stopped the sleeping unit
    rows = {row["name"]: row for row in run.result["rows"]}
    assert list(rows) == ["quick", "broken", "planned skip", "slow", "never"]
    assert rows["quick"]["status"] == "measured" and rows["quick"]["figures"] == {"value": 1.0}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["reason"] == "ValueError: no such thing"
    assert rows["planned skip"]["status"] == "skipped" and rows["planned skip"]["reason"] == "not here"
    assert rows["slow"]["status"] == "stopped" and "time cap of 1 s" in rows["slow"]["reason"]
    assert rows["never"]["status"] == "skipped" and "time cap" in rows["never"]["reason"]
    assert run.result["status"] == "partial" and run.result["wall_s"] < 3
    assert saves[:3] == [1, 2, 3] and saves[-1] == 5  # written after every unit, and at the end


def test_a_child_that_runs_into_the_cap_stops_the_part_like_the_alarm():
    def child_past_its_limit():
        raise subprocess.TimeoutExpired(["x"], 1)

    run, _ = _fake_part([gpu_suite.Unit("child", child_past_its_limit), gpu_suite.Unit("next", dict)], 30)
    gpu_suite.run_part(run, lambda: None)
    assert [row["status"] for row in run.result["rows"]] == ["stopped", "skipped"]
    assert run.result["status"] == "partial"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; only its exit status is left to collect


def test_a_child_past_its_time_limit_is_killed_with_its_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # the grandchild does not hold the child's output pipes, so nothing but the group kill can end it early
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", script], timeout=3)
    assert time.monotonic() - started < 20
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)  # subprocess.run's timeout would have left it sleeping


@pytest.mark.parametrize("argv, message", [
    (["--only", "nosuch"], "--only nosuch: not a part"),
    (["--cap", "train"], "--cap 'train': write PART=SECONDS"),
    (["--cap", "nosuch=3"], "--cap 'nosuch=3': write PART=SECONDS"),
    (["--cap", "train=soon"], "SECONDS must be a number >= 0"),
    (["--cap", "train=-1"], "SECONDS must be a number >= 0"),
    (["--total-cap", "0"], "--total-cap 0.0: must be > 0"),
])
def test_command_line_mistakes_exit_2_with_one_error_line_before_writing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.main([*argv, "--dry-run", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_to_measure_and_names_the_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.main(["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_list_prints_every_part_with_its_caps_and_only_selects_parts(capsys):
    assert gpu_suite.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for part in gpu_suite.PARTS.values():
        assert f"{part.name:<15}{part.cap_s:>12.0f}{part.dry_cap_s:>12.0f}  {part.readme}" in listed
    names, caps = gpu_suite.resolve(gpu_suite.parse_args(["--only", "vtab,loader", "--cap", "loader=7"]))
    assert names == ["prepare", "loader", "vtab"]  # the data they read is prepared first; the suite's order
    assert caps["loader"] == 7 and caps["vtab"] == gpu_suite.PARTS["vtab"].cap_s
    names, caps = gpu_suite.resolve(gpu_suite.parse_args(["--only", "vpr", "--dry-run"]))
    assert names == ["vpr"] and caps["vpr"] == gpu_suite.PARTS["vpr"].dry_cap_s


def test_a_run_past_the_total_cap_skips_the_parts_left_and_still_writes_both_files(tmp_path):
    suite = gpu_suite.Suite(tmp_path / "out", tmp_path / "work", dry_run=True, total_cap_s=1e-6)
    results = suite.run(["vpr", "loader"], {"vpr": 5, "loader": 5}, ["--dry-run"])
    assert [p["status"] for p in results["parts"].values()] == ["skipped", "skipped"]
    assert "total time cap" in results["parts"]["vpr"]["reason"]
    saved = json.loads((tmp_path / "out" / gpu_suite.JSON_NAME).read_text())
    assert saved["parts"]["loader"]["status"] == "skipped"
    assert "## loader: " in (tmp_path / "out" / gpu_suite.MARKDOWN_NAME).read_text()
