"""Decoded-image cache: each split is decoded once into a uint8 file, then served from it.

VTAB-1k's protocol resizes without random augmentation, so the pixels a model sees are the same every epoch;
decoding JPEGs every epoch (about 2,600 imgs/s on 16 cores) starves a GPU that trains at 3,000-4,000 imgs/s.
Here every image of a split is decoded once, passed through exactly the PIL steps the decode path applies
before ``ToTensor`` (:func:`visadapt.data.transforms.vtab_transform` / ``fgvc_transforms``), and stored as
``uint8`` ``(3, H, W)``; the ``/255`` and the normalisation run on the device (:mod:`visadapt.data.device`).

FGVC training takes a random crop and flip: its cache stores the shorter-side resize (ragged: each image keeps
its own height and width), the crop is a slice of the cached array in ``__getitem__`` (no decode, no
resampling; it draws the same torch RNG numbers as torchvision's ``RandomCrop``), the flip runs on the device.

File format (one file per split, ``<split>.<kind><size>.<key16>.vcache``)::

    [uint8 data: images back to back, each (3, H, W) C-contiguous]
    [header: UTF-8 JSON]  [8 bytes: header length, little-endian]  [8 bytes: magic b"VADCACH1"]

The header is written last and the file is renamed into place atomically, so a reader sees either no file or
a complete one, and two processes building the same cache both end with a valid file (identical bytes).
The header holds the key, the image count, the shapes, the labels and a CRC-32 per image; all of it is
checked on open (CRC-32 runs at ~3-4 GB/s per core, ~140x faster than decoding the same pixels, and runs of
images are checked in parallel threads). A file that fails a check is reported with one warning line on the
``visadapt`` logger and rebuilt, never used. Each item's CRC-32 is checked again every time it is read, so
bytes rewritten in place by another process after the open are an error, never wrong pixels.

A dataset serves the file it checked through the descriptor it opened (``os.pread`` per item, no memory map;
where ``os.pread`` is missing, as on Windows, ``lseek`` + ``read`` under a lock, one descriptor per process):
the file may be deleted or replaced while a run uses it, and a file cut short or rewritten in place by another
process is a :class:`DatasetError` naming it, never a SIGBUS or wrong pixels (see :class:`CachedImageDataset`).

The key is a SHA-256 over: the format version; the content of the split files (VTAB: the split's ``.txt``;
FGVC: every split ``.json`` present, since together they define the class-id map); the PIL steps (their
``repr``: resize size, interpolation, crop); and each image's relative path, label, size and mtime (one
``stat`` per image, as the loaders' existence check already does), so that images replaced in place also
rebuild the cache. For a cache kept outside the data (``cache_dir``) the task folder's absolute path is part
of the key too, so two data roots never share a cache file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import stat
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from visadapt.data import fgvc, vtab
from visadapt.data.device import DeviceTransform
from visadapt.data.errors import DatasetError
from visadapt.data.tasks import resolve_task
from visadapt.data.transforms import fgvc_transforms, resolve_normalization, vtab_transform
from visadapt.data.vtab import ImageListDataset, find_task_dir
from visadapt.progress import Progress

__all__ = ["CACHE_DIRNAME", "FORMAT_VERSION", "CacheSpec", "CachedImageDataset", "default_workers",
           "load_cached_split"]

logger = logging.getLogger("visadapt")

# Bump when the file layout or the meaning of a header field changes: old files then get a new key.
# 2: one CRC-32 per image (checked on every read) instead of one per 16 MiB chunk.
FORMAT_VERSION = 2
CACHE_DIRNAME = ".visadapt_cache"
SUFFIX = ".vcache"
_MAGIC = b"VADCACH1"
_TRAILER = struct.Struct("<Q8s")
# Bytes of consecutive images one checking thread reads at once (one pread, then a CRC-32 per image).
CHUNK_BYTES = 16 * 2**20
# Images per task handed to one decode worker; a pool is only worth starting above a few chunks.
_DECODE_CHUNK = 32
# A temporary file not written to for this long belongs to a build that died; it is removed.
_ABANDONED_SECONDS = 3600
KINDS = ("vtab", "fgvc-eval", "fgvc-train")


class _Corrupt(Exception):
    """A cache file failed a check; the message says which (it goes into the one warning line)."""


def default_workers() -> int:
    """Decode processes for a cache build: the CPUs this process may run on, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Which pixels a cache holds.

    ``kind``: ``vtab`` (square bicubic resize to ``input_size``), ``fgvc-eval`` (shorter-side bicubic resize
    to ``round(input_size * 256/224)`` then centre crop ``input_size``: square) or ``fgvc-train`` (the
    shorter-side resize alone, ragged; ``__getitem__`` crops ``input_size``).
    """

    kind: str
    input_size: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown cache kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not isinstance(self.input_size, int) or self.input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {self.input_size!r}")

    @property
    def ragged(self) -> bool:
        return self.kind == "fgvc-train"

    def pixel_steps(self) -> list:
        """The torchvision steps of the decode path that the cache applies before storing (PIL in, PIL out).

        Taken from :mod:`visadapt.data.transforms` itself, so the cached pixels follow any change there; the
        steps left out are checked to be exactly the ones this module re-implements (``ToTensor``, and for
        ``fgvc-train`` ``RandomCrop(input_size)`` + ``RandomHorizontalFlip(0.5)``), else this raises.
        """
        if self.kind == "vtab":
            steps = list(vtab_transform(self.input_size).transforms)
            stored, rest = steps[:-1], steps[-1:]
            expected = ["ToTensor()"]
        else:
            train, evaluate = fgvc_transforms(self.input_size)
            if self.kind == "fgvc-eval":
                steps = list(evaluate.transforms)
                stored, rest = steps[:-1], steps[-1:]
                expected = ["ToTensor()"]
            else:
                steps = list(train.transforms)
                stored, rest = steps[:1], steps[1:]
                expected = [f"RandomCrop(size=({self.input_size}, {self.input_size}), padding=None)",
                            "RandomHorizontalFlip(p=0.5)", "ToTensor()"]
        if [repr(s) for s in rest] != expected:
            raise RuntimeError(f"the {self.kind} transforms in visadapt.data.transforms end with "
                               f"{[repr(s) for s in rest]}, but the decoded-image cache re-implements "
                               f"{expected}; "
                               "update visadapt.data.cache together with visadapt.data.transforms")
        return stored


# ------------------------------------------------------------------------------------------------- dataset


class CachedImageDataset(Dataset):
    """A split served from its decoded-image cache; item ``i`` is ``(uint8 tensor (3, H, W), label)``.

    Same ``samples``, ``targets``, ``num_classes``, ``origins`` and ``name`` as the decode path's
    :class:`ImageListDataset`, in the same order. Pixels are the ``uint8`` values the decode path feeds
    to ``ToTensor``; ``device_transform`` (a :class:`~visadapt.data.device.DeviceTransform`) turns a batch of
    them on the device into the float tensors the decode path yields (bit-identical on the CPU).
    For ``fgvc-train`` caches ``H = W = input_size``: a random crop of the stored shorter-side resize, drawn
    as torchvision's ``RandomCrop.get_params`` draws it (``torch.randint`` for the row, then the column).

    The dataset holds the cache file open (the descriptor the checks ran on) and reads each item with
    ``os.pread``, never through a memory map:

    * deleting or replacing the file while the dataset lives changes nothing: the open descriptor keeps the
      checked file readable (POSIX), in this process and in DataLoader workers, which inherit it (fork) or
      receive a duplicate of it (spawn / forkserver: multiprocessing passes descriptors to the child);
    * a file cut short by another process gives a :class:`DatasetError` naming the file and the bytes that
      are missing, where a mapped file would kill the process with SIGBUS;
    * bytes rewritten in place by another process (same size) are caught on read: every item's CRC-32 is
      checked on open, and each read is followed by one ``fstat`` of the descriptor whose size and modification
      time must still be those the check saw, so a write after (or racing) the check is a :class:`DatasetError`
      naming the file and the item, never wrong pixels. One ``fstat`` per item costs about a microsecond; a CRC
      per read cost 37 us for a 224 px image and 40-60% of the uint8 loader throughput. Not caught: a writer
      that sets the modification time back (``os.utime``) on purpose, and, on kernels older than Linux 6.13
      (no fine-grained timestamps after a ``stat``), a write within a clock tick of the open check.

    A copy made by plain ``pickle`` (not by a multiprocessing start) carries the path only and reopens it by
    name (checking its size and modification time), so it needs the file to exist.

    Attributes (besides those above): ``cache_path`` (the file), ``spec`` (:class:`CacheSpec`),
    ``device_transform``.
    """

    def __init__(self, fd: int, path: Path, header: dict, source: ImageListDataset, spec: CacheSpec,
                 normalization=None):
        self.samples = source.samples
        self.targets = source.targets
        self.num_classes = source.num_classes
        self.origins = source.origins
        self.name = source.name
        self.cache_path = Path(path)
        self.spec = spec
        self.device_transform = DeviceTransform(normalization, flip=spec.kind == "fgvc-train")
        self._data_bytes = int(header["data_bytes"])
        self._content_stamp = tuple(header["content_stamp"])  # (size, mtime ns) when checked: _content_stamp
        self._file_bytes = self._content_stamp[0]
        if spec.ragged:
            self._shapes = np.asarray(header["shapes"], dtype=np.int64).reshape(-1, 2)
        else:
            self._shapes = np.tile(np.asarray(header["item_shape"][1:], dtype=np.int64), (len(self.samples), 1))
        sizes = 3 * self._shapes[:, 0] * self._shapes[:, 1]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._fd: int | None = fd
        self._fd_pid = os.getpid()  # the process the descriptor's file position belongs to (seek fallback)

    # The descriptor: inherited by forked workers as is; duplicated into spawned ones by multiprocessing.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        from multiprocessing import context, reduction

        # Without pread a descriptor's position is shared with the child: it reopens by name instead.
        if self._fd is not None and context.get_spawning_popen() is not None and hasattr(os, "pread"):
            state["_fd"] = reduction.DupFd(self._fd)  # the child gets the same open file, deleted or not
        else:
            state["_fd"] = None  # plain pickle: reopened by path on first use
        return state

    def __setstate__(self, state: dict) -> None:
        handle = state.pop("_fd")
        self.__dict__.update(state)
        self._fd = handle.detach() if handle is not None else None

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _descriptor(self) -> int:
        if self._fd is not None and not hasattr(os, "pread") and self._fd_pid != os.getpid():
            # Seek fallback in a forked child: the inherited descriptor shares its file position with the
            # parent and the other workers, so this process reads through a descriptor of its own.
            self._fd = None
        if self._fd is None:
            try:
                fd = os.open(self.cache_path, _READ_FLAGS)
            except FileNotFoundError:
                raise DatasetError(
                    f"decoded-image cache {self.cache_path} of {self.name} was deleted, and this copy of the "
                    "dataset was pickled without its open file (plain pickle, not a DataLoader worker start), "
                    "so it can only reopen the file by name. Load the split again (build_datasets / "
                    "load_cached_split rebuild a missing cache)") from None
            if _content_stamp(os.fstat(fd)) != self._content_stamp:
                os.close(fd)
                raise DatasetError(
                    f"decoded-image cache {self.cache_path} of {self.name} is not the file this dataset was "
                    f"opened on (size or modification time changed; size {os.path.getsize(self.cache_path)}, "
                    f"expected {self._file_bytes}); load the split again to check and rebuild it")
            self._fd, self._fd_pid = fd, os.getpid()
        return self._fd

    def _read(self, index: int) -> np.ndarray:
        """The stored pixels of item ``index``: ``uint8 (3, h, w)``, read with one ``pread``."""
        h, w = (int(v) for v in self._shapes[index])
        offset, size = int(self._offsets[index]), 3 * h * w
        out = np.empty(size, dtype=np.uint8)
        got = _pread_into(self._descriptor(), out, offset)
        if got != size:
            end = os.fstat(self._descriptor()).st_size
            raise DatasetError(
                f"decoded-image cache {self.cache_path} was cut short while in use: item {index} of {self.name} "
                f"needs bytes {offset}..{offset + size}, the file now ends at byte {end} (it was "
                f"{self._file_bytes}). Another process truncated or overwrote it in place; load the split again "
                "to rebuild the cache (or keep caches where other jobs do not write: --cache-dir)")
        # Checked after the read: a write racing it has stamped the file already (the kernel updates the
        # modification time before copying the new bytes in).
        if _content_stamp(os.fstat(self._descriptor())) != self._content_stamp:
            raise DatasetError(
                f"decoded-image cache {self.cache_path} was modified while in use: item {index} of {self.name} "
                f"(bytes {offset}..{offset + size}) may no longer be the bytes checked on open: the file's "
                "size or modification time changed since. Another process wrote to the file in place. Delete "
                "the file (or load the split again, which checks and rebuilds it), and keep caches where other "
                "jobs do not write (--cache-dir)")
        return out.reshape(3, h, w)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        image = self._read(index)
        if not self.spec.ragged:
            return torch.from_numpy(image), label
        h, w = image.shape[1:]
        size = self.spec.input_size
        if h < size or w < size:
            raise DatasetError(f"cached image {index} of {self.name} is {h}x{w}, smaller than the {size}px "
                               "crop; "
                               f"the cache {self.cache_path} does not match input_size {size}: delete it")
        # As torchvision's RandomCrop.get_params: no draw if the image is the crop size, else row, column.
        top = left = 0
        if (h, w) != (size, size):
            top = int(torch.randint(0, h - size + 1, size=(1,)).item())
            left = int(torch.randint(0, w - size + 1, size=(1,)).item())
        return torch.from_numpy(np.ascontiguousarray(image[:, top:top + size, left:left + size])), label

    def check_files(self, fix: str) -> None:
        """A no-op: the cache proves it. Every listed image was opened and fully decoded when the cache was built
        (a missing or unreadable file fails the build with the decode path's error), the key holds each file's
        size and mtime as listed now, and items are served from the cache without touching the files."""

    def __repr__(self) -> str:
        return (f"CachedImageDataset({self.name!r}, {len(self)} images, {self.num_classes} classes, "
                f"{self.cache_path})")


def _pread_into(fd: int, out: np.ndarray, offset: int) -> int:
    """Read ``out.nbytes`` bytes at ``offset`` into ``out``; returns how many were read (fewer at end of file).

    ``pread`` does not move a shared file position, so DataLoader workers sharing one descriptor do not
    interfere; it returns short at the end of a truncated file instead of faulting as a mapped page would.
    """
    view = memoryview(out).cast("B")
    if not hasattr(os, "pread"):  # Windows
        return _seek_read_into(fd, view, offset)
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):  # straight into ``out``
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # macOS before 11: one extra copy
            piece = os.pread(fd, len(view) - done, offset + done)
            view[done:done + len(piece)] = piece
            got = len(piece)
        if got == 0:
            break
        done += got
    return done


# Where os.pread is missing (Windows), reads are lseek + readinto under this lock: a descriptor's position is
# shared by the threads of a process (the open-time check reads in threads). Processes never share one: a
# dataset reopens its file by name in each process there (CachedImageDataset._descriptor / __getstate__).
_SEEK_READ_LOCK = threading.Lock()
# O_BINARY: Windows opens descriptors in text mode otherwise (CRLF translation, Ctrl-Z as end of file).
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)


def _seek_read_into(fd: int, view: memoryview, offset: int) -> int:
    """:func:`_pread_into` without ``os.pread``: ``lseek`` then ``readinto`` while holding the lock."""
    done = 0
    with _SEEK_READ_LOCK, open(fd, "rb", buffering=0, closefd=False) as f:
        f.seek(offset)
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                break
            done += got
    return done


def _pread_bytes(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer at end of file), by :func:`_pread_into`."""
    out = np.empty(size, dtype=np.uint8)
    return out[:_pread_into(fd, out, offset)].tobytes()


# ------------------------------------------------------------------------------------------------- decode


def _decode_rgb(samples: list[tuple[Path, int]], origins: list[str], spec: CacheSpec) -> list[np.ndarray]:
    """Decode ``samples`` as the decode path does, apply the PIL steps; each result ``uint8 (3, H, W)``."""
    from torchvision.transforms import Compose

    # The decode path's own dataset class opens, converts and reports unreadable files; reusing it keeps the
    # pixels and the error messages identical.
    source = ImageListDataset(samples, 0, origins, Compose(spec.pixel_steps()))
    out = []
    for i in range(len(source)):
        img, _ = source[i]
        hwc = np.asarray(img, dtype=np.uint8)
        out.append(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    return out


def _decode_into(tmp: str, start: int, samples, origins, spec: CacheSpec) -> None:
    """Decode ``samples`` (a slice starting at item ``start``) and write them at their offsets in ``tmp``."""
    images = _decode_rgb(samples, origins, spec)
    item = 3 * spec.input_size * spec.input_size
    with open(tmp, "r+b") as f:
        f.seek(start * item)
        f.write(b"".join(img.tobytes() for img in images))


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork (Linux) starts workers instantly with torchvision already imported, as DataLoader workers start;
    # spawn would re-import torch in each worker (seconds) and is used only where fork does not exist.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


@contextlib.contextmanager
def _worker_deaths_reported(source: ImageListDataset, workers: int):
    """A decode worker that dies (killed, out of memory, a crash inside an image decoder) breaks the pool;
    report that as a :class:`DatasetError` naming the split and how to find the image, not as
    ``BrokenProcessPool``."""
    try:
        yield
    except BrokenProcessPool as err:
        raise DatasetError(
            f"a decode process died while building the decoded-image cache of {source.name} ({len(source)} "
            f"images, {workers} workers): it was killed, ran out of memory, or crashed inside an image decoder. "
            "No cache was written. Run visadapt-data verify on the folder to find an unreadable image, or build "
            "with one worker (cache_workers=1 / fewer --num-workers) to see the error in this process") from err


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + _DECODE_CHUNK, n)) for s in range(0, n, _DECODE_CHUNK)]


