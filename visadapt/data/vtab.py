"""VTAB-1k (and the procedural mini-VTAB) in the NOAH image-list layout.

On disk, as written by NOAH's ``data/vtab-source/get_vtab1k.py`` and by
:func:`visadapt.data.procedural.generate_mini_vtab`::

    <root>/<task>/
        images/...                                   the images (JPEG for VTAB-1k, PNG for mini-VTAB)
        train800.txt  val200.txt  train800val200.txt  test.txt

Every line of a split file is ``<relative image path> <integer label>``, the path relative to
``<root>/<task>/``. A listed path must stay inside the data root (:func:`confined_image_path`): an absolute
path or one whose ``..`` climbs out of ``<root>`` is an error naming the split file and line. Task folders are found under any of the task's names (``cifar`` or ``cifar100``, ...),
because the repositories that dump VTAB-1k disagree on them.

:class:`ImageListDataset` is also the dataset type of the FGVC loader (:mod:`visadapt.data.fgvc`).
"""
from __future__ import annotations

import difflib
import os
import re
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from visadapt.data.errors import DatasetError
from visadapt.data.tasks import TaskInfo, resolve_task

SPLITS = ("train800", "val200", "train800val200", "test")
IMAGE_LIST_BENCHMARKS = ("vtab", "mini-vtab")
# How many missing images a report lists before summarising the rest as a count.
_MISSING_SHOWN = 5
_LABEL = re.compile(r"[+-]?\d+")
# Bounds on a split file, checked before and while it is read (a split file is untrusted text: a crafted or
# broken one must not make the loader read gigabytes into memory). VTAB-1k's largest split lists ~26 k lines of
# ~40 bytes; these allow a 10-million-image split with paths of ~100 bytes, and any real path (PATH_MAX is 4096).
MAX_SPLIT_FILE_BYTES = 2**30
MAX_SPLIT_LINES = 10_000_000
MAX_SPLIT_LINE_BYTES = 64 * 2**10


