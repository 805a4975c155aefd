"""The benchmark registry: which `FewShotDataset` class a ``data.benchmark`` value means.

A benchmark registers itself by being a `FewShotDataset` subclass with a ``name`` in one of the modules below; the
modules are imported on the first lookup (none of them imports more than numpy/PIL/torch at import time: LVIS loads
pycocotools when it decodes a mask). ``data.benchmark`` also takes the dotted path of any `FewShotDataset` subclass,
e.g. ``mypackage.data.MyBenchmark``, so a benchmark of your own needs no change to fsseg.
"""

from __future__ import annotations

from importlib import import_module

from fsseg.data.base import FewShotDataset

MODULES = ("fsseg.data.coco", "fsseg.data.pascal", "fsseg.data.fss", "fsseg.data.lvis", "fsseg.data.ade")


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def benchmark_classes() -> dict[str, type[FewShotDataset]]:
    """Every registered benchmark by name, in registration order."""
    for module in MODULES:
        import_module(module)
    found: dict[str, type[FewShotDataset]] = {}
    for cls in _subclasses(FewShotDataset):
        name = cls.__dict__.get("name")
        if not name:
            continue
        if name in found and found[name] is not cls:
            raise RuntimeError(
                f"benchmark name {name!r} is declared by both {found[name].__qualname__} and {cls.__qualname__}"
            )
        found[name] = cls
    order = {m: i for i, m in enumerate(MODULES)}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[1].__module__, len(order))))


def benchmark_names() -> list[str]:
    return list(benchmark_classes())


def benchmark_class(name: str) -> type[FewShotDataset]:
    """The dataset class of a registered benchmark name or of a dotted class path."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"data.benchmark {name!r}: cannot import {attr!r} from {module!r}: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, FewShotDataset)):
            raise ValueError(f"data.benchmark {name!r} is not a subclass of fsseg.data.base.FewShotDataset")
        return cls
    classes = benchmark_classes()
    if name not in classes:
        raise ValueError(
            f"unknown benchmark {name!r}; expected one of {tuple(classes)} or the dotted path of a FewShotDataset class"
        )
    return classes[name]
