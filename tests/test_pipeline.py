import dataclasses
from pathlib import Path

import pytest
import torch

import nvsm.data.synth as synth
import nvsm.render.rasterizer
from nvsm.config import RunConfig
from nvsm.pipeline import check_run_config, ensure_synthetic, resolve_device


def test_built_in_dataset_is_generated_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("NVSM_DATA", str(tmp_path))
    real = synth.generate_synthetic_dataset

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the images, while writing the CAD models

    monkeypatch.setattr(synth, "write_off", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic("tiny")
    assert not (tmp_path / "synthetic-tiny-seed0").exists()  # nothing half-written in place
    assert list(tmp_path.iterdir()) == []  # nor left beside it
    monkeypatch.undo()
    monkeypatch.setenv("NVSM_DATA", str(tmp_path))

    def small(out, **kwargs):
        return real(out, **{**kwargs, "size": {"car": (1, 1)}, "categories": ("car",)})

    monkeypatch.setattr(synth, "generate_synthetic_dataset", small)
    root = ensure_synthetic("tiny")
    assert (root / synth.MANIFEST_NAME).is_file()
    assert ensure_synthetic("tiny") == root  # found, not regenerated
    assert not list(tmp_path.glob(f".{root.name}.partial-*"))


def test_foreign_folder_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setenv("NVSM_DATA", str(tmp_path))
    (tmp_path / "synthetic-tiny-seed0").mkdir()
    (tmp_path / "synthetic-tiny-seed0" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=r"holds no synthetic_manifest\.json"):
        ensure_synthetic("tiny")
    assert (tmp_path / "synthetic-tiny-seed0" / "mine.txt").read_text() == "user data"


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from nvsm.io import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_writes_are_utf8_and_leave_no_folders_on_failure(tmp_path):
    import os
    import subprocess
    import sys

    from nvsm.io import atomic_open

    # Under a C locale without UTF-8 mode, text went out in ASCII: the HTML report (which
    # declares UTF-8) failed with UnicodeEncodeError on its π.
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = ("import sys; from nvsm.io import atomic_write_text; "
            "atomic_write_text(sys.argv[1], '\\u03c0')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.txt")], env=env, check=True)
    assert (tmp_path / "p.txt").read_bytes() == "π".encode()
    # A write that fails removes the folders it made for its file (they were left behind).
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "new" / "sub" / "x.txt") as fh:
        fh.write("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_output_folders_are_checked_for_writing(tmp_path):
    from nvsm.io import check_output_folder

    check_output_folder(tmp_path / "a" / "b")  # can be made
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind
    # /proc takes no files, even from root: the command failed only in its last write.
    with pytest.raises(ValueError, match="cannot write into /proc/nvsm: /proc: "):
        check_output_folder("/proc/nvsm")


def test_json_files_are_strict_json(tmp_path):
    # A round that accepted nothing wrote "acc_pi_6": NaN, which JSON.parse refuses.
    import json
    import math

    from nvsm.io import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"a": math.nan, "b": [1.5, -math.inf], "c": {"d": 2}})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": {"d": 2}}


def test_staged_writes_move_in_whole_or_not_at_all(tmp_path, monkeypatch):
    from nvsm.io import staged_writes

    moved = []
    real_rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda p, t: moved.append(p.name) or real_rename(p, t))
    out = tmp_path / "out"
    with staged_writes(out, last="info.json") as staged:
        for name in ("info.json", "b.csv", "a.csv"):
            (staged / name).write_text(name)
        (staged / "pictures").mkdir()
        (staged / "pictures" / "0.png").write_bytes(b"png")
        assert list(out.iterdir()) == [staged]  # nothing in place before the end
    assert moved == ["a.csv", "b.csv", "pictures", "info.json"]  # the named one last
    assert sorted(p.name for p in out.iterdir()) == ["a.csv", "b.csv", "info.json", "pictures"]
    assert (out / "pictures" / "0.png").read_bytes() == b"png"
    # An error part way: a folder that was there keeps what it had; one it made is removed.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("mine")
    for target in (tmp_path / "kept", tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt), staged_writes(target) as staged:
            (staged / "half.csv").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine.txt"]
    assert not (tmp_path / "new").exists()


def test_a_device_this_machine_lacks_is_named_before_any_work(monkeypatch):
    # These reached torch inside the run: a RuntimeError traceback after the run folder existed.
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("gpu", "cuda:x", "xpu"):
        with pytest.raises(ValueError, match=f"device: expected auto, cpu, cuda, cuda:N or mps, "
                                             f"got '{name}'"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device: 'cuda' is not available here \(0 CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"device: 'cuda:2' is not available here \(2 CUDA"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device: 'mps' is not available here"):
        resolve_device("mps")


def test_check_run_config_names_what_cannot_run_here(monkeypatch):
    base = RunConfig()
    assert check_run_config(base) == resolve_device("auto")
    bad = dataclasses.replace(base, model=dataclasses.replace(base.model, backbone="vgg"))
    with pytest.raises(ValueError, match=r"model\.backbone: expected one of efficientnet-lite0 "):
        check_run_config(bad)
    p3d = dataclasses.replace(base, model=dataclasses.replace(base.model, rasterizer="pytorch3d"))
    monkeypatch.setattr(nvsm.render.rasterizer, "pytorch3d_available", lambda: False)
    with pytest.raises(ValueError, match=r"model\.rasterizer: rasterizer 'pytorch3d' was"):
        check_run_config(p3d)


def test_load_splits_names_an_empty_side_and_occluded_training_images(tiny_synthetic, tmp_path):
    # An empty test level failed only after training ("CropSet.concat needs at least one set"),
    # and an occluded test image that is also a training image was scored without a word.
    import shutil

    from nvsm.config import load_config
    from nvsm.pipeline import load_splits

    root = tmp_path / "data"
    shutil.copytree(tiny_synthetic, root)
    train_list = root / "Image_sets" / "car_imagenet_train.txt"
    val_list = root / "Image_sets" / "car_imagenet_val.txt"
    config = load_config(None, [f"data.root={root}"])
    assert len(load_splits(config, (0, 1)).test[1]) == 4
    val_ids = val_list.read_text().split()
    val_list.write_text("")
    with pytest.raises(ValueError, match=r"no test records at occlusion level\(s\) \[0\]: "
                                         r"the test list\(s\) .*car_imagenet_val\.txt"):
        load_splits(config, (0,))
    # One val image moved to the training list: its occluded copies are training images.
    val_list.write_text("".join(f"{i}\n" for i in val_ids[1:]))
    train_list.write_text(train_list.read_text() + f"{val_ids[0]}\n")
    with pytest.raises(ValueError, match=rf"1 occluded test image\(s\) are also training "
                                         rf"images .*: {val_ids[0]}"):
        load_splits(config, (0, 1))
    train_list.write_text("")
    with pytest.raises(ValueError, match=r"no training records of car in .*train\.txt"):
        load_splits(config, (0,))
