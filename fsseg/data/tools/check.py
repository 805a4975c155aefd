"""`fsseg data check`: which benchmark files are present under a data root, and the class/image counts per fold.

For each requested benchmark it prints ``OK`` or ``INCOMPLETE``, the exact paths that are missing (the first
``max_listed``, then a count), and per fold / split the number of classes and images in the split lists shipped
in ``fsseg/data/splits`` (or ``--splits-dir``), checking that every listed image and mask exists. ``--quick`` checks
an evenly spaced sample of each list instead (counts still come from the whole lists). The exit status is 1 when
any requested benchmark is incomplete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fsseg.data.splits_io import read_json_gz, read_lines, resolve_splits_dir

BENCHMARKS = ("coco20i", "pascal5i", "fss1000", "lvis92i", "ade20k")
TITLES = {"coco20i": "COCO-20i", "pascal5i": "PASCAL-5i", "fss1000": "FSS-1000", "lvis92i": "LVIS-92i",
          "ade20k": "ADE20K"}  # fmt: skip


@dataclass
class Report:
    """What one benchmark check found."""

    benchmark: str
    missing: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # counts and notes

    @property
    def ok(self) -> bool:
        return not self.missing

    def note(self, text: str) -> None:
        self.lines.append(text)

    def format(self, max_listed: int = 20) -> str:
        head = f"{TITLES[self.benchmark]}: " + (
            "OK" if self.ok else f"INCOMPLETE ({len(self.missing)} missing)"
        )
        out = [head] + [f"  {ln}" for ln in self.lines]
        out += [f"  missing: {p}" for p in self.missing[:max_listed]]
        if len(self.missing) > max_listed:
            out.append(f"  ... and {len(self.missing) - max_listed} more missing")
        return "\n".join(out)


class Checker:
    """Existence checks with a memo (folds share images) that record what is missing in a report."""

    def __init__(self, report: Report, quick: int | None) -> None:
        self.report, self.quick = report, quick
        self._seen: dict[Path, bool] = {}

    def sample(self, items: Sequence) -> Sequence:
        if not self.quick or len(items) <= self.quick:
            return items
        step = len(items) / self.quick
        return [items[int(i * step)] for i in range(self.quick)]

    def exists(self, path: Path, is_dir: bool = False) -> bool:
        if path not in self._seen:
            ok = path.is_dir() if is_dir else path.is_file()
            self._seen[path] = ok
            if not ok:
                self.report.missing.append(path)
        return self._seen[path]

    def dirs(self, paths: Sequence[Path]) -> bool:
        return all([self.exists(p, is_dir=True) for p in paths])

    def files(self, keys: Sequence[str], to_paths: Callable[[str], Sequence[Path]]) -> tuple[int, int]:
        """Check the files of (a sample of) ``keys``; returns (checked, missing) counts over keys."""
        checked = missing = 0
        for key in self.sample(keys):
            checked += 1
            missing += not all([self.exists(p) for p in to_paths(key)])
        return checked, missing


def _files_note(checked: int, missing: int, quick: bool) -> str:
    what = "sampled" if quick else "checked"
    return f"{checked} {what}, {missing} with missing files" if missing else f"{checked} {what}, all present"


def check_coco(root: Path, splits: Path, quick: int | None) -> Report:
    rep = Report("coco20i")
    ck = Checker(rep, quick)
    base = root / "COCO2014"
    present = ck.dirs(
        [base / d for d in ("train2014", "val2014", "annotations/train2014", "annotations/val2014")]
    )
    if (
        not (base / "annotations/train2014").is_dir()
        and (base / "annotations/instances_train2014.json").is_file()
    ):
        rep.note("masks not built yet: run `fsseg data build-coco-masks --root " + str(root) + "`")

    def paths(im: str) -> list[Path]:
        return [base / im, base / "annotations" / Path(im).with_suffix(".png")]

    for fold in range(4):  # fold f tests classes f + 4k and trains on the other 60 (as fsseg.data.coco)
        test = {fold + 4 * k for k in range(20)}
        parts = []
        for split in ("trn", "val"):
            lists = read_json_gz(splits / "coco20i" / split / f"fold{fold}.json.gz")
            used = [c for c in lists if (int(c) in test) == (split == "val")]
            images = sorted({im for c in used for im in lists[c]})
            text = f"{split} {len(used)} classes / {len(images)} images"
            if present:
                text += " (" + _files_note(*ck.files(images, paths), bool(quick)) + ")"
            parts.append(text)
        rep.note(f"fold {fold}: " + "; ".join(parts))
    return rep


def check_pascal(root: Path, splits: Path, quick: int | None) -> Report:
    rep = Report("pascal5i")
    ck = Checker(rep, quick)
    voc = root / "VOC2012"
    present = ck.dirs([voc / "JPEGImages", voc / "SegmentationClassAug"])

    def paths(name: str) -> list[Path]:
        return [voc / "JPEGImages" / f"{name}.jpg", voc / "SegmentationClassAug" / f"{name}.png"]

    def read(split: str, fold: int) -> list[tuple[str, str]]:
        return [
            (n, c)
            for n, _, c in (
                ln.rpartition("__") for ln in read_lines(splits / "pascal5i" / split / f"fold{fold}.txt")
            )
        ]

    for fold in range(4):  # training reads the other folds' trn lists, evaluation this fold's val list
        parts = []
        for split in ("trn", "val"):
            folds = [g for g in range(4) if g != fold] if split == "trn" else [fold]
            entries = [e for g in folds for e in read(split, g)]
            images = sorted({name for name, _ in entries})
            text = f"{split} {len({c for _, c in entries})} classes / {len(images)} images ({len(entries)} entries)"
            if present:
                text += " (" + _files_note(*ck.files(images, paths), bool(quick)) + ")"
            parts.append(text)
        rep.note(f"fold {fold}: " + "; ".join(parts))
    return rep


def check_fss(root: Path, splits: Path, quick: int | None) -> Report:
    rep = Report("fss1000")
    ck = Checker(rep, quick)
    base = root / "FSS-1000"
    present = ck.dirs([base])
    if (base / "data").is_dir():
        rep.note(
            f"{base / 'data'} exists (Matcher's layout); fsseg reads {base}/<category>/ (move or link them)"
        )
    for split in ("trn", "val", "test"):
        cats = sorted(read_lines(splits / "fss1000" / f"{split}.txt"))
        text = f"{split}: {len(cats)} classes"
        if present:
            n_img = bad = 0
            sampled = ck.sample(cats)
            for cat in sampled:
                if not ck.exists(base / cat, is_dir=True):
                    bad += 1
                    continue
                jpgs = sorted(p.stem for p in (base / cat).glob("*.jpg"))
                n_img += len(jpgs)
                bad += not all([ck.exists(base / cat / f"{s}.png") for s in jpgs])
                if not jpgs:
                    ck.exists(base / cat / "1.jpg")
                    bad += 1
            what = "sampled" if quick else "checked"
            text += f" / {n_img} images in {len(sampled)} {what} classes" + (
                f", {bad} incomplete" if bad else ""
            )
        rep.note(text)
    return rep


def check_lvis(root: Path, splits: Path, quick: int | None) -> Report:
    from fsseg.data.tools.lvis_lists import lists_path, read_class_lists

    rep = Report("lvis92i")
    ck = Checker(rep, quick)
    lvis = root / "LVIS"
    img_root = lvis / "coco" if (lvis / "coco").is_dir() or not (lvis / "val2017").is_dir() else lvis
    present = ck.dirs([img_root / "train2017", img_root / "val2017"])
    lists_file = lists_path(root, "val")
    if not ck.exists(lists_file):
        src = lvis / "lvis_v1_val.json"
        rep.note(("build the class list: `fsseg data build-lvis --root " + str(root) + "`")
                 if src.is_file() else f"needs {src} (LVIS v1 val annotations) to build {lists_file}")  # fmt: skip
        return rep
    classes = read_class_lists(lists_file)
    rep.note(f"{lists_file.name}: {len(classes)} classes, "
             f"{len({e['file'] for c in classes for e in c['images']})} images")  # fmt: skip
    for shot in (1, 5):  # the protocol's class list depends on the shot (classes with more images than shots)
        usable = [c for c in classes if len(c["images"]) > shot]
        per_fold = len(usable) // 10
        rep.note(f"{shot}-shot: {len(usable)} classes with > {shot} images -> 10 folds of {per_fold} classes")
        if per_fold:
            n_img = [
                len({e["file"] for k in range(per_fold) for e in usable[f + 10 * k]["images"]})
                for f in range(10)
            ]
            rep.note(f"{shot}-shot images per fold: " + ", ".join(f"f{f} {n}" for f, n in enumerate(n_img)))
    if present:
        files = sorted({e["file"] for c in classes for e in c["images"]})
        rep.note("images: " + _files_note(*ck.files(files, lambda f: [img_root / f]), bool(quick)))
    return rep


def check_ade(root: Path, splits: Path, quick: int | None) -> Report:
    from fsseg.data.ade import ade_dir, index_paths

    rep = Report("ade20k")
    ck = Checker(rep, quick)
    base = ade_dir(root)
    for folder in ("training", "validation"):
        if not ck.dirs([base / "images" / folder, base / "annotations" / folder]):
            continue
        stems = sorted(p.stem for p in (base / "images" / folder).glob("*.jpg"))
        n_masks = len(list((base / "annotations" / folder).glob("*.png")))
        checked, missing = ck.files(stems, lambda s, f=folder: [base / "annotations" / f / f"{s}.png"])
        cached = next((p for p in index_paths(root, folder) if p.is_file()), None)
        rep.note(f"{folder}: {len(stems)} images / {n_masks} masks (masks of images: "
                 f"{_files_note(checked, missing, bool(quick))}); class index "
                 + (f"cached at {cached}" if cached else "not built yet (built on first use)"))  # fmt: skip
    return rep


CHECKS = {"coco20i": check_coco, "pascal5i": check_pascal, "fss1000": check_fss, "lvis92i": check_lvis,
          "ade20k": check_ade}  # fmt: skip


def check_root(
    root: str | Path, benchmarks: Sequence[str] = BENCHMARKS, quick: int | None = None, splits_dir=None
) -> list[Report]:
    """Run the checks of ``benchmarks`` under ``root``."""
    root = Path(root).expanduser()
    for b in benchmarks:
        if b not in CHECKS:
            raise ValueError(f"unknown benchmark {b!r}; expected one of {BENCHMARKS}")
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    splits = resolve_splits_dir(splits_dir)
    return [CHECKS[b](root, splits, quick) for b in benchmarks]


def add_arguments(p) -> None:
    p.add_argument(
        "--root", required=True, help="the data root (holds COCO2014/, VOC2012/, FSS-1000/, LVIS/, ...)"
    )
    p.add_argument("--benchmark", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS),
                   help="benchmarks to check (default: all)")  # fmt: skip
    p.add_argument("--quick", nargs="?", type=int, const=20, default=None, metavar="N",
                   help="check an evenly spaced sample of N entries per list (default N=20) instead of all")  # fmt: skip
    p.add_argument("--splits-dir", default=None, help="split lists (default: the lists shipped with fsseg)")
    p.add_argument("--max-listed", type=int, default=20, help="missing paths listed per benchmark")


def run(args) -> int:
    reports = check_root(args.root, args.benchmark, args.quick, args.splits_dir)
    for rep in reports:
        print(rep.format(args.max_listed))
    bad = [TITLES[r.benchmark] for r in reports if not r.ok]
    print(("incomplete: " + ", ".join(bad)) if bad else "all requested benchmarks complete")
    return 1 if bad else 0
