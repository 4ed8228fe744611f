"""The synthetic PASCAL3D+-layout generator: layout, file formats, determinism, geometry."""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import typer
from PIL import Image
from scipy.spatial import cKDTree
from skimage.draw import polygon as draw_polygon
from typer.testing import CliRunner

from nvsm.data.shapes import CATEGORY_BUILDERS, ROLES, category_subtypes
from nvsm.data.synth import (
    OCCLUSION_LEVELS,
    OWNER_LOCK,
    SYNSETS,
    generate_synthetic_dataset,
    render_processes,
    synth_command,
)
from nvsm.data.synth_render import BackgroundBank, RenderMesh, ViewPose, rasterize
from nvsm.data.writers import (
    mat_bytes,
    npz_bytes,
    occluded_npz_bytes,
    pascal3d_record_bytes,
    write_occluded_npz,
    write_pascal3d_record,
)
from nvsm.mesh import read_off
from nvsm.pose import mirror_pose, project_pascal3d
from nvsm.render import default_rasterizer

COUNTS = {"car": (2, 1), "aeroplane": (1, 1), "chair": (1, 1)}
CATS = tuple(COUNTS)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    summary = generate_synthetic_dataset(out, COUNTS, seed=0)
    assert summary.counts == {c: {"train": n[0], "val": n[1]} for c, n in COUNTS.items()}
    return out


def _ids(root: Path, cat: str, split: str) -> list[str]:
    return (root / "Image_sets" / f"{cat}_imagenet_{split}.txt").read_text().split()


def _load_record(root: Path, cat: str, image_id: str) -> np.ndarray:
    """record.objects[0] in the plain ``loadmat`` indexing PASCAL3D+ users write."""
    rec = scipy.io.loadmat(root / "Annotations" / f"{cat}_imagenet" / f"{image_id}.mat")["record"]
    return rec


def _viewpoint(obj: np.ndarray) -> dict[str, float]:
    vp = obj["viewpoint"][0, 0]
    return {k: float(vp[k][0, 0]) for k in vp.dtype.names}


# ----------------------------------------------------------------------------- layout & format
def test_layout_and_mat_fields(dataset: Path) -> None:
    for cat, (n_train, n_val) in COUNTS.items():
        train, val = _ids(dataset, cat, "train"), _ids(dataset, cat, "val")
        assert len(train) == n_train and len(val) == n_val and not set(train) & set(val)
        assert all(i.startswith(SYNSETS[cat] + "_") for i in train + val)
        n_cad = len(CATEGORY_BUILDERS[cat])
        assert sorted(p.name for p in (dataset / "CAD" / cat).glob("*.off")) == [
            f"{i:02d}.off" for i in range(1, n_cad + 1)]
        for image_id in train + val:
            image = dataset / "Images" / f"{cat}_imagenet" / f"{image_id}.JPEG"
            with Image.open(image) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                w, h = im.size
            rec = _load_record(dataset, cat, image_id)
            assert rec.dtype.names is not None  # a MATLAB struct: named fields
            for name in ("filename", "folder", "imgsize", "database", "objects"):
                assert name in rec.dtype.names
            assert rec["filename"][0, 0][0] == f"{image_id}.JPEG"
            assert rec["folder"][0, 0][0] == f"{cat}_imagenet"
            assert rec["imgsize"][0, 0].ravel().tolist() == [w, h, 3]
            objs = rec["objects"][0, 0]
            assert objs.shape == (1, 1)
            obj = objs[0, 0]
            for name in ("class", "bbox", "truncated", "occluded", "difficult", "cad_index",
                         "viewpoint"):
                assert name in obj.dtype.names
            assert obj["class"][0] == cat
            assert 1 <= obj["cad_index"][0, 0] <= n_cad
            assert obj["truncated"][0, 0] == 0 and obj["difficult"][0, 0] == 0
            vp = _viewpoint(obj)
            assert set(vp) >= {"azimuth", "elevation", "theta", "distance", "focal", "px", "py",
                               "viewport", "azimuth_coarse", "elevation_coarse"}
            assert vp["focal"] == 1.0 and vp["viewport"] == 3000.0
            assert 0.0 <= vp["azimuth"] < 360.0 and -90.0 <= vp["elevation"] <= 90.0
            assert abs(vp["theta"]) <= 15.0 and vp["distance"] > 1.0
            # bbox: 1-based inclusive, the tight box of the saved mask.
            mask = np.asarray(Image.open(dataset / "Masks" / f"{cat}_imagenet" /
                                         f"{image_id}.png")) > 127
            ys, xs = np.nonzero(mask)
            box = obj["bbox"][0].tolist()
            assert box == [xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1]
            assert min(box[0], box[1]) >= 1 and box[2] <= w and box[3] <= h
    manifest = (dataset / "synthetic_manifest.json").read_text()
    assert '"seed": 0' in manifest and '"generator_version"' in manifest


