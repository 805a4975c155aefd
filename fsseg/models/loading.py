"""Where pretrained components come from: one path resolution and one offline-first loader for every method.

A ``source`` given in a config (``model.init_args.pretrained``, ``decoder``, ``prior``, ...) is looked up in order:

1. a package asset: a relative path starting with ``fsseg/`` resolves inside the installed ``fsseg`` package, so
   ``fsseg/assets/tiny-diffews`` works from any working directory;
2. the working directory (or an absolute path);
3. a Hugging Face hub id (``stabilityai/stable-diffusion-2-1``) in the local Hugging Face cache (``HF_HOME`` /
   ``HF_HUB_CACHE``).

Nothing is downloaded unless the module's ``allow_download`` init argument is true; then a hub id missing from the
cache is fetched into it (only the subfolder the component needs, one weights format). Components always load with
``from_pretrained`` from the resolved local folder (``local_files_only=True``), so a missing component is one clear
error naming the hub id and subfolder to download and where to put it, never a chain of network retries.
Checkpoints store the ``source`` as the user gave it; it is resolved again at every load.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

# weight files that duplicate a safetensors file (other formats, fp16 / EMA variants): not downloaded
_DUPLICATE_WEIGHTS = (".bin", ".ckpt", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".ot")
_VARIANTS = (".fp16.", ".non_ema.", ".ema.")


class MissingWeightsError(FileNotFoundError):
    """A pretrained component is not where the config says; the message says what to download and where."""


def package_dir() -> Path:
    import fsseg

    return Path(fsseg.__file__).resolve().parent


def local_path(source: str | Path) -> Path | None:
    """The local file or folder ``source`` names (package asset, then working directory), or None."""
    p = Path(source).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    parts = PurePosixPath(p.as_posix()).parts
    if parts and parts[0] == "fsseg":
        shipped = package_dir().joinpath(*parts[1:])
        if shipped.exists():
            return shipped
    return p.resolve() if p.exists() else None


def _looked_in(source: str) -> str:
    p = Path(source).expanduser()
    if p.is_absolute():
        return str(p)
    places = [str(Path.cwd() / p)]
    if PurePosixPath(p.as_posix()).parts[:1] == ("fsseg",):
        places.insert(0, str(package_dir().joinpath(*PurePosixPath(p.as_posix()).parts[1:])))
    return ", ".join(places)


def is_hub_id(source: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def download_selection(files: list[str], subfolder: str | None) -> list[str]:
    """The files of a hub repo listing that one component needs: its subfolder, one weights format, no variants."""
    prefix = f"{subfolder}/" if subfolder else ""
    mine = [f for f in files if f.startswith(prefix) and (subfolder or "/" not in f)]
    mine = [f for f in mine if not any(v in Path(f).name for v in _VARIANTS)]
    if any(f.endswith(".safetensors") for f in mine):
        mine = [f for f in mine if not f.endswith(_DUPLICATE_WEIGHTS)]
    return mine


def _download(repo_id: str, subfolder: str | None) -> None:
    from huggingface_hub import HfApi, snapshot_download

    try:
        wanted = download_selection(HfApi().list_repo_files(repo_id), subfolder)
        if wanted:
            print(
                f"fsseg: downloading {repo_id} {subfolder or ''} ({len(wanted)} files) into the Hugging Face cache",
                file=sys.stderr,
            )
            snapshot_download(repo_id, allow_patterns=wanted)
    except Exception as err:  # network, authentication, unknown repo: reported with the missing component
        raise MissingWeightsError(f"downloading {repo_id} {subfolder or ''} failed: {err}") from None


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None


def _fetch_hint(repo_id: str, subfolder: str | None, local_dir: str) -> str:
    include = f" --include '{subfolder}/*'" if subfolder else ""
    return f"`hf download {repo_id}{include} --local-dir {local_dir}`"


def locate(
    source: str,
    subfolder: str | None,
    what: str,
    *,
    reference: str,
    key: str | None,
    allow_download: bool = False,
) -> Path:
    """The local folder holding ``source``'s ``subfolder`` (see the module docstring for the lookup order).

    ``reference`` is the hub id whose layout is expected (named in the error), ``key`` the config key of ``source``
    (None when the user cannot point it at a folder).
    """
    from huggingface_hub import constants

    sub = f"/{subfolder}" if subfolder else ""
    found = local_path(source)
    if found is not None:
        folder = found / subfolder if subfolder else found
        if folder.is_dir():
            return folder
        raise MissingWeightsError(
            f"cannot load the {what}: {str(found)!r} has no subfolder {subfolder!r}. Expected the layout of "
            f"{reference}; download that part with {_fetch_hint(reference, subfolder, str(found))}."
        )
    if not is_hub_id(source):
        raise MissingWeightsError(
            f"cannot load the {what}: {key} = {source!r} is neither an existing folder (looked in "
            f"{_looked_in(source)}) nor a Hugging Face hub id. Download it with "
            f"{_fetch_hint(reference, subfolder, '<dir>')} and set {key}: <dir>."
        )
    snapshot = _cached_snapshot(source)
    if allow_download and (snapshot is None or not (snapshot / (subfolder or "")).is_dir()):
        _download(source, subfolder)
        snapshot = _cached_snapshot(source)
    if snapshot is not None and (snapshot / (subfolder or "")).is_dir():
        return snapshot / subfolder if subfolder else snapshot
    state = "downloads are off" if not allow_download else "the download did not provide it"
    include = f" --include '{subfolder}/*'" if subfolder else ""
    folder_way = (
        f", or into a folder with {_fetch_hint(source, subfolder, '<dir>')} and set {key}: <dir>"
        if key
        else ""
    )
    raise MissingWeightsError(
        f"cannot load the {what}: {source}{sub} is not a folder (looked in {_looked_in(source)}) and not in the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}); {state}. Download it into the cache with "
        f"`hf download {source}{include}`{folder_way}; or set model.init_args.allow_download: true to let fsseg "
        f"download it."
    )


def load_component(
    cls,
    source: str,
    subfolder: str | None,
    what: str,
    *,
    reference: str,
    key: str,
    allow_download: bool = False,
    **kwargs,
):
    """``cls.from_pretrained`` of the located folder, offline (``local_files_only=True``)."""
    folder = locate(
        source,
        subfolder,
        f"{what} ({cls.__name__})",
        reference=reference,
        key=key,
        allow_download=allow_download,
    )
    return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)


def resolve_file(path: str | None) -> str | None:
    """A weights file named in a config: package asset, then working directory; other values pass through."""
    if path is None:
        return None
    found = local_path(path)
    return str(found) if found is not None else path
