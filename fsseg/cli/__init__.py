"""The ``fsseg`` command: a dispatcher to one module per subcommand, each with ``main(argv) -> int``.

Only the standard library is imported here, so ``fsseg --help`` answers at once; a subcommand's module (and torch,
Lightning, diffusers with it) is imported when that subcommand runs. The subcommand modules never import this one.
An error ends the command with one line on stderr; ``--traceback`` or ``FSSEG_TRACEBACK=1`` shows the full
traceback instead. Exit statuses, the same for every command (`fsseg.interrupts`): 0 done, 1 a run that failed or
did nothing, 2 refused (bad input, an existing result, a folder another process writes), 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import sys

from fsseg.cli.noise import quiet_third_party
from fsseg.interrupts import Interrupted, sigterm_raises

# name -> (module with main(argv), one line of help). fit/validate/test receive their own name as argv[0].
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("fsseg.cli.trainer", "train a method on a benchmark (resumable checkpoints every 500 steps)"),
    "validate": ("fsseg.cli.trainer", "evaluate a checkpoint on the validation episodes"),
    "test": ("fsseg.cli.trainer", "evaluate a checkpoint on the published test episodes -> metrics.json"),
    "predict-images": ("fsseg.predict", "segment your own images from one (or K) annotated example(s)"),
    "evaluate-seeds": ("fsseg.seeds", "one test per protocol seed (data.seed 0..N-1), then mean and std"),
    "compare": ("fsseg.compare", "two test runs on identical episodes: paired mIoU difference and interval"),
    "report": ("fsseg.htmlreport", "an HTML report of one test run or of two (pictures, paired numbers)"),
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
        "results: every command prints where it wrote; an existing result is replaced only with --overwrite, and",
        "  only once the new one is complete; one command at a time writes a folder (a lock file names it).",
        "errors: one line; --traceback (or FSSEG_TRACEBACK=1) shows the full traceback.",
        "exit status: 0 done; 1 a run that failed or did nothing; 2 refused (bad input, an existing result, a",
        "  folder another process writes); 130 interrupted (SIGINT, Ctrl-C); 143 stopped by SIGTERM (fit saves a",
        "  resumable checkpoints/last.ckpt first).",
    ]
    return "\n".join(lines)


def _os_error_text(err: OSError) -> str:
    """``[Errno 17] File exists: 'x'`` as ``x: File exists (a file is where a folder is needed)``."""
    text = f"{err.filename}: {err.strerror}"
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        text += " (a file is where a folder is needed)"
    cache = os.environ.get("FSSEG_CACHE")
    if cache and os.path.abspath(str(err.filename)).startswith(os.path.abspath(cache)):
        text += f"; FSSEG_CACHE is {cache}"
    return text


def _error(command: str, err: BaseException) -> int:
    """One line on stderr; the exit status: the error's own ``exit_code``, 2 for bad input, else 1."""
    code = getattr(err, "exit_code", None)
    expected = code is not None or isinstance(err, USER_ERRORS)
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror and text.startswith("[Errno"):
        text = _os_error_text(err)  # the bare message of a failed mkdir/open: name the path first
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
    quiet_third_party()
    with sigterm_raises() as sigterms:
        try:
            main = importlib.import_module(module).main
            return int(main([command, *rest] if command in PASS_NAME else rest) or 0)
        except KeyboardInterrupt:
            print(f"fsseg {command}: interrupted (SIGINT)", file=sys.stderr)
            return 130
        except Interrupted as err:
            print(f"fsseg {command}: {err}", file=sys.stderr)
            return err.exit_code
        except SystemExit:
            # e.g. Lightning's SIGTERMException (exit code None) out of a Trainer that fsseg does not wrap
            if sigterms:
                print(f"fsseg {command}: stopped by SIGTERM", file=sys.stderr)
                return 143
            raise
        except Exception as err:
            if traceback:
                raise
            return _error(command, err)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the command line and exits with its status."""
    raise SystemExit(run(sys.argv[1:] if argv is None else argv))