class ImageListDataset(Dataset):
    """Images on disk with integer labels; item ``i`` is ``(transform(RGB PIL image), label)``.

    Attributes:
        samples: ``[(absolute image path, label)]`` with labels in ``[0, num_classes)``.
        targets: the labels alone, in sample order (what samplers and class-balance code look at).
        num_classes: the task's class count (from the task table, not inferred from the labels seen).
        origins: for each sample, where it was listed (``"<split file>:<line>"`` or ``"<json> key '<k>'"``),
            so that an unreadable image is reported together with the entry that names it.
        transform: applied to the PIL image; ``None`` returns the PIL image itself.
        name: a short description such as ``"cifar100/train800val200"`` (for messages and ``repr``).
    """

    def __init__(self, samples: list[tuple[Path, int]], num_classes: int, origins: list[str],
                 transform: Callable | None = None, name: str = ""):
        if len(samples) != len(origins):
            raise ValueError(f"{len(samples)} samples but {len(origins)} origins; give one origin per sample")
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.num_classes = num_classes
        self.origins = origins
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = decode_rgb(path, self.origins[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def __repr__(self) -> str:
        return f"ImageListDataset({self.name!r}, {len(self)} images, {self.num_classes} classes)"

    def check_files(self, fix: str) -> None:
        """Raise :class:`DatasetError` listing the first few samples whose image file does not exist.

        ``fix`` is appended to the message (how to obtain the missing images for this benchmark).
        """
        missing = [i for i, (path, _) in enumerate(self.samples) if not path.is_file()]
        if not missing:
            return
        shown = "\n".join(f"  {self.origins[i]}: {self.samples[i][0]}" for i in missing[:_MISSING_SHOWN])
        more = f"\n  ... and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
        raise DatasetError(
            f"{len(missing)} of {len(self)} images listed for {self.name} do not exist:\n{shown}{more}\n{fix}"
        )


def _decode_failure(path: Path, err: BaseException, fix: str = "") -> str:
    """Why ``path`` could not be decoded, with the fix, for :class:`DatasetError` messages."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"{err} PIL refuses images above PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels "
                "(a small file that decodes to a huge image is a decompression bomb). Replace the file or remove "
                "its entry; if the image is genuinely this large, raise PIL.Image.MAX_IMAGE_PIXELS")
    return (f"{type(err).__name__}: {err}. The file is corrupt, truncated or not an image; "
            f"{fix or 'replace it or remove its line from the split file'}")


def decode_image(path: Path, where: str, mode: str | None = "RGB", fix: str = "") -> Image.Image:
    """The image at ``path`` fully decoded (converted to ``mode``; ``None`` keeps the stored mode); every
    failure is a :class:`DatasetError` naming ``path`` and ``where`` (e.g. ``"listed at <split file>:<line>"``),
    with ``fix`` (how to replace the file) in the message.

    Every image the data loaders read goes through here. PIL's ``DecompressionBombWarning`` (more than
    ``Image.MAX_IMAGE_PIXELS`` pixels) is an error, as its ``DecompressionBombError`` (twice that) is: a
    training set has no business holding such images, and the warning would let a few-KB file allocate
    hundreds of MB per item.
    """
    try:
        # catch_warnings: the filter applies to this decode only and is restored afterwards. It is process-wide
        # state, so the size is also checked by hand below (threads decoding at once may restore each other's
        # filters); the filter keeps PIL's own warning from being printed before our error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as raw:
                limit = Image.MAX_IMAGE_PIXELS
                if limit and raw.width * raw.height > limit:
                    raise Image.DecompressionBombError(
                        f"Image size ({raw.width * raw.height} pixels, {raw.width}x{raw.height}) exceeds limit "
                        f"of {limit} pixels, could be decompression bomb DOS attack.")
                # convert() / copy() force the full decode, so truncated files fail here, not in a transform.
                img = raw.convert(mode) if mode else raw.copy()
        if img.width < 1 or img.height < 1:
            raise ValueError(f"the image is {img.width}x{img.height} pixels")
    # Any exception out of PIL's decoders means the file is bad: they raise OSError, SyntaxError and ValueError,
    # but also EOFError, struct.error, IndexError, ... on crafted input. Only the file is read in this block.
    except Exception as err:
        raise DatasetError(f"cannot read image {path} ({where}): {_decode_failure(path, err, fix)}") from err
    return img


def decode_rgb(path: Path, origin: str) -> Image.Image:
    """:func:`decode_image` of an image listed at ``origin`` (``"<split file>:<line>"``), as RGB."""
    return decode_image(path, f"listed at {origin}")


def confined_image_path(root: Path, base: Path, listed: str) -> Path:
    """``base / listed`` if that stays inside the data root ``root``, else :class:`ValueError` saying why.

    The rule is lexical (``..`` is resolved by name, as the OS would resolve it without symlinks): an absolute
    path, a path with a NUL byte or one whose ``..`` components climb above ``root`` is refused. Symlinks
    inside the data root are followed, not checked: they are placed by whoever owns the folder (a dataset
    linked in from another disk; a ``huggingface_hub`` snapshot, whose files all link into its ``blobs/``
    folder outside the snapshot), whereas a split file is text that travels with a download.
    """
    if "\x00" in listed:
        raise ValueError("contains a NUL byte")
    if os.path.isabs(listed):
        raise ValueError("is an absolute path")
    top = os.path.normpath(os.path.abspath(root))
    candidate = os.path.normpath(os.path.join(os.path.abspath(base), listed))
    if os.path.commonpath([top, candidate]) != top:
        raise ValueError(f"climbs out of the data root {root} (to {candidate})")
    return base / listed


def find_task_dir(root: str | os.PathLike, info: TaskInfo) -> Path:
    """The folder of task ``info`` under ``root``: the first of ``info.names`` that exists.

    Names are tried exactly first, then case-insensitively against what ``root`` holds (``NABirds`` vs
    ``nabirds``). The error names ``root``, the names tried, the folders ``root`` does contain and the
    closest of them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a directory; pass the folder that "
                           f"holds the task folders ({', '.join(info.names)}, ...)")
    for name in info.names:
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    by_lower = {p.lower(): p for p in present}
    for name in info.names:
        if name.lower() in by_lower:
            return root / by_lower[name.lower()]
    close = sorted({c for name in info.names for c in difflib.get_close_matches(name, present, n=3, cutoff=0.6)})
    listing = ", ".join(present[:30]) + (f", ... ({len(present)} in all)" if len(present) > 30 else "")
    msg = (f"no folder for task {info.name!r} under data root {root}; tried {', '.join(info.names)}. "
           f"{root} contains: {listing or 'no folders'}")
    if close:
        msg += f". Close matches: {', '.join(close)} (rename the folder to one of the names tried)"
    if any((root / f"{split}.txt").is_file() for split in SPLITS) or (root / "train.json").is_file():
        msg += f". {root} looks like a task folder itself: pass its parent as the data root"
    elif "vtab-1k" in present:
        msg += f". The tasks may be in {root / 'vtab-1k'}: pass that as the data root"
    raise DatasetError(msg)


