"""``CropImages``: subsets, concatenations and mirrors of crops are index operations that read
what a tensor holding the same crops would give, and crops can live in a memory-mapped file."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from nvsm.data.datasets import load_dataset
from nvsm.train.cropset import CropImages, CropSet, build_cropset, flip_batch


def _crops(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 4, 6), dtype=torch.uint8, generator=g)


def test_indexing_follows_torch() -> None:
    ref = _crops(5, 0)
    images = CropImages.of(ref)
    assert images.shape == ref.shape and len(images) == 5
    for index in (2, -1, slice(1, 4), slice(None, None, 2), [4, 0, 0],
                  torch.tensor([3, 1]), torch.tensor([True, False, True, False, False])):
        assert torch.equal(images[index], ref[index]), index
    with pytest.raises(IndexError):
        images[5]
    with pytest.raises(IndexError):
        images[[0, 7]]


def test_subset_concat_and_mirror_read_as_the_materialised_crops() -> None:
    a, b = _crops(4, 1), _crops(3, 2)
    left, right = CropImages.of(a), CropImages.of(b)
    picked = torch.tensor([3, 0, 2])
    rows = torch.tensor([1, 0])
    mixed = CropImages.concat([right, left.subset(picked).mirrored(), left, right.subset(rows)])
    expected = torch.cat([b, a[picked].flip(-1), a, b[rows]])
    assert torch.equal(mixed[:], expected)
    assert len(mixed.sources) == 2  # the shared sources are not repeated, nor copied
    assert mixed.sources[0] is b and mixed.sources[1] is a
    twice = mixed.mirrored().mirrored().subset(torch.arange(len(mixed)).flip(0))
    assert torch.equal(twice[:], expected.flip(0))
    assert torch.equal(mixed[torch.tensor([4, 0, 9])], expected[[4, 0, 9]])
    assert torch.equal(mixed[8], expected[8])


def test_a_mirrored_cropset_matches_flip_batch() -> None:
    n = 3
    images = _crops(n, 3)
    k = torch.tensor([[100.0, 0, 2.0], [0, 100.0, 1.5], [0, 0, 1]], dtype=torch.float64)
    data = CropSet(
        images=CropImages.of(images),
        k=k.repeat(n, 1, 1),
        poses=torch.tensor([[0.3, 0.1, 0.2, 5.0]] * n, dtype=torch.float64),
        weights=torch.ones(n),
        categories=["car"] * n,
        uids=list("abc"),
        occlusion_levels=torch.zeros(n, dtype=torch.long),
        reference_distance=torch.full((n,), 5.0, dtype=torch.float64),
        image_box=torch.tensor([[-2.0, 0.5, 1.5, 2.0]] * n, dtype=torch.float64),
    )
    mirrored = data.mirrored()
    f_images, f_k, f_poses, f_box = flip_batch(
        images, data.k, data.poses, data.image_box, torch.ones(n, dtype=torch.bool)
    )
    assert torch.equal(mirrored.images[:], f_images)
    assert torch.equal(mirrored.k, f_k) and torch.equal(mirrored.poses, f_poses)
    assert torch.equal(mirrored.image_box, f_box)
    # W = 6: x -> 5 - x, so the box's x range [-2, 1.5] becomes [3.5, 7].
    assert f_box[0].tolist() == [3.5, 0.5, 7.0, 2.0]
    assert torch.equal(mirrored.mirrored().image_box, data.image_box)
    assert mirrored.images.sources[0] is images  # no copy
    both = CropSet.concat([data, mirrored]).subset([4, 1])
    assert torch.equal(both.images[:], torch.stack([f_images[1], images[1]]))


def test_crops_on_disk_equal_those_in_memory_and_leave_no_file(
    tiny_synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    records = load_dataset("synthetic", tiny_synthetic, split="train").records
    in_memory = build_cropset(records, crop_scale=0.2, crop_size=(64, 120), show_progress=False)
    on_disk = build_cropset(records, crop_scale=0.2, crop_size=(64, 120), show_progress=False,
                            on_disk=True)
    assert torch.equal(on_disk.images[:], in_memory.images[:])
    assert torch.equal(on_disk.k, in_memory.k) and on_disk.uids == in_memory.uids
    # The crops are in an anonymous file, mapped: nothing is listed in the folder.
    assert list(tmp_path.iterdir()) == []
    source = on_disk.images.sources[0]
    maps = Path("/proc/self/maps")
    if maps.is_file():  # Linux: the crops are mapped from the file, deleted at once
        start = source.data_ptr()
        mapped = []
        for line in maps.read_text().splitlines():
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= start < high:
                mapped.append(line)
        assert len(mapped) == 1 and str(tmp_path) in mapped[0] and "(deleted)" in mapped[0], mapped


def test_an_unreadable_image_stops_the_progress_bar(tiny_synthetic: Path, tmp_path: Path) -> None:
    # rich's ``track`` left its bar redrawing (a live thread) after an error in the loop for as
    # long as the error was held: while the command printed its message, and in tests as long
    # as CliRunner's result (which keeps the error), into the output of later commands.
    import dataclasses
    import threading

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    records = load_dataset("synthetic", tiny_synthetic, split="train").records
    records = [records[0], dataclasses.replace(records[1], image_path=broken)]
    with pytest.raises(ValueError, match=r"broken\.jpg") as caught:
        build_cropset(records, crop_scale=0.2, crop_size=(64, 120), show_progress=True)
    assert caught.tb is not None  # the error is still held, as while a command reports it
    bars = [t for t in threading.enumerate() if type(t).__name__ == "_RefreshThread"]
    for bar in bars:  # a stopped bar's thread ends at its next tick (rich does not join it)
        bar.join(timeout=5)
    assert not [bar for bar in bars if bar.is_alive()]


# A file-size limit (RLIMIT_FSIZE) is a full disk as far as a writer can tell: the reservation
# fails with EFBIG (Python ignores the SIGXFSZ that comes with it). Run in a child so that the
# limit binds nothing else; "zeros" takes os.posix_fallocate away, as on macOS and Windows.
_FULL_DISK_CHILD = """
import os, resource, sys, tempfile
import numpy as np
from pathlib import Path
from nvsm.train.cropset import crop_storage, mapped_empty

