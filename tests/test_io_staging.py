"""Outputs built aside and moved into place whole also work when ``--out`` is a mount point:
nothing can be renamed onto a mount point or across its boundary, nor can it be removed."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
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



def _can_bind_mount() -> bool:
    """Whether this host lets an unprivileged process make mount points of its own (a user and
    mount namespace, ``unshare -rm``); containers and hardened kernels may not."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0"', folder],
                               capture_output=True, timeout=30)
    return probe.returncode == 0


# Runs in a mount namespace where both arguments are bind mounts: a dataset generated (and
# generated again over itself) with the first as --out, split lists written with the second.
_INTO_MOUNT_POINTS = """
import sys
from pathlib import Path
from nvsm.data.pascal3d import load_pascal3d
from nvsm.data.splits import few_shot_splits, write_few_shot_splits
from nvsm.data.synth import generate_synthetic_dataset

data, lists = Path(sys.argv[1]), Path(sys.argv[2])
for overwrite in (False, True):
    generate_synthetic_dataset(data, {"car": (4, 1)}, categories=["car"], occlusion=False,
                               overwrite=overwrite)
train = load_pascal3d(data, ["car"], split="train").records
test = load_pascal3d(data, ["car"], split="val").records
splits = list(few_shot_splits(train, test, n_labelled=(2,), seed=0).values())
for _ in range(2):
    write_few_shot_splits(splits, lists)
"""


@pytest.mark.skipif(not _can_bind_mount(), reason="this host lets no unprivileged process mount "
                    "(unshare -rm); the stand-in mount point above covers the same cases")
def test_real_mount_points(tmp_path: Path) -> None:
    # The same cases as above on real bind mounts, where the kernel itself refuses renames
    # across the boundary: what the stand-in is checked against.
    names = ["data_src", "lists_src", "data", "lists"]
    for name in names:
        (tmp_path / name).mkdir()
    data_src, lists_src, data, lists = (tmp_path / n for n in names)
    script = ('mount --bind "$1" "$3" && mount --bind "$2" "$4" && '
              'mv "$3" "$5" 2>/dev/null && exit 3; exec "$6" -c "$7" "$3" "$4"')
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(data_src), str(lists_src), str(data),
         str(lists), str(tmp_path / "moved"), sys.executable, _INTO_MOUNT_POINTS],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # 3: the mount point could be renamed
    assert (data_src / MANIFEST_NAME).is_file()
    assert len(list((data_src / "Images" / "car_imagenet").iterdir())) == 5
    assert not [p for p in data_src.iterdir() if p.name.startswith(".")]  # no staging left
    assert sorted(p.name for p in lists_src.iterdir()) == ["car"]
    labelled = lists_src / "car" / "n2_stratified_seed0" / "labelled.txt"
    assert len(labelled.read_text().split()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