def _layout_fix(benchmark: str, task_dir: Path) -> str:
    if benchmark == "mini-vtab":
        return (f"Re-create the folder with visadapt.data.procedural.generate_mini_vtab(root) "
                f"(it rewrites {task_dir.name}/ completely)")
    return (f"Re-create {task_dir} with NOAH's data/vtab-source/get_vtab1k.py, or restore the missing files; "
            f"image paths in a split file are relative to {task_dir}")


class _SplitFileRefused(Exception):
    """A split file that is not read (to the end): not a regular file, over a bound, or not UTF-8."""

    def __init__(self, lineno: int | None, message: str):
        super().__init__(message)
        self.lineno = lineno


def _split_file_lines(list_file: Path):
    """Yield ``(line number, line)`` of ``list_file``, as ``str.splitlines`` numbers them, streamed.

    Refused (:class:`_SplitFileRefused`) before anything is read: a path that is not a regular file (a FIFO would
    block the reader forever, ``/dev/zero`` never ends) and a file above ``MAX_SPLIT_FILE_BYTES``. Refused while
    reading: a line above ``MAX_SPLIT_LINE_BYTES`` (read at most that far), more than ``MAX_SPLIT_LINES`` lines
    or ``MAX_SPLIT_FILE_BYTES`` bytes (a file growing while read), invalid UTF-8.
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; it does nothing on a regular file.
    try:
        fd = os.open(list_file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise _SplitFileRefused(None, f"cannot be opened ({err.strerror or err}); a split file must be a "
                                      "readable text file") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SPLIT_FILE_BYTES:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _SplitFileRefused(None, "is not a regular file (a directory, FIFO, socket or device, possibly "
                                          "behind a symlink); a split file must be a text file. Replace it")
        raise _SplitFileRefused(None, f"is {info.st_size} bytes, above the bound of {MAX_SPLIT_FILE_BYTES} bytes "
                                      "for a split file (visadapt.data.vtab.MAX_SPLIT_FILE_BYTES); it was not "
                                      "read. The file is damaged or not a split file: re-create it")
    with os.fdopen(fd, "rb") as f:
        lineno = 0
        read = 0
        while True:
            raw = f.readline(MAX_SPLIT_LINE_BYTES + 1)
            if not raw:
                return
            read += len(raw)
            if len(raw) > MAX_SPLIT_LINE_BYTES:
                raise _SplitFileRefused(lineno + 1, f"line longer than {MAX_SPLIT_LINE_BYTES} bytes, the bound for "
                                                    "a split-file line (visadapt.data.vtab.MAX_SPLIT_LINE_BYTES); "
                                                    "the file was not read further. Re-create the split file")
            if read > MAX_SPLIT_FILE_BYTES:
                raise _SplitFileRefused(None, f"grew past the bound of {MAX_SPLIT_FILE_BYTES} bytes while being "
                                              "read (visadapt.data.vtab.MAX_SPLIT_FILE_BYTES); another process is "
                                              "writing it. Re-create the split file")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _SplitFileRefused(lineno + 1, f"is not a UTF-8 text file ({err}); a split file holds lines "
                                                    "'<relative image path> <integer label>'") from None
            # Split on b"\n" first, then as str.splitlines does ("\r", "\u2028", ...): the same line numbers as
            # splitlines() over the whole text ("\r\n" never straddles two pieces, as "\n" ends a piece).
            for line in text.splitlines():
                lineno += 1
                if lineno > MAX_SPLIT_LINES:
                    raise _SplitFileRefused(None, f"has more than {MAX_SPLIT_LINES} lines, the bound for a split "
                                                  "file (visadapt.data.vtab.MAX_SPLIT_LINES); it was not read "
                                                  "further. The file is damaged or not a split file: re-create it")
                yield lineno, line


def read_image_list(list_file: Path, base: Path, info: TaskInfo,
                    problems: list[tuple[Path, int | None, str]] | None = None,
                    root: Path | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Parse one split file into ``(samples, origins)``; paths are joined to ``base``.

    Each non-blank line is split on its LAST whitespace, so image paths may contain spaces. Labels must be
    integers in ``[0, info.num_classes)``. Paths must stay inside ``root`` (the data root; default
    ``base.parent``, the folder holding the task folder), see :func:`confined_image_path`. The file is streamed
    line by line and must be a regular file within ``MAX_SPLIT_FILE_BYTES`` bytes, ``MAX_SPLIT_LINES`` lines of
    at most ``MAX_SPLIT_LINE_BYTES`` bytes each (checked before and while reading, never after reading it all).

    ``problems``: ``None`` raises :class:`DatasetError` at the first bad line (what the loaders want). A list
    collects every defect as ``(list_file, line number or None, message)`` and skips the bad lines instead,
    so that ``visadapt-data verify`` reports them all in one run. A file refused as a whole (not a regular file,
    over a bound, not UTF-8) is one defect, and none of its lines are returned.
    """
    def bad(lineno: int | None, message: str) -> None:
        if problems is None:
            raise DatasetError(f"{list_file}:{lineno}: {message}" if lineno else f"{list_file} {message}")
        problems.append((list_file, lineno, message))

    root = base.parent if root is None else root
    samples: list[tuple[Path, int]] = []
    origins: list[str] = []
    try:
        for lineno, line in _split_file_lines(list_file):
            stripped = line.strip()
            if not stripped:
                continue
            parts = stripped.rsplit(None, 1)
            if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
                bad(lineno, f"malformed line {line!r}; expected "
                            "'<relative image path> <integer label>' (e.g. 'images/test/000000.jpg 3')")
                continue
            label = int(parts[1])
            if not 0 <= label < info.num_classes:
                bad(lineno, f"label {label} is outside [0, {info.num_classes}) for task {info.name!r} "
                            f"({info.num_classes} classes); the file belongs to another task or its labels are "
                            "not 0-based")
                continue
            try:
                path = confined_image_path(root, base, parts[0])
            except ValueError as err:
                bad(lineno, f"image path {parts[0]!r} {err}; a split file may only list paths relative to the "
                            f"task folder {base} that stay inside the data root. Fix the line or remove it")
                continue
            samples.append((path, label))
            origins.append(f"{list_file}:{lineno}")
    except _SplitFileRefused as err:
        bad(err.lineno, str(err))
        return [], []
    if not samples and not any(p[0] == list_file and p[1] for p in problems or ()):
        bad(None, "lists no images; every line should be '<relative image path> <integer label>'. "
                  "Re-create the split file")
    return samples, origins


