"""What a load did, key by key and site by site, and the one rule every loader follows with it.

Every visadapt load (visadapt files, the diffusers/PEFT/kohya LoRA layouts, ResAdapter's two files, the 1-bit
official ``.bin``) fills a :class:`LoadReport` and ends with :meth:`LoadReport.enforce`:

* ``strict=True`` (the default everywhere): anything missing, unexpected or misshapen raises
  :class:`AdapterLoadError`, whose message is the whole report and whose ``report`` attribute is the object;
  nothing is loaded.
* ``strict=False``: what fits is loaded, everything else is skipped *and printed* (a ``WARNING`` on the
  ``visadapt`` logger, which reaches stderr with no logging set up). A load where nothing fits raises even
  then: an empty load that "succeeds" is the failure users of other libraries keep reporting.

The report of the last load of an adapter stays on its record: ``visadapt.load_report(model, adapter_name)``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

logger = logging.getLogger("visadapt")

#: statuses of one key, in the order a report lists them
MATCHED, MISSING, UNEXPECTED, MISMATCHED = "matched", "missing", "unexpected", "shape"
_STATUSES = (MATCHED, MISSING, UNEXPECTED, MISMATCHED)
_PROBLEMS = (MISSING, UNEXPECTED, MISMATCHED)


class AdapterLoadError(ValueError):
    """Tensors do not fit the adapter they are loaded into; ``report`` (when set) is the full :class:`LoadReport`."""

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class LoadEntry:
    """One key of a load. ``site``: the module it belongs to (a host path such as ``blocks.0.attn.qkv`` or a
    UNet module path); ``detail``: for shape mismatches ``"file (r, in) vs model (r, in2)"``, else ``""``."""

    site: str
    key: str
    status: str
    detail: str = ""


def adapter_key_site(key: str) -> str:
    """The host module of a visadapt state key: ``blocks.0.attn.qkv.visadapt_adapters.A.weight`` ->
    ``blocks.0.attn.qkv``; a key outside any adapter container (a head's ``weight``) is its own module path."""
    head, sep, _ = key.partition(".visadapt_")
    if sep:
        return head
    return key.rpartition(".")[0] or key


@dataclasses.dataclass
class LoadReport:
    """Matched, missing and unexpected keys and shape mismatches of one load, grouped by site.

    ``source``: what was read (file paths, or "a state dict of N tensors"); ``target``: what it was loaded into
    (``adapter 'default'``). Build it with :meth:`add` / :meth:`compare`, finish with :meth:`enforce`.
    """

    source: str
    target: str = ""
    entries: list[LoadEntry] = dataclasses.field(default_factory=list)
    #: problems that are not one key (a file section that could not be read); each makes the load not ``ok``
    notes: list[str] = dataclasses.field(default_factory=list)

    # ----------------------------------------------------------------------------------------- building
    def add(self, site: str, key: str, status: str, detail: str = "") -> None:
        if status not in _STATUSES:
            raise ValueError(f"load report status {status!r} is not one of {_STATUSES}")
        self.entries.append(LoadEntry(site, key, status, detail))

    def compare(self, given: dict, expected: dict, site_of: Callable[[str], str] = adapter_key_site,
                skip: Iterable[str] = ()) -> list[str]:
        """Record ``given`` (source tensors by key) against ``expected`` (model tensors by key); returns the keys
        that fit (same key, same shape), which are the ones a non-strict load copies."""
        skip = set(skip)
        expected = {k: v for k, v in expected.items() if k not in skip}
        fits = []
        for key in sorted(set(given) | set(expected)):
            if key not in given:
                self.add(site_of(key), key, MISSING)
            elif key not in expected:
                self.add(site_of(key), key, UNEXPECTED)
            elif tuple(given[key].shape) != tuple(expected[key].shape):
                self.add(site_of(key), key, MISMATCHED,
                         f"file {tuple(given[key].shape)} vs model {tuple(expected[key].shape)}")
            else:
                self.add(site_of(key), key, MATCHED)
                fits.append(key)
        return fits

    def extend(self, other: LoadReport) -> None:
        self.entries.extend(other.entries)
        self.notes.extend(other.notes)

    # ----------------------------------------------------------------------------------------- reading
    def keys(self, status: str) -> list[str]:
        return [e.key for e in self.entries if e.status == status]

    @property
    def matched(self) -> list[str]:
        return self.keys(MATCHED)

    @property
    def missing(self) -> list[str]:
        return self.keys(MISSING)

    @property
    def unexpected(self) -> list[str]:
        return self.keys(UNEXPECTED)

    @property
    def mismatched(self) -> list[str]:
        return self.keys(MISMATCHED)

    @property
    def ok(self) -> bool:
        return not self.notes and all(e.status == MATCHED for e in self.entries)

    def by_site(self) -> dict[str, dict[str, int]]:
        """``{site: {status: count}}`` in first-seen order."""
        sites: dict[str, dict[str, int]] = {}
        for entry in self.entries:
            counts = sites.setdefault(entry.site, dict.fromkeys(_STATUSES, 0))
            counts[entry.status] += 1
        return sites

    def summary(self) -> str:
        counts = {status: len(self.keys(status)) for status in _STATUSES}
        given = counts[MATCHED] + counts[UNEXPECTED] + counts[MISMATCHED]
        where = f" into {self.target}" if self.target else ""
        return (f"load of {self.source}{where}: {counts[MATCHED]} of {given} tensors matched; "
                f"{counts[MISSING]} missing, {counts[UNEXPECTED]} unexpected, {counts[MISMATCHED]} shape mismatches "
                f"over {len(self.by_site())} sites")

    def format(self, max_keys: int = 40) -> str:
        """The summary, a per-site table of the sites with problems, then each problem key (at most
        ``max_keys``, the rest counted)."""
        lines = [self.summary()]
        sites = self.by_site()
        bad = {site: c for site, c in sites.items() if any(c[s] for s in _PROBLEMS)}
        if bad:
            width = min(max(len(s) for s in bad), 70)
            lines.append(f"  {'site':<{width}}  matched  missing  unexpected  shape")
            for site, c in bad.items():
                lines.append(f"  {site:<{width}}  {c[MATCHED]:>7}  {c[MISSING]:>7}  {c[UNEXPECTED]:>10}  "
                             f"{c[MISMATCHED]:>5}")
            if len(sites) > len(bad):
                lines.append(f"  ({len(sites) - len(bad)} other sites matched fully)")
        problems = [e for e in self.entries if e.status in _PROBLEMS]
        for entry in problems[:max_keys]:
            detail = f"  {entry.detail}" if entry.detail else ""
            lines.append(f"  {entry.status:<10} {entry.key}{detail}")
        if len(problems) > max_keys:
            lines.append(f"  ... and {len(problems) - max_keys} more problem keys")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    # ----------------------------------------------------------------------------------------- the rule
    def enforce(self, strict: bool, fix: str = "") -> None:
        """Raise or print, by the module's rule. Call before copying anything: a strict load that raises has
        touched nothing. ``fix``: what to do about a mismatch, added to the error."""
        hint = f"\n{fix}" if fix else ""
        if not self.matched:
            raise AdapterLoadError(f"{self.format()}\nnothing to load: no tensor of the source fits (strict or not, "
                                   f"an empty load is an error){hint}", self)
        if self.ok:
            return
        if strict:
            raise AdapterLoadError(
                f"{self.format()}{hint}\n(strict load: nothing was loaded; pass strict=False to load the "
                f"{len(self.matched)} tensors that fit and skip the rest)", self)
        logger.warning("visadapt: partial load (strict=False), the rest was skipped:\n%s", self.format())
