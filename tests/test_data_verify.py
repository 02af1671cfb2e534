"""``visadapt-data verify`` on generated folders: a clean folder verifies with a manifest, and every defect is
found, named with its file and line, and reported together with the others in one run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
from PIL import Image

from visadapt.data import procedural, verify
from visadapt.data.errors import DatasetError
from visadapt.data.tasks import FGVC_TASKS, VTAB1K_TEST_SIZES, VTAB_TASKS
from visadapt.data.verify import MANIFEST_NAME, Problem, main, verify_benchmark

VTAB_SIZES = {"train800": 800, "val200": 200, "test": 6}


def write_unique_image(path, index):
    """A 4x4 PNG (lossless whatever the file name says) whose pixels encode ``index``, so no two generated
    images share their bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (index % 256, index // 256 % 256, 7)).save(path, format="PNG")


def write_vtab_task(task_dir, num_classes, sizes=VTAB_SIZES, offset=0):
    """NOAH layout with protocol-sized train800/val200; train800val200 lists the same images as the two."""
    lines = {}
    index = offset
    for split, count in sizes.items():
        lines[split] = []
        for i in range(count):
            rel = f"images/{split}/{i:06d}.png"
            write_unique_image(task_dir / rel, index)
            index += 1
            lines[split].append(f"{rel} {i % num_classes}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task_dir / f"{split}.txt").write_text("".join(rows))
    return task_dir


@pytest.fixture(autouse=True)
def _small_svhn_test_split(monkeypatch):
    """The template folders hold svhn with a 6-image test split (26,032 images would make every test slow): here
    svhn's official test size is not checked; test_official_test_sizes_are_checked covers that check."""
    monkeypatch.setattr(verify, "VTAB_TEST_SIZES", {k: v for k, v in verify.VTAB_TEST_SIZES.items() if k != "svhn"})


@pytest.fixture(scope="module")
def clean_vtab_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    write_vtab_task(root / "svhn", 10)
    return root


@pytest.fixture
def vtab_root(tmp_path, clean_vtab_template):
    root = tmp_path / "vtab"
    shutil.copytree(clean_vtab_template, root)
    return root


def rewrite_line(path, lineno, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = text + "\n"
    path.write_text("".join(lines))


def found(report, file, line, fragment):
    return [p for p in report.problems if p.file == str(file) and p.line == line and fragment in p.message]


# ------------------------------------------------------------------------------------------------ clean


def test_clean_vtab_folder_verifies_with_a_manifest(vtab_root):
    report = verify_benchmark(vtab_root, "vtab")
    assert report.problems == [] and report.ok
    assert "cifar100" in report.absent_tasks and "svhn" not in report.absent_tasks
    task = report.manifest["tasks"]["svhn"]
    assert task["image_count"] == 1006 and report.manifest["image_count"] == 1006
    split = task["splits"]["train800"]
    assert split["images"] == 800 and split["class_counts"] == [80] * 10
    assert task["splits"]["test"]["class_counts"] == [1] * 6 + [0] * 4
    assert split["sha256"] == hashlib.sha256((vtab_root / "svhn/train800.txt").read_bytes()).hexdigest()
    assert task["splits"]["train800val200"]["images"] == 1000
    # The manifest hash is the data's, not the machine's: a copy elsewhere hashes the same.
    other = vtab_root.parent / "copy"
    shutil.copytree(vtab_root, other)
    assert verify_benchmark(other, "vtab").manifest_sha256() == report.manifest_sha256()
    # ...and a changed image changes it.
    write_unique_image(other / "svhn/images/test/000000.png", 9999)
    assert verify_benchmark(other, "vtab").manifest_sha256() != report.manifest_sha256()


def test_generated_mini_vtab_verifies_clean(tmp_path):
    root = procedural.generate_mini_vtab(tmp_path / "mini", split_sizes={"train800": 8, "val200": 4, "test": 6})
    report = verify_benchmark(root, "mini-vtab")
    assert report.problems == []
    assert len(report.manifest["tasks"]) == 7 and report.manifest["image_count"] == 7 * 18
    assert report.manifest["tasks"]["digits"]["splits"]["train800val200"]["images"] == 12
    # The sizes the generator recorded are the expected ones: a dropped line is a wrong size.
    test_file = root / "count/test.txt"
    test_file.write_text("".join(test_file.read_text().splitlines(keepends=True)[:-1]))
    report = verify_benchmark(root, "mini-vtab")
    assert [str(p) for p in report.problems] == [
        (f"{test_file}: lists 5 images; the mini-vtab protocol expects 6 for test of 'count'. The folder is "
         "incomplete or was written by another protocol; re-create it")]


# ------------------------------------------------------------------------------------------------ defects


def test_missing_split_file(vtab_root):
    (vtab_root / "svhn/val200.txt").unlink()
    report = verify_benchmark(vtab_root, "vtab")
    assert found(report, vtab_root / "svhn/val200.txt", None, "split file does not exist (found: test.txt, "
                                                                "train800.txt, train800val200.txt)")


def test_malformed_line_and_label_outside_class_count(vtab_root):
    test_file = vtab_root / "svhn/test.txt"
    rewrite_line(test_file, 2, "images/test/000001.png two")
    rewrite_line(test_file, 4, "images/test/000003.png 10")
    report = verify_benchmark(vtab_root, "vtab")
    assert found(report, test_file, 2, "malformed line 'images/test/000001.png two'")
    assert found(report, test_file, 4, "label 10 is outside [0, 10) for task 'svhn'")
    assert len(report.problems) == 2


def test_wrong_split_size(vtab_root):
    train_file = vtab_root / "svhn/train800.txt"
    train_file.write_text("".join(train_file.read_text().splitlines(keepends=True)[:799]))
    report = verify_benchmark(vtab_root, "vtab")
    assert found(report, train_file, None, "lists 799 images; the vtab protocol expects 800 for train800")
    # train800val200 no longer equals train800 + val200 either.
    assert found(report, vtab_root / "svhn/train800val200.txt", None, "is not the union of train800 and val200")


@pytest.mark.parametrize("folder, task, classes, official", [("cifar", "cifar100", 100, 10_000),
                                                               ("svhn", "svhn", 10, 26_032), ("kitti", "kitti", 4, 711)])
def test_official_test_sizes_are_checked(tmp_path, monkeypatch, folder, task, classes, official):
    monkeypatch.undo()  # the official sizes of every task, svhn's included
    write_vtab_task(tmp_path / folder, classes)
    report = verify_benchmark(tmp_path, "vtab", tasks=task, check_images=False)
    assert [p.message.split(";")[0] for p in report.problems] == ["lists 6 images"]
    assert f"expects {official} for test of '{task}'" in report.problems[0].message


def test_the_vtab_test_sizes_are_the_benchmarks():
    """Pinned by google-research/task_adaptation's data tests; 387,904 test images in all."""
    assert set(VTAB1K_TEST_SIZES) == set(VTAB_TASKS) and sum(VTAB1K_TEST_SIZES.values()) == 387_904


@pytest.mark.parametrize("payload, why", [(b"not an image at all", "cannot identify image file"),
                                          ("truncate", "truncated")])
def test_unreadable_or_truncated_image(vtab_root, payload, why):
    image = vtab_root / "svhn/images/test/000002.png"
    if payload == "truncate":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(image)
        payload = image.read_bytes()[:-40]
    image.write_bytes(payload)
    report = verify_benchmark(vtab_root, "vtab")
    [problem] = report.problems
    assert problem.file == str(vtab_root / "svhn/test.txt") and problem.line == 3
    assert f"cannot read image {image}" in problem.message and why in problem.message
    # Without decoding, the image is not opened, so the folder passes.
    assert verify_benchmark(vtab_root, "vtab", check_images=False).problems == []


def test_missing_image_named_at_every_line_listing_it(vtab_root):
    (vtab_root / "svhn/images/val200/000005.png").unlink()
    report = verify_benchmark(vtab_root, "vtab", check_images=False)
    assert found(report, vtab_root / "svhn/val200.txt", 6, "images/val200/000005.png does not exist")
    assert found(report, vtab_root / "svhn/train800val200.txt", 806, "images/val200/000005.png does not exist")
    assert len(report.problems) == 2


def test_image_in_train_and_test_by_path_and_by_content(vtab_root):
    test_file = vtab_root / "svhn/test.txt"
    rewrite_line(test_file, 1, "images/train800/000010.png 0")
    # Same bytes as train800 image 11 under a test name.
    shutil.copyfile(vtab_root / "svhn/images/train800/000011.png", vtab_root / "svhn/images/test/000005.png")
    report = verify_benchmark(vtab_root, "vtab")
    by_path = found(report, test_file, 1, "of test is also in train800")
    assert by_path and f"{vtab_root / 'svhn/train800.txt'}:11" in by_path[0].message
    by_content = found(report, test_file, 6, "of test has the same content")
    assert by_content and f"{vtab_root / 'svhn/train800.txt'}:12" in by_content[0].message
    # Reported against train800 and against train800val200 (it lists the same images): four problems.
    assert len(report.problems) == 4
    # Path overlap needs no decoding; content overlap does.
    assert len(verify_benchmark(vtab_root, "vtab", check_images=False).problems) == 2


def test_several_defects_all_reported_in_one_run(vtab_root):
    (vtab_root / "svhn/train800val200.txt").unlink()
    rewrite_line(vtab_root / "svhn/val200.txt", 3, "broken")
    rewrite_line(vtab_root / "svhn/test.txt", 2, "images/test/000001.png 99")
    (vtab_root / "svhn/images/test/000003.png").write_bytes(b"garbage")
    (vtab_root / "svhn/images/train800/000100.png").unlink()
    rewrite_line(vtab_root / "svhn/test.txt", 5, "images/train800/000000.png 0")
    report = verify_benchmark(vtab_root, "vtab")
    where = sorted((p.file.rsplit("/", 1)[1], p.line or 0) for p in report.problems)
    assert where == [("test.txt", 2), ("test.txt", 4), ("test.txt", 5), ("train800.txt", 101),
                     ("train800val200.txt", 0), ("val200.txt", 3)]
    assert all(isinstance(p, Problem) and p.message for p in report.problems)


# ------------------------------------------------------------------------------------------------ FGVC


@pytest.fixture
def small_dogs(monkeypatch):
    monkeypatch.setitem(FGVC_TASKS, "stanford_dogs", dataclasses.replace(FGVC_TASKS["stanford_dogs"], num_classes=3))


def write_fgvc(task_dir, image_dir, splits):
    index = 0
    for split, table in splits.items():
        for rel in table:
            write_unique_image(task_dir / image_dir / rel, index)
            index += 1
        (task_dir / f"{split}.json").write_text(json.dumps(table, indent=0))


def test_fgvc_clean_and_defects(tmp_path, small_dogs):
    dogs = tmp_path / "StanfordDogs"
    write_fgvc(dogs, "Images", {"train": {"n1/a.jpg": 42, "n2/b.jpg": 10}, "val": {"n1/c.jpg": 42},
                                "test": {"n3/d.jpg": 3, "n2/e.jpg": 10}})
    report = verify_benchmark(tmp_path, "fgvc")
    assert report.problems == []
    splits = report.manifest["tasks"]["stanford_dogs"]["splits"]
    assert splits["train"]["class_counts"] == [0, 1, 1] and splits["test"]["class_counts"] == [1, 1, 0]
    # Defects: a string class id (line 3 of the indented JSON), a test key that is a train image, a missing image.
    (dogs / "val.json").write_text('{\n"n1/c.jpg": 42,\n"n1/x.jpg": "7"\n}')
    (dogs / "test.json").write_text('{\n"n3/d.jpg": 3,\n"n1/a.jpg": 42,\n"n4/gone.jpg": 10\n}')
    report = verify_benchmark(tmp_path, "fgvc")
    assert found(report, dogs / "val.json", 3, "key 'n1/x.jpg' has class id '7' (str)")
    assert found(report, dogs / "test.json", 3, "of test is also in train")
    assert found(report, dogs / "test.json", 4, "n4/gone.jpg does not exist")
    assert len(report.problems) == 3


def test_fgvc_class_count_bad_json_missing_split_and_cub_sizes(tmp_path, small_dogs):
    write_fgvc(tmp_path / "dogs", "Images", {"train": {"a.jpg": 1}, "test": {"b.jpg": 2}})
    (tmp_path / "dogs/val.json").write_text('{"c.jpg": 1,')
    write_fgvc(tmp_path / "cub", "images", {"train": {"a.jpg": 1}, "val": {"b.jpg": 1}})
    report = verify_benchmark(tmp_path, "fgvc", check_images=False)
    assert found(report, tmp_path / "dogs/val.json", 1, "not valid JSON")
    assert found(report, ", ".join(str(tmp_path / f"dogs/{s}.json") for s in ("train", "val", "test")), None,
                 "together hold 2 distinct class ids but 'stanford_dogs' has 3 classes")
    assert found(report, tmp_path / "cub/test.json", None, "split file does not exist")
    assert found(report, tmp_path / "cub/train.json", None, "lists 1 images; the VPT split of 'cub' has 5394")
    assert found(report, tmp_path / "cub/val.json", None, "lists 1 images; the VPT split of 'cub' has 600")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_exit_codes_and_manifest(vtab_root, tmp_path, capsys):
    assert main(["verify", str(vtab_root), "--benchmark", "vtab", "--no-images"]) == 0
    written = json.loads((vtab_root / MANIFEST_NAME).read_text())
    assert written["tasks"]["svhn"]["splits"]["val200"]["images"] == 200 and len(written["manifest_sha256"]) == 64
    assert "vtab: clean; 1 task(s), 1006 images" in capsys.readouterr().out

    rewrite_line(vtab_root / "svhn/test.txt", 1, "bad")
    (vtab_root / "svhn/images/test/000001.png").unlink()
    out_file = tmp_path / "m.json"
    assert main(["verify", str(vtab_root), "--benchmark", "vtab", "--tasks", "svhn", "--manifest", str(out_file)]) == 1
    out = capsys.readouterr().out
    assert f"{vtab_root / 'svhn/test.txt'}:1: malformed line 'bad'" in out
    assert f"{vtab_root / 'svhn/test.txt'}:2: image {vtab_root / 'svhn/images/test/000001.png'} does not exist" in out
    assert "2 problem(s) found" in out and json.loads(out_file.read_text())["problem_count"] == 2

    assert main(["verify", str(vtab_root), "--benchmark", "imagenet"]) == 2
    assert main(["verify", str(vtab_root), "--benchmark", "vtab", "--tasks", "cifar1000"]) == 2
    assert main(["verify", str(tmp_path / "nowhere"), "--benchmark", "fgvc"]) == 2
    assert main(["verify", "--benchmark", "vtab"]) == 2
    assert main(["verify", str(vtab_root), "--benchmark", "vtab", "--manifest", str(tmp_path / "no/dir/m.json")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'imagenet'" in err and "no task 'cifar1000'" in err
    assert "nowhere does not exist" in err and "ROOT is required" in err and "pass --manifest PATH" in err


def test_cli_mini_vtab_defaults_to_the_generated_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path))
    root = procedural.default_data_root()
    procedural.generate_mini_vtab(root, split_sizes={"train800": 7, "val200": 7, "test": 7})
    assert main(["verify", "--benchmark", "mini-vtab", "--manifest", str(tmp_path / "m.json")]) == 0
    assert "mini-vtab: clean; 7 task(s), 147 images" in capsys.readouterr().out
    shutil.rmtree(root / "cells")
    assert main(["verify", "--benchmark", "mini-vtab", "--manifest", str(tmp_path / "m.json")]) == 1
    assert f"{root / 'cells'}: no folder for task 'cells' under data root {root}" in capsys.readouterr().out
    with pytest.raises(DatasetError, match="generate_mini_vtab"):
        verify_benchmark(tmp_path / "absent", "mini-vtab")