def test_render_processes_never_exceed_the_cpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # --workers 100000 started a process per queued chunk until the memory ran out.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert render_processes(100_000, 400) == 3
    assert render_processes(2, 400) == 2
    assert render_processes(8, 63) == 1  # too few images to pay for starting workers
    with pytest.raises(ValueError, match="workers: expected an integer >= 1, got 0"):
        generate_synthetic_dataset(tmp_path / "w", {"car": (1, 0)}, categories=["car"], workers=0)
    assert not (tmp_path / "w").exists()


def test_fixed_seed_identical_bytes_and_seeds_differ(dataset: Path, tmp_path: Path) -> None:
    again = generate_synthetic_dataset(tmp_path / "b", COUNTS, seed=0, workers=1)
    assert _hashes(dataset) == _hashes(again.out)
    other = generate_synthetic_dataset(tmp_path / "c", {"car": (1, 0)}, seed=1, categories=["car"],
                                       occlusion=False)
    a = (dataset / "Images/car_imagenet" / f"{SYNSETS['car']}_100001.JPEG").read_bytes()
    b = (other.out / "Images/car_imagenet" / f"{SYNSETS['car']}_100001.JPEG").read_bytes()
    assert a != b


def test_encoders_are_deterministic(tmp_path: Path) -> None:
    rec = {"record": {"filename": "x.JPEG", "objects": {"class": "car"}}}
    assert mat_bytes(rec) == mat_bytes(rec)
    assert b"Created on" not in mat_bytes(rec)[:116]
    arrays = {"source": np.array("x"), "mask": np.eye(3, dtype=np.uint8)}
    assert npz_bytes(arrays) == npz_bytes(arrays)
    # Equal in another process too, with another string-hash seed and another second on the
    # clock (a dict or set order, or a timestamp, would differ there).
    here = hashlib.sha256(mat_bytes(rec) + npz_bytes(arrays)).hexdigest()
    code = ("import hashlib, numpy as np; from nvsm.data.writers import mat_bytes, npz_bytes; "
            f"rec = {rec!r}; "
            "arrays = {'source': np.array('x'), 'mask': np.eye(3, dtype=np.uint8)}; "
            "print(hashlib.sha256(mat_bytes(rec) + npz_bytes(arrays)).hexdigest())")
    time.sleep(2)  # zip and MATLAB headers keep 2-second and 1-second times
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True)
        assert run.stdout.strip() == here
    # The file writers (used by the reader tests) are built on the same encoders.
    obj = {"class": "car", "bbox": np.array([1.0, 2.0, 3.0, 4.0]), "viewpoint": {"azimuth": 1.0}}
    mat = write_pascal3d_record(tmp_path / "a.mat", "a.JPEG", [obj], imgsize=(4, 5, 3),
                                folder="car_imagenet")
    assert mat.read_bytes() == pascal3d_record_bytes("a.JPEG", [obj], imgsize=(4, 5, 3),
                                                     folder="car_imagenet")
    assert b"Created on" not in mat.read_bytes()[:116]
    mask = np.eye(4, dtype=np.uint8) * 255
    args = ("x", mask, mask > 0, [0, 4, 0, 4, 4, 4], np.zeros((0, 6)))
    npz = write_occluded_npz(tmp_path / "a.npz", *args, level=np.int64(2))
    assert npz.read_bytes() == occluded_npz_bytes(*args, level=np.int64(2))
    with np.load(npz) as data:
        assert list(data) == ["source", "mask", "occluder_mask", "box", "occluder_box", "level"]
        assert data["occluder_box"].shape == (0, 6) and int(data["level"]) == 2