def _write_fixed(tmp: Path, source: ImageListDataset, spec: CacheSpec, workers: int, bar: Progress) -> None:
    """Square images: the file is sized up front and each worker writes its images at their own offsets."""
    n = len(source)
    with open(tmp, "wb") as f:
        f.truncate(n * 3 * spec.input_size ** 2)
    chunks = _chunks(n)
    if workers <= 1 or len(chunks) <= 2:
        for s, e in chunks:
            _decode_into(str(tmp), s, source.samples[s:e], source.origins[s:e], spec)
            bar.update(e - s)
        return
    with _worker_deaths_reported(source, workers), _pool(workers) as pool:
        futures = {pool.submit(_decode_into, str(tmp), s, source.samples[s:e], source.origins[s:e], spec): e - s
                   for s, e in chunks}
        for future, count in futures.items():  # in order: the first unreadable image is the one reported
            future.result()  # re-raises a worker's DatasetError (unreadable image) here
            bar.update(count)


def _write_ragged(tmp: Path, source: ImageListDataset, spec: CacheSpec, workers: int,
                  bar: Progress) -> list[list[int]]:
    """Images of their own sizes, in order: workers decode, this process appends; returns ``[[h, w]]``."""
    chunks = _chunks(len(source))
    shapes: list[list[int]] = []
    with open(tmp, "wb") as f:
        def append(images):
            for img in images:
                shapes.append([int(img.shape[1]), int(img.shape[2])])
                f.write(img.tobytes())
            bar.update(len(images))

        if workers <= 1 or len(chunks) <= 2:
            for s, e in chunks:
                append(_decode_rgb(source.samples[s:e], source.origins[s:e], spec))
        else:
            with _worker_deaths_reported(source, workers), _pool(workers) as pool:
                for images in pool.map(_decode_rgb, *zip(*[(source.samples[s:e], source.origins[s:e], spec)
                                                            for s, e in chunks])):
                    append(images)
    return shapes