def load_split(root: str | os.PathLike, benchmark: str, task: str, split_name: str,
               transform: Callable | None = None) -> ImageListDataset:
    """One split of a VTAB-1k or mini-VTAB task as an :class:`ImageListDataset`.

    Args:
        root: the folder holding the task folders (``<root>/<task>/train800.txt``, ...).
        benchmark: ``vtab`` or ``mini-vtab`` (decides the task table: names, aliases, class counts).
        task: task name or alias, e.g. ``cifar100`` or ``cifar``.
        split_name: one of ``train800``, ``val200``, ``train800val200``, ``test``.
        transform: applied to each RGB PIL image.

    Every listed image is checked to exist here, so a broken folder fails before training starts.
    """
    if benchmark not in IMAGE_LIST_BENCHMARKS:
        hint = "; FGVC uses visadapt.data.fgvc.load_split" if benchmark == "fgvc" else ""
        raise DatasetError(f"benchmark {benchmark!r} is not stored as image lists; "
                           f"choose one of {', '.join(IMAGE_LIST_BENCHMARKS)}{hint}")
    if split_name not in SPLITS:
        raise DatasetError(f"unknown VTAB split {split_name!r}; choose one of {', '.join(SPLITS)}")
    info = resolve_task(benchmark, task)
    task_dir = find_task_dir(root, info)
    list_file = task_dir / f"{split_name}.txt"
    # exists(), not is_file(): a FIFO or device under the name is reported as such by read_image_list.
    if not list_file.exists():
        found = sorted(p.name for p in task_dir.glob("*.txt"))
        raise DatasetError(
            f"split file {list_file} does not exist (found: {', '.join(found) or 'no .txt files'}); expected "
            f"the NOAH VTAB-1k layout {task_dir}/{{{','.join(SPLITS)}}}.txt with lines "
            f"'<relative image path> <integer label>'. {_layout_fix(benchmark, task_dir)}"
        )
    samples, origins = read_image_list(list_file, task_dir, info, root=Path(root))
    dataset = ImageListDataset(samples, info.num_classes, origins, transform, name=f"{info.name}/{split_name}")
    dataset.check_files(_layout_fix(benchmark, task_dir))
    return dataset