def test_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(tmp_path, {"car": (1, 0)}, categories=["car"])
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(tmp_path, {"car": (1, 0)}, categories=["car"], overwrite=True)
    with pytest.raises(ValueError, match="bicycle"):
        generate_synthetic_dataset(tmp_path / "x", "tiny", categories=["bicycle"])


def test_a_failed_overwrite_keeps_the_earlier_dataset(tmp_path: Path, monkeypatch) -> None:
    # --overwrite deleted the earlier dataset first, so a bad option or an interruption lost
    # it; a bad --seed, --backgrounds or --out also left an empty folder behind.
    import nvsm.data.synth as synth

    out = tmp_path / "syn"
    generate_synthetic_dataset(out, {"car": (1, 1)}, categories=["car"])
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    bad_bg = tmp_path / "bg"
    bad_bg.mkdir()
    (bad_bg / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"background photo .*broken\.jpg cannot be read"):
        generate_synthetic_dataset(out, {"car": (1, 1)}, categories=["car"], overwrite=True,
                                   backgrounds=bad_bg)
    with pytest.raises(ValueError, match="seed: expected an integer >= 0, got -1"):
        generate_synthetic_dataset(out, {"car": (1, 1)}, seed=-1, categories=["car"],
                                   overwrite=True)
    monkeypatch.setattr(synth, "write_off", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        generate_synthetic_dataset(out, {"car": (2, 1)}, categories=["car"], overwrite=True)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg", "syn"]  # no partial left
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        generate_synthetic_dataset(tmp_path / "file" / "syn", {"car": (1, 1)},
                                   categories=["car"])
    # A successful overwrite replaces it whole.
    generate_synthetic_dataset(out, {"car": (2, 1)}, categories=["car"], overwrite=True)
    assert len(list((out / "Images" / "car_imagenet").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg", "file", "syn"]


def _staging(folder: Path, lock: bool) -> Path:
    """A staging folder as a generation leaves it, with its (unheld) owner lock or without."""
    (folder / "out" / "Images").mkdir(parents=True)
    if lock:
        (folder / OWNER_LOCK).touch()
    return folder


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: such folders are only named")
def test_staging_folders_of_killed_generations_are_removed(tmp_path: Path) -> None:
    # A generation killed by kill -9 left its hidden staging folder inside --out (an existing
    # folder), and every later run refused --out as "not empty" while `ls` showed nothing;
    # beside a missing --out it left a partial dataset behind.
    out = tmp_path / "syn"
    inside = _staging(out / ".partial-k1ll3d00", lock=True)
    beside = _staging(tmp_path / ".syn.partial-k1ll3d01", lock=True)
    other = _staging(tmp_path / ".syn2.partial-k1ll3d02", lock=True)  # another --out's
    generate_synthetic_dataset(out, {"car": (1, 0)}, categories=["car"], occlusion=False)
    assert not inside.exists() and not beside.exists() and other.exists()
    assert (out / "synthetic_manifest.json").is_file()
    assert not list(out.glob(".*"))


def test_other_staging_folders_are_named_with_what_to_do(tmp_path: Path) -> None:
    # A staging folder no killed generation is known to have left (one running now, or one
    # from another command or an older nvsm) stays, but the error says what it is.
    out = tmp_path / "syn"
    old = _staging(out / ".partial-0ld00000", lock=False)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=(
                rf"^{re.escape(str(out))} is not empty: it holds {re.escape(str(old))}, the "
                r"hidden staging folder of an nvsm command that was interrupted or is running "
                r"now: delete it \(unless")):
            generate_synthetic_dataset(out, {"car": (1, 0)}, categories=["car"],
                                       overwrite=overwrite)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError,
                       match=rf"pass --overwrite .*\(it also holds {re.escape(str(old))}, "):
        generate_synthetic_dataset(out, {"car": (1, 0)}, categories=["car"])
    assert old.is_dir()


@pytest.mark.skipif(sys.platform == "win32", reason="no flock")
def test_a_running_generation_holds_its_staging_folder(tmp_path: Path, monkeypatch) -> None:
    import fcntl

    import nvsm.data.synth as synth

    out = tmp_path / "syn"
    live = _staging(out / ".partial-l1ve0000", lock=True)
    with open(live / OWNER_LOCK) as held:  # as the generation writing there holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match=rf"it holds {re.escape(str(live))}, .* "
                                                  rf"into {re.escape(str(out))} running now"):
            generate_synthetic_dataset(out, {"car": (1, 0)}, categories=["car"])
    assert live.is_dir()
    # A generation holds the lock of its own staging folder while it renders.
    render, locked = synth._render_dataset, []

    def spy(build: Path, *args: Any, **kwargs: Any) -> int:
        with open(build.parent / OWNER_LOCK) as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                locked.append(True)
        return render(build, *args, **kwargs)

    monkeypatch.setattr(synth, "_render_dataset", spy)
    generate_synthetic_dataset(tmp_path / "fresh", {"car": (1, 0)}, categories=["car"])
    assert locked == [True]


