"""`fsseg data build-embedded`: generate the embedded benchmark into a folder of your choice.

The data module generates it by itself only at its default location (``$FSSEG_CACHE/embedded-v1-seed0``, when
``data.root`` is not set); another ``data.root`` must already hold one, so a mistyped root is an error instead of a
new benchmark. This command is the explicit way to put one elsewhere (`fsseg.data.embedded.generate_embedded_benchmark`:
written to a temporary sibling and renamed into place; an existing non-empty folder is refused).
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--root", required=True, help="the folder to generate into (must not exist, or be empty)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0, the demo's)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--n-train", type=int, default=600, help="training images (default 600)")
    p.add_argument("--n-val", type=int, default=300, help="validation/test images (default 300)")


def run(args) -> int:
    from fsseg.data.embedded import generate_embedded_benchmark

    root = generate_embedded_benchmark(Path(args.root).expanduser(), args.seed, args.image_size, args.n_train,
                                       args.n_val)  # fmt: skip
    print(
        f"fsseg data build-embedded: wrote the embedded benchmark to {root} (use it with --data.root {root})"
    )
    return 0
