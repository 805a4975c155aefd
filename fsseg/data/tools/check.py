"""`fsseg data check`: which benchmark files are present under a data root, and the class/image counts per fold.

Everything comes from the benchmark classes of `fsseg.data.registry`: their required folders, their split lists
(read through the classes themselves, so the fold rules are the ones training and evaluation use) and the files each
listed image is read from. For each requested benchmark it prints ``OK`` or ``INCOMPLETE``, the exact paths that are
missing (the first ``max_listed``, then a count), and per fold and split the number of classes and images, checking
that every listed image and mask exists. ``--quick`` checks an evenly spaced sample of each list instead (counts
still come from the whole lists). ``--verify`` also opens and fully decodes every image and mask that is checked
and lists the unreadable, truncated or mis-sized ones by file, and the bad masks: a mask that does not show a class
the lists give for its image (an episode would score its query against an empty ground truth), and a label map with
values outside the benchmark's labels (e.g. 37 in a PASCAL mask, which would be read as background), each with the
file, the listed class and the values found. The exit status is 1 when any requested benchmark is incomplete or has
an unreadable file or a bad mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fsseg.data.base import FewShotDataset
from fsseg.data.registry import benchmark_class, benchmark_classes


@dataclass
class Report:
    """What one benchmark check found."""

    title: str
    missing: list[Path] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "<what failed>" messages naming the file
    bad_masks: list[str] = field(default_factory=list)  # `FewShotDataset.mask_problems` lines
    bad_lists: list[str] = field(
        default_factory=list
    )  # split lists that could not be read as the class reads them
    lines: list[str] = field(default_factory=list)  # counts and notes

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unreadable and not self.bad_lists and not self.bad_masks

    def note(self, text: str) -> None:
        if text not in self.lines:
            self.lines.append(text)

    def format(self, max_listed: int = 20) -> str:
        status = []
        if self.missing:
            status.append(f"INCOMPLETE ({len(self.missing)} missing)")
        if self.unreadable:
            status.append(f"UNREADABLE ({len(self.unreadable)} files)")
        if self.bad_lists:
            status.append(f"BAD LISTS ({len(self.bad_lists)})")
        if self.bad_masks:
            status.append(f"BAD MASKS ({len(self.bad_masks)})")
        out = [f"{self.title}: " + (", ".join(status) or "OK")] + [f"  {ln}" for ln in self.lines]
        for label, items in (
            ("missing", self.missing),
            ("unreadable", self.unreadable),
            ("bad list", self.bad_lists),
            ("bad mask", self.bad_masks),
        ):
            out += [f"  {label}: {p}" for p in items[:max_listed]]
            if len(items) > max_listed:
                out.append(f"  ... and {len(items) - max_listed} more {label}")
        return "\n".join(out)


class Checker:
    """Existence (and, with ``verify``, decoding) checks with a memo — folds share images — that record what is
    missing or unreadable in a report."""

    def __init__(self, report: Report, quick: int | None, verify: bool = False, workers: int = 4) -> None:
        self.report, self.quick, self.verify, self.workers = report, quick, verify, max(1, workers)
        self._seen: dict[Path, bool] = {}
        self._verified: set[tuple[Path, ...]] = set()
        self._mask_checked: dict[tuple[Path, ...], set[int]] = {}  # files -> classes whose masks were checked

    def sample(self, items: Sequence) -> Sequence:
        if not self.quick or len(items) <= self.quick:
            return items
        step = len(items) / self.quick
        return [items[int(i * step)] for i in range(self.quick)]

    def exists(self, path: Path) -> bool:
        if path not in self._seen:
            self._seen[path] = path.exists()
            if not self._seen[path]:
                self.report.missing.append(path)
        return self._seen[path]

    def all_exist(self, paths: Sequence[Path]) -> bool:
        return all([self.exists(p) for p in paths])  # a list, so that every missing path is recorded

    def files(self, ds: FewShotDataset, keys: Sequence[str]) -> str:
        """Check the files of (a sample of) ``keys`` of ``ds``; returns a note with the counts."""
        sampled = self.sample(keys)
        missing = sum(not self.all_exist(ds.files(k)) for k in sampled)
        what = "sampled" if self.quick and len(sampled) < len(keys) else "checked"
        text = f"{len(sampled)} {what}, " + (f"{missing} with missing files" if missing else "all present")
        if self.verify:
            todo = [
                k for k in sampled if tuple(ds.files(k)) not in self._verified and self.all_exist(ds.files(k))
            ]
            self._verified.update(tuple(ds.files(k)) for k in todo)
            with ThreadPoolExecutor(self.workers) as pool:
                problems = [p for p in pool.map(lambda k: _verify(ds, k), todo) if p]
            self.report.unreadable += problems
            text += f", {len(todo)} opened" + (f", {len(problems)} unreadable" if problems else "")
            bad = self.masks(ds, [k for k in sampled if self.all_exist(ds.files(k))])
            text += f", {len(bad)} bad masks" if bad else ""
        return text

    def masks(self, ds: FewShotDataset, keys: Sequence[str]) -> list[str]:
        """The bad masks among ``keys``' listed classes not checked before (folds and splits share images);
        records and returns them."""
        todo = []
        for k in keys:
            seen = self._mask_checked.setdefault(tuple(ds.files(k)), set())
            classes = [c for c in ds.listed_classes(k) if c not in seen]
            if classes:
                todo.append((k, classes, not seen))
                seen.update(classes)

        def check(item) -> list[str]:
            key, classes, first = item
            try:
                return ds.mask_problems(key, classes, check_values=first)
            except (ValueError, OSError, KeyError):  # unreadable: listed by _verify
                return []

        with ThreadPoolExecutor(self.workers) as pool:
            bad = [p for problems in pool.map(check, todo) for p in problems]
        self.report.bad_masks += bad
        return bad


def _verify(ds: FewShotDataset, key: str) -> str | None:
    try:
        ds.verify(key)
    except (ValueError, OSError, KeyError) as e:
        return str(e)
    return None


def check_benchmark(cls: type[FewShotDataset], root: Path, splits_dir=None, quick: int | None = None,
                    verify: bool = False, workers: int = 4) -> Report:  # fmt: skip
    """Check one benchmark class under ``root``: required paths, then every fold and split of `check_splits`."""
    rep = Report(cls.title or cls.__name__)
    ck = Checker(rep, quick, verify, workers)
    present = {
        split: ck.all_exist([p for p, _ in cls.required_paths(root, split)]) for split in cls.check_splits
    }
    for line in cls.check_notes(root):
        rep.note(line)
    for fold in range(cls.nfolds):
        parts = []
        for split in cls.check_splits:
            try:
                ds = cls(root, split, fold, splits_dir=splits_dir, index_only=True)
            except FileNotFoundError as e:  # a list or an index not there (yet)
                if present[split]:  # else a required path is missing, and listed as such
                    rep.note(f"{split}: {e}")
                continue
            except ValueError as e:  # there, but not what the benchmark reads
                if str(e) not in rep.bad_lists:
                    rep.bad_lists.append(str(e))
                continue
            keys = ds.keys()
            text = f"{split} {len(ds.class_ids())} classes / {len(keys)} images"
            if present[split]:
                text += f" ({ck.files(ds, keys)})"
            parts.append(text)
        if parts:
            rep.note(("" if cls.nfolds == 1 else f"fold {fold}: ") + "; ".join(parts))
    return rep


def check_root(root: str | Path, benchmarks: Sequence[str] | None = None, quick: int | None = None,
               splits_dir=None, verify: bool = False, workers: int = 4) -> list[Report]:  # fmt: skip
    """Run the checks of ``benchmarks`` (default: every benchmark checked by default) under ``root``."""
    classes = [benchmark_class(b) for b in benchmarks] if benchmarks else default_classes()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    return [check_benchmark(cls, root, splits_dir, quick, verify, workers) for cls in classes]


def default_classes() -> list[type[FewShotDataset]]:
    return [cls for cls in benchmark_classes().values() if cls.check_default]


def add_arguments(p) -> None:
    p.add_argument(
        "--root", required=True, help="the data root (holds COCO2014/, VOC2012/, FSS-1000/, LVIS/, ...)"
    )
    names = list(benchmark_classes())
    defaults = [cls.name for cls in default_classes()]
    p.add_argument("--benchmark", nargs="+", choices=names, default=None,
                   help=f"benchmarks to check (default: {' '.join(defaults)})")  # fmt: skip
    p.add_argument("--quick", nargs="?", type=int, const=20, default=None, metavar="N",
                   help="check an evenly spaced sample of N entries per list (default N=20) instead of all")  # fmt: skip
    p.add_argument("--verify", action="store_true",
                   help="also open and decode every checked image and mask; list the unreadable ones")  # fmt: skip
    p.add_argument("--workers", type=int, default=4, help="threads that decode files for --verify")
    p.add_argument("--splits-dir", default=None, help="split lists (default: the lists shipped with fsseg)")
    p.add_argument("--max-listed", type=int, default=20, help="missing/unreadable paths listed per benchmark")


def run(args) -> int:
    reports = check_root(args.root, args.benchmark, args.quick, args.splits_dir, args.verify, args.workers)
    for rep in reports:
        print(rep.format(args.max_listed))
    bad = [r.title for r in reports if not r.ok]
    print(
        ("incomplete, unreadable or with bad masks: " + ", ".join(bad))
        if bad
        else "all requested benchmarks complete"
    )
    return 1 if bad else 0