reserve, folder = sys.argv[1], Path(sys.argv[2])
if reserve == "zeros":
    del os.posix_fallocate
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
small = crop_storage(10, (128, 240), on_disk=True)  # 0.9 MB: fits under the limit
small[-1] = 7
assert int(small.sum()) == 7 * 3 * 128 * 240
for make in (lambda: crop_storage(1000, (128, 240), on_disk=True),
             lambda: mapped_empty((10, 128, 16, 30), np.dtype(np.float32), folder, "the maps")):
    try:
        make()
    except ValueError as exc:
        print(exc)
"""


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="needs a Linux/BSD host to "
                    "compare posix_fallocate with the written-zeros reservation")
@pytest.mark.parametrize("reserve", ["posix_fallocate", "zeros"])
def test_storage_that_does_not_fit_its_folder_is_named(reserve: str, tmp_path: Path) -> None:
    # A sparse file that cannot grow failed on writing a crop, as a SIGBUS that killed the
    # process without a word; the room is now reserved first, with or without posix_fallocate.
    crops, maps = tmp_path / "tmp", tmp_path / "run"
    crops.mkdir()
    maps.mkdir()
    done = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, reserve, str(maps)],
                          env={**os.environ, "TMPDIR": str(crops)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"no room for 1000 crops (92.2 MB) in the temporary folder {crops}: File too large; "
        "set TMPDIR to a folder with more free space",
        f"no room for the maps (2.5 MB) in {maps}: File too large; free some space there",
    ]
    assert list(crops.iterdir()) == [] and list(maps.iterdir()) == []