def test_background_folder(tmp_path: Path) -> None:
    folder = tmp_path / "bg"
    folder.mkdir()
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(folder / "flat.png")
    # A folder whose name ends like an image's is searched, not taken for a photo (it was,
    # and failed deep inside rendering, or was named as an unreadable photo).
    (folder / "more.jpg").mkdir()
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(folder / "more.jpg" / "also.png")
    bank = BackgroundBank.default(folder, use_skimage=False, check=True)
    assert bank.names == ["dir:flat.png", "dir:more.jpg/also.png"]
    bank = BackgroundBank.default(folder, use_skimage=False)
    assert bank.names == ["dir:flat.png", "dir:more.jpg/also.png"]
    img = bank.sample(np.random.default_rng(0), (30, 20))
    assert img.shape == (30, 20, 3) and img.dtype == np.float32
    assert np.allclose(img, 200 / 255, atol=0.02)
    assert any(n.startswith("skimage:") for n in BackgroundBank.default().names)
    with pytest.raises(FileNotFoundError):
        BackgroundBank.default(tmp_path / "missing")


# ----------------------------------------------------------------------------- geometry
def _cad_silhouette(vertices: np.ndarray, faces: np.ndarray, vp: dict[str, float],
                    size: tuple[int, int]) -> np.ndarray:
    """Union of the projected triangles (an independent check of the rasteriser)."""
    pix = project_pascal3d(vertices, math.radians(vp["azimuth"]), math.radians(vp["elevation"]),
                           math.radians(vp["theta"]), vp["distance"], vp["px"] - 1.0,
                           vp["py"] - 1.0, vp["focal"], vp["viewport"])
    out = np.zeros(size, dtype=bool)
    for tri in pix[faces]:
        rr, cc = draw_polygon(tri[:, 1], tri[:, 0], shape=size)
        out[rr, cc] = True
    return out


