"""Outputs built aside and moved into place whole also work when ``--out`` is a mount point:
nothing can be renamed onto a mount point or across its boundary, nor can it be removed."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvsm.data.pascal3d import load_pascal3d
from nvsm.data.splits import few_shot_splits, write_few_shot_splits
from nvsm.data.synth import MANIFEST_NAME, generate_synthetic_dataset
from nvsm.io import staged_writes


def _inside(path: str | os.PathLike[str], mount: Path) -> bool:
    resolved = Path(os.path.abspath(path))
    return resolved == mount or mount in resolved.parents


@pytest.fixture
def mount_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An existing folder that behaves as a mount point for renames and removal, as Linux
    does: EXDEV for a rename across its boundary (onto it included), EBUSY for removing it."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_rename, real_replace, real_rmdir = os.rename, os.replace, os.rmdir

    def crossing(src: Any, dst: Any) -> bool:
        return Path(os.path.abspath(dst)) == mount or _inside(src, mount) != _inside(dst, mount)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if crossing(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_rename(src, dst, *args, **kwargs)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if crossing(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_replace(src, dst, *args, **kwargs)

    def rmdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("dir_fd") is None and Path(os.path.abspath(path)) == mount:
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rmdir", rmdir)
    yield mount


def test_the_stand_in_mount_point_refuses_what_a_mount_point_refuses(mount_point: Path) -> None:
    outside = mount_point.parent / "outside"
    outside.mkdir()
    with pytest.raises(OSError, match="cross-device"):
        outside.rename(mount_point / "moved")
    with pytest.raises(OSError, match="cross-device"):
        outside.rename(mount_point)
    with pytest.raises(OSError, match="busy"):
        mount_point.rmdir()
    (mount_point / "a").mkdir()
    (mount_point / "a").rename(mount_point / "b")  # within it is fine
    assert [p.name for p in mount_point.iterdir()] == ["b"]


def test_synthetic_dataset_into_a_mount_point(mount_point: Path) -> None:
    # The dataset was built beside --out and renamed onto it: EXDEV, after all the rendering.
    summary = generate_synthetic_dataset(mount_point, {"car": (1, 1)}, categories=["car"],
                                         occlusion=False)
    assert summary.out == mount_point
    assert (mount_point / MANIFEST_NAME).is_file()
    assert len(list((mount_point / "Images" / "car_imagenet").iterdir())) == 2
    assert not [p for p in mount_point.iterdir() if p.name.startswith(".")]  # no staging left
    assert sorted(p.name for p in mount_point.parent.iterdir()) == ["mnt"]
    generate_synthetic_dataset(mount_point, {"car": (2, 1)}, categories=["car"],
                               occlusion=False, overwrite=True)
    assert len(list((mount_point / "Images" / "car_imagenet").iterdir())) == 3
    assert not [p for p in mount_point.iterdir() if p.name.startswith(".")]


def test_few_shot_splits_into_a_mount_point(tmp_path: Path, mount_point: Path) -> None:
    root = tmp_path / "syn"
    generate_synthetic_dataset(root, {"car": (4, 1)}, categories=["car"], occlusion=False)
    train = load_pascal3d(root, ["car"], split="train").records
    test = load_pascal3d(root, ["car"], split="val").records
    splits = list(few_shot_splits(train, test, n_labelled=(2,), seed=0).values())
    folders = write_few_shot_splits(splits, mount_point)
    assert [f.relative_to(mount_point).parts[0] for f in folders] == ["car"]
    assert len((folders[0] / "labelled.txt").read_text().split()) == 2
    write_few_shot_splits(splits, mount_point)  # again: each split folder is swapped in
    assert sorted(p.name for p in mount_point.iterdir()) == ["car"]


def test_staged_writes_into_a_mount_point_keep_it_on_failure(mount_point: Path) -> None:
    with pytest.raises(RuntimeError, match="stopped"), staged_writes(mount_point) as staging:
        (staging / "half.txt").write_text("x")
        raise RuntimeError("stopped")
    assert mount_point.is_dir() and not list(mount_point.iterdir())
    with staged_writes(mount_point, last="done.json") as staging:
        (staging / "a.txt").write_text("a")
        (staging / "done.json").write_text("{}")
    assert sorted(p.name for p in mount_point.iterdir()) == ["a.txt", "done.json"]