# ------------------------------------------------------------------------------------------------ checksum


def _item_layout(header_or_shapes, count: int, spec: CacheSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, sizes)`` in bytes of the ``count`` stored images (``[[h, w]]`` shapes if ragged)."""
    if spec.ragged:
        shapes = np.asarray(header_or_shapes, dtype=np.int64).reshape(-1, 2)
        sizes = 3 * shapes[:, 0] * shapes[:, 1]
    else:
        sizes = np.full(count, 3 * spec.input_size ** 2, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if count else np.zeros(0, np.int64)
    return offsets, sizes


def _item_crcs(fd: int, offsets: np.ndarray, sizes: np.ndarray, threads: int) -> list[int]:
    """CRC-32 of each stored image of the open file ``fd`` (image ``i``: ``sizes[i]`` bytes at ``offsets[i]``).

    Runs of consecutive images of about ``CHUNK_BYTES`` are read with one ``pread`` each, in parallel threads
    (``pread`` and zlib release the GIL). Read, not mapped: a file cut meanwhile by another process gives
    :class:`_Corrupt`, not SIGBUS."""
    count = len(sizes)
    if count == 0:
        return []
    runs, first = [], 0
    ends = offsets + sizes
    while first < count:  # [first, last) of at least one image and at most ~CHUNK_BYTES (unless one is larger)
        last = max(first + 1, int(np.searchsorted(ends, offsets[first] + CHUNK_BYTES, side="right")))
        runs.append((first, last))
        first = last

    def crcs(run: tuple[int, int]) -> list[int]:
        lo, hi = run
        base = int(offsets[lo])
        piece = np.empty(int(ends[hi - 1]) - base, dtype=np.uint8)
        if _pread_into(fd, piece, base) != piece.nbytes:
            raise _Corrupt(f"the file ends inside its data, before byte {base + piece.nbytes} (truncated)")
        return [zlib.crc32(piece[int(offsets[i]) - base:int(ends[i]) - base]) for i in range(lo, hi)]

    with ThreadPoolExecutor(max(1, min(threads, len(runs)))) as pool:
        return [crc for run in pool.map(crcs, runs) for crc in run]


# --------------------------------------------------------------------------------------------- open / build


def _open_checked(path: Path, key: str, source: ImageListDataset, spec: CacheSpec,
                  threads: int) -> tuple[int, dict]:
    """``(open descriptor, header)`` of ``path`` once every check passed on that descriptor (so the file served
    is the file checked, whatever happens to the name afterwards); raises :class:`_Corrupt` naming the failed
    check, or ``FileNotFoundError`` if the file vanished."""
    fd = os.open(path, _READ_FLAGS)
    try:
        header = _check_open_file(fd, key, source, spec, threads)
    except BaseException:
        os.close(fd)
        raise
    return fd, header


def _check_open_file(fd: int, key: str, source: ImageListDataset, spec: CacheSpec, threads: int) -> dict:
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        raise _Corrupt("it is not a regular file")
    size = status.st_size
    if size < _TRAILER.size:
        raise _Corrupt(f"the file is {size} bytes, too short to hold a header (truncated)")
    header_len, magic = _TRAILER.unpack(_pread_bytes(fd, _TRAILER.size, size - _TRAILER.size))
    if magic != _MAGIC:
        raise _Corrupt("no header at the end of the file (truncated, or not written by visadapt)")
    if header_len > size - _TRAILER.size:
        raise _Corrupt(f"the header claims {header_len} bytes but the file has {size} (truncated)")
    raw = _pread_bytes(fd, header_len, size - _TRAILER.size - header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _Corrupt(f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _Corrupt("the header is not a JSON object")
    try:
        _check_header(header, key, size - _TRAILER.size - header_len, source, spec)
    except (KeyError, TypeError, ValueError) as err:
        raise _Corrupt(f"the header is malformed ({type(err).__name__}: {err})") from None
    offsets, sizes = _item_layout(header.get("shapes"), len(source), spec)
    crcs = _item_crcs(fd, offsets, sizes, threads)
    bad = [i for i, (got, want) in enumerate(zip(crcs, header["item_crc32"])) if got != want]
    if bad:
        raise _Corrupt(f"checksum mismatch in {len(bad)} of {len(crcs)} images (first: image {bad[0]}, at byte "
                       f"{int(offsets[bad[0]])}): the data was modified or damaged")
    if _content_stamp(os.fstat(fd)) != _content_stamp(status):
        raise _Corrupt("another process wrote to the file while it was being checked")
    header["content_stamp"] = _content_stamp(status)
    return header


def _content_stamp(status: os.stat_result) -> tuple[int, int]:
    """``(size, mtime in ns)``: what any write to the file's bytes changes (the kernel stamps the modification
    time before it copies the data in). Deleting or renaming the file leaves it as it is, unlike ``st_ctime``."""
    return status.st_size, status.st_mtime_ns


def _check_header(header: dict, key: str, data_bytes: int, source: ImageListDataset, spec: CacheSpec) -> None:
    if header["format"] != FORMAT_VERSION:
        raise _Corrupt(f"format version {header['format']}, expected {FORMAT_VERSION}")
    if header["key"] != key:
        raise _Corrupt("the key in the header does not match the file's name (renamed or copied over)")
    if header["count"] != len(source):
        raise _Corrupt(f"the header counts {header['count']} images, the split lists {len(source)}")
    if header["data_bytes"] != data_bytes:
        raise _Corrupt(f"{data_bytes} bytes of data, the header expects {header['data_bytes']} (truncated or "
                       "padded)")
    if header["labels"] != source.targets:
        raise _Corrupt("the labels in the header differ from the split's labels")
    if spec.ragged:
        shapes = np.asarray(header["shapes"], dtype=np.int64).reshape(-1, 2)
        if len(shapes) != len(source) or int((3 * shapes[:, 0] * shapes[:, 1]).sum()) != data_bytes:
            raise _Corrupt("the image shapes in the header do not add up to the data size")
    elif header["item_shape"] != [3, spec.input_size, spec.input_size] or \
            data_bytes != len(source) * 3 * spec.input_size ** 2:
        raise _Corrupt(f"item shape {header['item_shape']} does not match {spec.input_size}px images")
    crcs = header["item_crc32"]
    if not isinstance(crcs, list) or len(crcs) != len(source) or \
            not all(isinstance(c, int) and 0 <= c < 2**32 for c in crcs):
        raise _Corrupt(f"the header does not hold one CRC-32 for each of the {len(source)} images")


def _build(path: Path, key: str, source: ImageListDataset, spec: CacheSpec, workers: int) -> tuple[int, dict]:
    """Decode ``source`` into a temporary file, append the header, rename it to ``path``; return an open
    read descriptor of the file built and its header."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    started = time.perf_counter()
    logger.info("decoded-image cache: decoding %s (%d images, %s %dpx) with %d worker(s) into %s",
                source.name, len(source), spec.kind, spec.input_size, workers, path)
    try:
        with Progress(total=len(source), desc=f"decoded-image cache {source.name}", unit="images") as bar:
            if spec.ragged:
                layout = {"layout": "ragged", "shapes": _write_ragged(tmp, source, spec, workers, bar)}
            else:
                _write_fixed(tmp, source, spec, workers, bar)
                layout = {"layout": "fixed", "item_shape": [3, spec.input_size, spec.input_size]}
        data_bytes = tmp.stat().st_size
        fd = os.open(tmp, _READ_FLAGS)
        try:
            crcs = _item_crcs(fd, *_item_layout(layout.get("shapes"), len(source), spec), workers)
        except BaseException:
            os.close(fd)
            raise
        header = {"format": FORMAT_VERSION, "key": key, "name": source.name, "kind": spec.kind,
                  "pixels": [repr(s) for s in spec.pixel_steps()], "count": len(source),
                  "data_bytes": data_bytes,
                  **layout, "labels": source.targets, "item_crc32": crcs}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        try:
            with open(tmp, "ab") as f:
                f.write(blob)
                f.write(_TRAILER.pack(len(blob), _MAGIC))
            # Atomic: readers see no file or a complete one. A racing builder's identical file may replace
            # ours; our descriptor keeps serving ours.
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    status = os.fstat(fd)  # our private temporary file until the rename: nobody else wrote to it
    header["content_stamp"] = _content_stamp(status)
    logger.info("decoded-image cache: %s built in %.1f s (%.1f MiB)", path.name,
                time.perf_counter() - started, data_bytes / 2**20)
    return fd, header