def test_mask_matches_cad_projection(dataset: Path) -> None:
    for cat in CATS:
        for image_id in _ids(dataset, cat, "train") + _ids(dataset, cat, "val"):
            obj = _load_record(dataset, cat, image_id)["objects"][0, 0][0, 0]
            cad = read_off(dataset / "CAD" / cat / f"{int(obj['cad_index'][0, 0]):02d}.off")
            mask = np.asarray(Image.open(dataset / "Masks" / f"{cat}_imagenet" /
                                         f"{image_id}.png")) > 127
            sil = _cad_silhouette(cad.vertices.double().numpy(), cad.faces.numpy(),
                                  _viewpoint(obj), mask.shape)
            iou = (mask & sil).sum() / (mask | sil).sum()
            assert iou >= 0.9, (cat, image_id, iou)


def test_occlusion_levels(dataset: Path) -> None:
    root = dataset / "OccludedPASCAL3D"
    for cat in CATS:
        val = _ids(dataset, cat, "val")
        for level, (lo, hi) in OCCLUSION_LEVELS.items():
            name = f"{cat}FGL{level}_BGL{level}"
            assert (root / "lists" / f"{name}.txt").read_text().split() == [
                f"{i}.JPEG" for i in val]
            for image_id in val:
                assert (root / "images" / name / f"{image_id}.JPEG").is_file()
                with np.load(root / "annotations" / name / f"{image_id}.npz") as npz:
                    assert str(npz["source"]) == image_id
                    mask, occ = npz["mask"] > 127, npz["occluder_mask"].astype(bool)
                    y0, y1, x0, x1, h, w = npz["box"].tolist()
                    assert npz["occluder_box"].shape[1] == 6
                frac = (mask & occ).sum() / mask.sum()
                assert lo <= frac <= hi, (name, image_id, frac)
                saved = np.asarray(Image.open(dataset / "Masks" / f"{cat}_imagenet" /
                                              f"{image_id}.png")) > 127
                assert np.array_equal(mask, saved) and (h, w) == mask.shape
                ys, xs = np.nonzero(mask)
                assert (y0, y1, x0, x1) == (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)


def test_models_symmetric_closed_unit_sized() -> None:
    for cat in CATEGORY_BUILDERS:
        subs = category_subtypes(cat)
        assert 4 <= len(subs) <= 6 and [s.cad_index for s in subs] == list(range(1, len(subs) + 1))
        for sub in subs:
            v, f = sub.part_mesh.vertices, sub.part_mesh.faces
            lo, hi = v.min(0), v.max(0)
            assert np.allclose((lo + hi)[1:] / 2, 0, atol=1e-9) and abs(lo[0] + hi[0]) < 1e-9
            assert math.isclose((hi - lo).max(), 1.0)
            dist, _ = cKDTree(v).query(v * np.array([-1.0, 1.0, 1.0]))
            assert dist.max() < 1e-9, (cat, sub.name)
            tri = v[f]
            volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
            assert volume > 0  # outward orientation
            assert set(sub.part_mesh.role_names) == set(ROLES[cat])


def test_mirrored_pose_renders_flipped_image() -> None:
    size = (120, 160)
    ras = default_rasterizer("cpu")
    rng = np.random.default_rng(0)
    for cat in CATEGORY_BUILDERS:
        for sub in category_subtypes(cat):
            mesh = RenderMesh.from_part_mesh(sub.part_mesh)
            a, e, t = rng.uniform(0, 2 * math.pi), rng.uniform(-0.2, 0.6), rng.uniform(-0.25, 0.25)
            px, py = rng.uniform(70, 90), rng.uniform(50, 70)
            mask = rasterize(mesh, ViewPose(a, e, t, 30.0, px, py), size, ras) >= 0
            ma, me, mt = mirror_pose(np.asarray(a), np.asarray(e), np.asarray(t))
            flipped = rasterize(mesh, ViewPose(float(ma), float(me), float(mt), 30.0,
                                               size[1] - 1 - px, py), size, ras) >= 0
            iou = (mask & flipped[:, ::-1]).sum() / (mask | flipped[:, ::-1]).sum()
            assert iou >= 0.98, (cat, sub.name, iou)


