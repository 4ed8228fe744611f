import pytest

import nvsm.data.synth as synth
from nvsm.pipeline import ensure_synthetic


def test_built_in_dataset_is_generated_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("NVSM_DATA", str(tmp_path))
    real = synth.generate_synthetic_dataset

    def interrupted(out, **kwargs):
        real(out, **{**kwargs, "size": {"car": (1, 1)}, "categories": ("car",)})
        raise KeyboardInterrupt  # killed after writing files, before the rename

    monkeypatch.setattr(synth, "generate_synthetic_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic("tiny")
    assert not (tmp_path / "synthetic-tiny-seed0").exists()  # nothing half-written in place

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
