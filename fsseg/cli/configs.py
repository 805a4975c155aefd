"""Finding config files from any folder: ``--config diffews``, ``diffews.yaml``, ``configs/diffews.yaml`` or
``ablations/diffews/fusion_qkv``, and the ``config.yaml`` a training run saved beside its checkpoints.

A name that is not an existing file is looked up in ``$FSSEG_CONFIGS`` (if set), then in the ``configs/`` folder of
the source checkout fsseg runs from (an editable install or ``PYTHONPATH``). A wheel install has no ``configs/``
(the configs ship with the repository, not the package): there bare names need ``FSSEG_CONFIGS``.
Standard library only: the ``fsseg`` dispatcher imports this before anything heavy.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

SUFFIXES = (".yaml", ".yml")


class ConfigNotFound(FileNotFoundError):
    """A ``--config`` value that is neither a file nor the name of a shipped config."""


def repo_root() -> Path | None:
    """The source checkout this fsseg is imported from, or None (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "configs").is_dir() and (root / "pyproject.toml").is_file() else None


def config_dirs() -> list[Path]:
    """Where bare config names are looked up, in order."""
    dirs = []
    if os.environ.get("FSSEG_CONFIGS"):
        dirs.append(Path(os.environ["FSSEG_CONFIGS"]).expanduser())
    root = repo_root()
    if root is not None:
        dirs.append(root / "configs")
    return dirs


def _candidates(name: str, folder: Path) -> list[Path]:
    rel = Path(name)
    rels = [rel]
    if rel.parts and rel.parts[0] == "configs":  # `configs/x.yaml`, written relative to the repository root
        rels.append(Path(*rel.parts[1:]))
    out = []
    for r in rels:
        out.append(folder / r)
        if r.suffix not in SUFFIXES:
            out += [folder / f"{r}{s}" for s in SUFFIXES]
    return out


def known_configs(folder: Path) -> list[str]:
    """Every config below ``folder``, as its path relative to it without the suffix (``ablations/diffews/x``)."""
    return sorted(str(p.relative_to(folder).with_suffix("")) for s in SUFFIXES for p in folder.rglob(f"*{s}"))


def _shared_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def closest_names(query: str, known: list[str], n: int = 5) -> list[str]:
    """The known config names ``query`` most likely meant: first those sharing its start up to a separator
    (``demo_nonexist`` -> the ``demo_*`` configs), longest shared start first; then `difflib`'s close matches of the
    whole name and of its last part (typos: ``difews`` -> ``diffews``), only near-identical ones beside a family."""
    cut = max((i + 1 for i, ch in enumerate(query) if ch in "_/-"), default=0)  # "demo_nonexist" -> "demo_"
    prefix = [c for c in known if cut and _shared_prefix(c, query) >= cut]
    prefix.sort(
        key=lambda c: (-_shared_prefix(c, query), -difflib.SequenceMatcher(None, c, query).ratio(), c)
    )
    by_stem: dict[str, list[str]] = {}
    for c in known:
        by_stem.setdefault(Path(c).name, []).append(c)
    cutoff = 0.8 if prefix else 0.6  # beside names of the same family, only near-identical others
    close = difflib.get_close_matches(query, known, n=n, cutoff=cutoff)
    for s in difflib.get_close_matches(Path(query).name, list(by_stem), n=n, cutoff=cutoff):
        close += by_stem[s]
    return list(dict.fromkeys(prefix + close))[:n]


def resolve_config(name: str | os.PathLike) -> Path:
    """The config file ``name`` means; `ConfigNotFound` lists where it looked and the closest names."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    dirs = config_dirs()
    for folder in [Path("."), *dirs]:  # `--config base` is ./base.yaml too
        for candidate in _candidates(str(name), folder):
            if candidate.is_file():
                return candidate
    if not dirs:
        raise ConfigNotFound(
            f"config {name} does not exist, and bare config names cannot be looked up: the shipped configs are in "
            f"the repository's configs/ folder, which an installed package does not include (clone the repository, "
            f"or set FSSEG_CONFIGS to its configs/ folder)"
        )
    known = {c: folder for folder in dirs for c in known_configs(folder)}
    stem = Path(str(name)).with_suffix("") if Path(str(name)).suffix in SUFFIXES else Path(str(name))
    query = str(Path(*stem.parts[1:])) if stem.parts and stem.parts[0] == "configs" else str(stem)
    close = closest_names(query, list(known))
    top = sorted(c for c in known if "/" not in c)
    hint = f"; did you mean: {', '.join(close)}?" if close else f"; the configs there: {', '.join(top)}"
    raise ConfigNotFound(
        f"config {name} not found (not a file here, nor a config in {', '.join(map(str, dirs))}){hint}"
    )


def find_run_config(ckpt: str | os.PathLike) -> Path:
    """The ``config.yaml`` of the run a checkpoint belongs to (its folder or up to two parents)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    for folder in [ckpt.parent, *list(ckpt.parents)[1:3]]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(
        f"no config.yaml beside checkpoint {ckpt} or in its two parent folders; give the run's config with --config"
    )