def test_azimuth_zero_shows_the_front() -> None:
    ras = default_rasterizer("cpu")
    names = ROLES["car"]
    for sub in category_subtypes("car"):
        mesh = RenderMesh.from_part_mesh(sub.part_mesh)
        for az, seen, hidden in ((0.0, "headlight", "taillight"), (180.0, "taillight",
                                                                    "headlight")):
            pix = rasterize(mesh, ViewPose(math.radians(az), 0.15, 0.0, 20.0, 120, 90), (180, 240),
                            ras)
            roles = {names[r] for r in np.unique(mesh.roles[pix[pix >= 0]])}
            assert seen in roles and hidden not in roles, (sub.name, az, roles)


# ----------------------------------------------------------------------------- readers & CLI
def test_round_trip_through_the_readers(dataset: Path) -> None:
    from nvsm.data.datasets import load_dataset

    for split in ("train", "val"):
        result = load_dataset("synthetic", dataset, split=split)
        assert not result.errors and not result.skipped
        assert len(result.records) == sum(n[split == "val"] for n in COUNTS.values())
        for rec in result.records:
            obj = _load_record(dataset, rec.category, rec.image_id)["objects"][0, 0][0, 0]
            vp = _viewpoint(obj)
            assert rec.source == "synthetic" and rec.image_size == (360, 480)
            assert math.isclose(rec.azimuth, math.radians(vp["azimuth"]))
            assert math.isclose(rec.px, vp["px"] - 1.0) and math.isclose(rec.py, vp["py"] - 1.0)
            assert rec.bbox == tuple(float(b) - 1.0 for b in obj["bbox"][0])
            assert rec.cad_index == int(obj["cad_index"][0, 0]) - 1
            mask_path = dataset / "Masks" / f"{rec.category}_imagenet" / f"{rec.image_id}.png"
            assert rec.object_mask_path == mask_path and mask_path.is_file()
    occluded = load_dataset("occluded_pascal3d", dataset / "OccludedPASCAL3D",
                            pascal3d_root=dataset, categories=list(CATS))
    assert not occluded.errors
    assert len(occluded.records) == 3 * sum(n[1] for n in COUNTS.values())
    assert {r.occlusion_level for r in occluded.records} == {1, 2, 3}


def test_cli_command(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("synth")(synth_command)
    app.command("noop")(lambda: None)  # keep "synth" a sub-command
    out = tmp_path / "cli[a]"  # printed as it is, not read as rich markup
    result = CliRunner().invoke(app, ["synth", "--out", str(out), "--tiny", "-c", "chair",
                                      "--counts", "chair=1:0", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"files to {out} in" in result.output and "rendering" in result.output
    assert _ids(out, "chair", "train") == [f"{SYNSETS['chair']}_100001"]
    # An option error is one line in CLI words, not after an empty progress bar.
    again = CliRunner().invoke(app, ["synth", "--out", str(out), "--tiny", "-c", "chair"])
    assert again.exit_code == 2 and again.output == (
        f"error: {out} is not empty; pass --overwrite (overwrite=True in Python) to replace a "
        "synthetic dataset there\n"), again.output
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "s"), "--seed", "-1"])
    assert res.exit_code == 2 and res.output == "error: seed: expected an integer >= 0, got -1\n"
    # Counts for a category that is not rendered were ignored without a word.
    other = tmp_path / "other"
    res = CliRunner().invoke(app, ["synth", "--out", str(other), "--tiny", "-c", "chair",
                                   "--counts", "car=2:1", "--counts", "bike=1:1"])
    assert res.exit_code == 2 and "--counts names bike, car, which the categories" in res.output
    assert not other.exists()
    # A malformed count was a boxed usage message; an absurd one filled the memory (or ended
    # in a MemoryError traceback) while the task list was built, leaving a staging folder.
    for counts, message in (
        ("chair=2", "error: --counts: expected CATEGORY=TRAIN:VAL, got 'chair=2'\n"),
        (f"chair={10**20}:1", f"error: chair: counts must be in [0, 1000000] and not both 0, "
                              f"got ({10**20}, 1)\n"),
    ):
        res = CliRunner().invoke(app, ["synth", "--out", str(other), "--tiny", "-c", "chair",
                                       "--counts", counts])
        assert res.exit_code == 2 and res.output == message, res.output
        assert not other.exists() and not list(tmp_path.glob(".other.partial-*"))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="no kill -9")