def _remove_stale(folder: Path, prefix: str, keep: Path) -> None:
    """Remove the other cache files of this split and kind (built from an older split file or older images)
    and temporary files of builds that died; files another process still has open stay readable (POSIX)."""
    now = time.time()
    for old in folder.glob(f"{prefix}.*"):
        try:
            other_cache = old.name.endswith(SUFFIX) and old != keep
            abandoned = old.name.endswith(".tmp") and now - old.stat().st_mtime > _ABANDONED_SECONDS
            if other_cache or abandoned:
                old.unlink()
        except OSError:  # already gone (a racing process removed it) or not removable (Windows: in use)
            pass


def _ensure_writable(folder: Path, default_location: bool) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        where = "next to the data (the default location)" if default_location else "in the given cache folder"
        raise DatasetError(
            f"cannot write the decoded-image cache {where}: {folder} ({err.strerror or err}). "
            f"Pass --cache-dir DIR (build_datasets(..., cache_dir=DIR)) with a writable folder DIR"
        ) from err


def _sha256(path: Path) -> str:
    """SHA-256 of a split file, streamed (the loaders bound its size, but need not hold it whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _images_digest(source: ImageListDataset, task_dir: Path, absolute: bool) -> str:
    """SHA-256 over each image's path (relative to the task folder unless ``absolute``), label, size, mtime"""
    digest = hashlib.sha256()
    for path, label in source.samples:
        st = os.stat(path)
        name = str(path) if absolute else os.path.relpath(path, task_dir)
        digest.update(f"{name}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _normalization(value):
    if isinstance(value, str):
        return resolve_normalization(value)
    return value


def load_cached_split(benchmark: str, data_root: str | os.PathLike, task: str, split: str | Sequence[str], *,
                      input_size: int, normalization=None, train: bool = False,
                      cache_dir: str | os.PathLike | None = None,
                      workers: int | None = None) -> CachedImageDataset:
    """One split as a :class:`CachedImageDataset`, decoding it into the cache first if needed.

    Args:
        benchmark: ``vtab``, ``mini-vtab`` or ``fgvc``.
        data_root: the folder holding the task folders (as for :func:`visadapt.data.build_datasets`).
        task: task name or alias.
        split: a VTAB split name (``train800val200``, ``test``, ...), or FGVC split(s) (``"test"``,
            ``("train", "val")``).
        input_size: side of the images the model gets, ``(3, input_size, input_size)``.
        normalization: ``(mean, std)``, ``None`` or a choice string (``imagenet``/``none``); applied by the
            dataset's ``device_transform``, not stored (one cache serves every normalisation).
        train: FGVC only: the training pre-processing (random crop + flip) instead of the centre crop. VTAB-1k
            has no augmentation, so it is ignored there.
        cache_dir: where caches live: ``None`` for ``<task folder>/.visadapt_cache/`` (next to the data),
            else ``<cache_dir>/<benchmark>/<task>/``.
        workers: decode processes for a build (default :func:`default_workers`).

    A cache that is missing, stale (split file or images changed) or corrupt is (re)built; a corrupt one is
    reported with one warning line on the ``visadapt`` logger first.
    """
    info = resolve_task(benchmark, task)
    task_dir = find_task_dir(data_root, info)
    if benchmark == "fgvc":
        source = fgvc.load_split(data_root, task, split)
        wanted = [split] if isinstance(split, str) else list(split)
        split_tag = "+".join(wanted)
        split_files = [task_dir / f"{s}.json" for s in fgvc.SPLITS if (task_dir / f"{s}.json").is_file()]
        spec = CacheSpec("fgvc-train" if train else "fgvc-eval", input_size)
    else:
        if not isinstance(split, str):
            raise DatasetError(f"a {benchmark} split is one name ({', '.join(vtab.SPLITS)}), got {split!r}")
        source = vtab.load_split(data_root, benchmark, task, split)
        split_tag = split
        split_files = [task_dir / f"{split}.txt"]
        spec = CacheSpec("vtab", input_size)
    normalization = _normalization(normalization)
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    default_location = cache_dir is None
    folder = task_dir / CACHE_DIRNAME if default_location else Path(cache_dir) / benchmark / info.name
    material = {"format": FORMAT_VERSION, "benchmark": benchmark, "task": info.name, "split": split_tag,
                "kind": spec.kind, "pixels": [repr(s) for s in spec.pixel_steps()],
                "split_files": {p.name: _sha256(p) for p in split_files},
                "images": _images_digest(source, task_dir, absolute=not default_location)}
    if not default_location:
        material["task_dir"] = str(task_dir.resolve())
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    prefix = f"{split_tag}.{spec.kind}{input_size}"
    path = folder / f"{prefix}.{key[:16]}{SUFFIX}"

    try:
        fd, header = _open_checked(path, key, source, spec, workers)
        return CachedImageDataset(fd, path, header, source, spec, normalization)
    except (FileNotFoundError, NotADirectoryError):
        pass  # not built yet, or removed meanwhile (by a racing process's stale-file cleanup, or by hand)
    except _Corrupt as err:
        logger.warning("decoded-image cache %s is corrupt: %s; rebuilding it", path, err)
    _ensure_writable(folder, default_location)
    fd, header = _build(path, key, source, spec, workers)
    _remove_stale(folder, prefix, keep=path)
    return CachedImageDataset(fd, path, header, source, spec, normalization)
