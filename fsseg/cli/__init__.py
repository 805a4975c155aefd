"""The ``fsseg`` command: a dispatcher to one module per subcommand, each with ``main(argv) -> int``.

Only the standard library is imported here, so ``fsseg --help`` answers at once; a subcommand's module (and torch,
Lightning, diffusers with it) is imported when that subcommand runs. The subcommand modules never import this one.
An error ends the command with one line on stderr (exit status 2 for bad input, 1 for a run that did nothing or
failed); ``--traceback`` or ``FSSEG_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

# name -> (module with main(argv), one line of help). fit/validate/test receive their own name as argv[0].
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("fsseg.cli.trainer", "train a method on a benchmark (resumable checkpoints every 500 steps)"),
    "validate": ("fsseg.cli.trainer", "evaluate a checkpoint on the validation episodes"),
    "test": ("fsseg.cli.trainer", "evaluate a checkpoint on the published test episodes -> metrics.json"),
    "predict-images": ("fsseg.predict", "segment your own images from one (or K) annotated example(s)"),
    "evaluate-seeds": ("fsseg.seeds", "one test per protocol seed (data.seed 0..N-1), then mean and std"),
    "compare": ("fsseg.compare", "two test runs on identical episodes: paired mIoU difference and interval"),
    "demo": ("fsseg.demo", "train and test every method on the embedded benchmark (CPU, minutes)"),
    "data": (
        "fsseg.data.tools",
        "prepare and check datasets (build-coco-masks, build-lvis, build-ade-index, check)",
    ),
    "cache-latents": (
        "fsseg.cli.cache_latents",
        "DiffewS: encode the training images once (model.init_args.latent_cache)",
    ),
    "plan": (
        "fsseg.plan.cli",
        "peak GPU memory of a config's training and evaluation step, and which cards fit (no GPU needed)",
    ),
}
PASS_NAME = ("fit", "validate", "test")
REMOVED = {
    "predict": "`fsseg predict` was removed: `fsseg predict-images` segments your own images and writes masks; "
    "`fsseg test` records every benchmark episode's result (episodes.jsonl)",
}
METHODS = (
    ("fsseg.models.diffews.DiffewsModule", "DiffewS: SD 2.1 UNet fine-tuned, query/support KV fusion"),
    ("fsseg.models.diffseg.DiffSegModule", "DiffSeg: frozen Kandinsky 2.2 UNet, trainable PAM and SCM"),
    ("fsseg.models.baseline.PrototypeModule", "prototype matching baseline (PANet family)"),
)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError)


def usage() -> str:
    from fsseg.cli.configs import config_dirs

    lines = [
        "usage: fsseg <command> [options]      (fsseg <command> --help: the command's options)",
        "",
        "Few-shot semantic segmentation with diffusion models: DiffewS, DiffSeg and a prototype baseline.",
        "",
        "commands:",
        *(f"  {name:<16}{text}" for name, (_, text) in COMMANDS.items()),
        "",
        "methods (model.class_path in a config):",
        *(f"  {path:<40}{text}" for path, text in METHODS),
        "",
        "examples:",
        "  fsseg demo                                          # every method on the embedded benchmark",
        "  fsseg fit --config diffews --fold 0                 # configs/diffews.yaml; runs/<name>/version_N/",
        "  fsseg test --ckpt runs/diffews_fold0/version_0/checkpoints/last.ckpt --fold 0",
        "",
        "configs: --config takes a file or a shipped config's name (diffews, ablations/diffews/fusion_qkv),",
        f"  looked up in {', '.join(map(str, config_dirs())) or '$FSSEG_CONFIGS (no repository configs/ found)'}",
        "results: every command prints where it wrote; an existing result is replaced only with --overwrite.",
        "errors: one line; --traceback (or FSSEG_TRACEBACK=1) shows the full traceback.",
    ]
    return "\n".join(lines)


def _error(command: str, err: BaseException) -> int:
    """One line on stderr; the exit status: the error's own ``exit_code``, 2 for bad input, else 1."""
    code = getattr(err, "exit_code", None)
    expected = code is not None or isinstance(err, USER_ERRORS)
    text = str(err).strip() or type(err).__name__
    if not expected:  # not an error fsseg raises on purpose: name it and say how to see where it came from
        text = f"{type(err).__name__}: {text} (--traceback shows where)"
    print(f"fsseg {command}: error: {text}", file=sys.stderr)
    return code if code is not None else 2 if expected else 1


def run(argv: list[str]) -> int:
    """Run one ``fsseg`` command line; returns its exit status."""
    argv = list(argv)
    traceback = "--traceback" in argv or os.environ.get("FSSEG_TRACEBACK", "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in REMOVED:
        print(f"fsseg: {REMOVED[command]}", file=sys.stderr)
        return 2
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        print(f"fsseg: unknown command {command!r}{hint} (fsseg --help lists them)", file=sys.stderr)
        return 2
    module, _ = COMMANDS[command]
    try:
        main = importlib.import_module(module).main
        return int(main([command, *rest] if command in PASS_NAME else rest) or 0)
    except KeyboardInterrupt:
        print(f"fsseg {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if traceback:
            raise
        return _error(command, err)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the command line and exits with its status."""
    raise SystemExit(run(sys.argv[1:] if argv is None else argv))