def test_a_generation_after_a_kill_9_runs(tmp_path: Path) -> None:
    # kill -9 left the hidden staging folder inside --out, which every later run refused.
    import signal

    out = tmp_path / "syn"
    out.mkdir()  # a mount point, say: the staging folder is then inside it
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvsm.cli", "data", "synth", "--out", str(out), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob(f".partial-*/{OWNER_LOCK}")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the staging folder never appeared"
        time.sleep(0.05)
    assert proc.poll() is None, "it finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers, as the OOM killer might
    proc.wait(timeout=60)
    assert list(out.glob(".partial-*"))
    generate_synthetic_dataset(out, {"car": (1, 0)}, categories=["car"], occlusion=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "Annotations", "CAD", "Image_sets", "Images", "Masks", "synthetic_manifest.json"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_a_stopped_generation_stops_the_workers_in_one_line_and_writes_nothing(
    tmp_path: Path, how: str
) -> None:
    # ctrl-c: a terminal's Ctrl-C reaches the whole process group; each rendering worker
    # printed a KeyboardInterrupt traceback and the pool an InvalidStateError one, and the
    # command itself exited 130 without a word. kill: SIGTERM to the command alone ended it at
    # once, leaving the staging folder and two orphaned workers that went on rendering.
    import signal

    out = tmp_path / "syn"
    proc = subprocess.Popen(  # SIGINT as a terminal's Ctrl-C sends it, even if ours ignores it
        [sys.executable, "-m", "nvsm.cli", "data", "synth", "--out", str(out), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".syn.partial-*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the staging folder never appeared"
        time.sleep(0.05)
    time.sleep(1)  # the workers are starting (the whole set takes minutes)
    assert proc.poll() is None, "it finished before it could be stopped"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.terminate()  # SIGTERM to the command alone, as `kill PID` sends it
    output, _ = proc.communicate(timeout=60)  # the workers hold the pipe too: they ended
    code, word = (130, "interrupted") if how == "ctrl-c" else (143, "terminated")
    assert proc.returncode == code, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert output.rstrip().endswith(f"error: {word}: nothing was written to {out}")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its staging folder


def test_verify_checks_the_occluded_levels_and_masks_it_ships(dataset: Path,
                                                              tmp_path: Path) -> None:
    # Verify passed a copy missing an occluded image (which stops fewshot) and a mask (which
    # the reader goes on without).
    import shutil

    from nvsm.data.verify import verify_dataset

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    assert verify_dataset("synthetic", copy, decode_images=True) == []
    cat = next(c for c, n in COUNTS.items() if n[1] > 0)
    val_id = _ids(copy, cat, "val")[0]
    occluded = copy / "OccludedPASCAL3D" / "images" / f"{cat}FGL2_BGL2" / f"{val_id}.JPEG"
    mask = copy / "Masks" / f"{cat}_imagenet" / f"{_ids(copy, cat, 'train')[0]}.png"
    occluded.unlink()
    mask.unlink()
    found = {(p.kind, p.path) for p in verify_dataset("synthetic", copy)}
    assert found == {("missing_file", occluded), ("missing_file", mask)}
