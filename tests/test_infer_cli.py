"""``nvsm infer``: prediction files, overlays, occlusion maps, category inference, end to end."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nvsm.cli import app
from nvsm.config import RunConfig
from nvsm.infer.evaluate import Predictions, predict
from nvsm.infer.overlay import (
    EDGE_COLOR,
    draw_overlay,
    occlusion_map,
    project_corners,
    render_overlays,
)
from nvsm.infer.predict_io import (
    ROW_FIELDS,
    image_cropset,
    mark_failed,
    prediction_rows,
    read_predictions_csv,
    read_predictions_jsonl,
    write_predictions_csv,
    write_predictions_jsonl,
)
from nvsm.infer.solve import (
    CategoryModel,
    InferenceSchedule,
    canonical_feature_camera,
    estimate_poses_categories,
    pose_loss,
    render_templates,
)
from nvsm.mesh import cuboid_mesh
from nvsm.models.common import normalize_images
from nvsm.pose.convention import intrinsics
from nvsm.render import render_pose
from nvsm.train.cropset import CropImages, CropSet
from nvsm.train.model import NeMoModel

runner = CliRunner()


def _cropset(n: int, size=(8, 8), focal=3000.0) -> CropSet:
    h, w = size
    k = torch.as_tensor(intrinsics(focal, (w - 1) / 2, (h - 1) / 2)).double()
    return CropSet(
        images=CropImages.of(torch.zeros(n, 3, h, w, dtype=torch.uint8)),
        k=k.repeat(n, 1, 1),
        poses=torch.full((n, 4), math.nan, dtype=torch.float64),
        weights=torch.ones(n),
        categories=["car"] * n,
        uids=[f"img{i}:0" for i in range(n)],
        occlusion_levels=torch.zeros(n, dtype=torch.long),
        reference_distance=torch.full((n,), 5.0, dtype=torch.float64),
        image_box=torch.tensor([[0.0, 0.0, w - 1, h - 1]] * n, dtype=torch.float64),
        normalized_focal=focal,
    )


def test_rows_csv_jsonl_round_trip_in_degrees(tmp_path):
    data = _cropset(3)
    poses = torch.tensor(
        [
            [math.radians(30), math.radians(10), math.radians(-5), 5.5],
            [math.radians(370), math.radians(20), math.radians(200), 4.0],  # wraps
            [math.nan] * 4,
        ],
        dtype=torch.float64,
    )
    preds = Predictions(
        poses,
        torch.tensor([0.25, 0.5, math.nan]),
        torch.tensor([0.1, 0.2, 0.3]),
        [None, None, "RuntimeError: boom"],
        ["car", "bus", ""],
    )
    rows = prediction_rows(data, preds, ["a.jpg", "b.jpg", "c.jpg"])
    assert [r["image"] for r in rows] == ["a.jpg", "b.jpg", "c.jpg"]
    assert rows[0]["azimuth_deg"] == pytest.approx(30.0)
    assert rows[0]["elevation_deg"] == pytest.approx(10.0)
    assert rows[0]["theta_deg"] == pytest.approx(-5.0)
    assert rows[0]["score"] == pytest.approx(0.75) and rows[0]["distance"] == 5.5
    assert rows[1]["azimuth_deg"] == pytest.approx(10.0)
    assert rows[1]["theta_deg"] == pytest.approx(-160.0)
    assert rows[1]["category"] == "bus" and rows[0]["error"] == ""
    assert rows[2]["error"] == "RuntimeError: boom"
    for path, write, read in (
        (tmp_path / "p.csv", write_predictions_csv, read_predictions_csv),
        (tmp_path / "p.jsonl", write_predictions_jsonl, read_predictions_jsonl),
    ):
        write(path, rows)
        back = read(path)
        assert len(back) == 3 and list(back[0]) == list(ROW_FIELDS)
        for got, want in zip(back, rows, strict=True):
            for key in ROW_FIELDS:
                if isinstance(want[key], float) and math.isnan(want[key]):
                    assert math.isnan(got[key]), (path, key)
                else:
                    assert got[key] == want[key], (path, key)
        assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert (tmp_path / "p.csv").read_text().splitlines()[0].split(",")[3] == "azimuth_deg"
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    failed = json.loads(lines[2])  # strict JSON: NaN is null
    assert failed["azimuth_deg"] is None and failed["error"] == "RuntimeError: boom"


def test_reading_predictions_back_checks_each_row(tmp_path: Path) -> None:
    # Malformed files were read as rows of NaN and '' (missing columns, an unrelated CSV), or
    # failed with bare ValueError / JSONDecodeError / AttributeError naming no file or line.
    from nvsm.data.errors import DataFormatError

    good = {"image": "a.jpg", "uid": "a:0", "category": "car", "azimuth_deg": 30.0,
            "elevation_deg": 10.0, "theta_deg": 0.0, "distance": 5.0, "score": 0.5,
            "seconds": 0.1, "error": ""}
    csv_path = write_predictions_csv(tmp_path / "p.csv", [good])
    assert read_predictions_csv(csv_path)[0]["azimuth_deg"] == 30.0
    csv_path.write_text("foo,bar\n1,2\n")
    with pytest.raises(DataFormatError, match=r"p\.csv: field 'line 1 \(header\)'"):
        read_predictions_csv(csv_path)
    write_predictions_csv(csv_path, [{**good, "azimuth_deg": "abc"}])
    with pytest.raises(DataFormatError, match=r"p\.csv: field 'line 2 azimuth_deg': expected a "
                                              r"number.*got abc$"):
        read_predictions_csv(csv_path)
    jsonl = tmp_path / "p.jsonl"
    for text, field in (
        ("{not json", "line 1"),
        ("[1, 2]", "line 1"),
        (json.dumps({k: v for k, v in good.items() if k != "score"}), "line 1 score"),
        (json.dumps({**good, "azimuth_deg": None}), "line 1 error"),  # a failure needs a reason
        (json.dumps({**good, "error": "boom"}), "line 1 error"),  # a reason needs a failure
        (json.dumps({**good, "seconds": [1]}), "line 1 seconds"),
    ):
        jsonl.write_text(text + "\n")
        with pytest.raises(DataFormatError) as info:
            read_predictions_jsonl(jsonl)
        assert info.value.path == jsonl and info.value.field == field, (text, str(info.value))
    jsonl.write_text(json.dumps({**good, "azimuth_deg": None, "error": "boom"}) + "\n")
    assert math.isnan(read_predictions_jsonl(jsonl)[0]["azimuth_deg"])


_GOOD_ROW = {"image": "a.jpg", "uid": "a:0", "category": "car", "azimuth_deg": 30.0,
             "elevation_deg": 10.0, "theta_deg": 0.0, "distance": 5.0, "score": 0.5,
             "seconds": 0.1, "error": ""}


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(ROW_FIELDS)
        for key in ROW_FIELDS:
            if isinstance(w[key], float) and math.isnan(w[key]):
                assert math.isnan(g[key]), key
            else:
                assert g[key] == w[key] and type(g[key]) is type(w[key]), (key, g[key], w[key])


def test_predictions_round_trip_any_uid_and_path(tmp_path: Path) -> None:
    # A uid or path holding a bare "\r" was written unquoted (csv quotes only what its line
    # ending holds), and the reader then saw a row cut in two: the file could not be read back.
    import csv

    texts = ["cr\rx", "lf\nx", "crlf\r\nx", "a,b", 'q"uo"te', "ünï€😀", " lead ", "ls\u2028x",
             "fs\x1cx", "nel\x85x", ""]
    rows = [{**_GOOD_ROW, "image": f"img/{t}.jpg", "uid": t, "category": t} for t in texts]
    rows.append({**_GOOD_ROW, "uid": "fail\r", "azimuth_deg": math.nan, "elevation_deg": math.nan,
                 "theta_deg": math.nan, "distance": math.nan, "score": math.nan,
                 "error": 'RuntimeError: x, "y"\r\n z'})
    for path, write, read in (
        (tmp_path / "p.csv", write_predictions_csv, read_predictions_csv),
        (tmp_path / "p.jsonl", write_predictions_jsonl, read_predictions_jsonl),
    ):
        write(path, rows)
        _same_rows(read(path), rows)
    # Standard CSV tools read the same strings (and the numbers, unquoted, as numbers).
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as fh:
        plain = list(csv.DictReader(fh))
    assert [r["uid"] for r in plain] == [r["uid"] for r in rows]
    assert [r["image"] for r in plain] == [r["image"] for r in rows]
    assert plain[0]["azimuth_deg"] == "30.0" and plain[-1]["error"] == rows[-1]["error"]
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == ",".join(ROW_FIELDS)


def test_prediction_writers_take_numpy_numbers(tmp_path: Path) -> None:
    # np.float64 (a float) was written as "np.float64(10.0)" in the CSV, which its reader
    # refused; np.float32 stopped the JSON-lines writer with a TypeError.
    row = {**_GOOD_ROW, "azimuth_deg": np.float64(10.0), "elevation_deg": np.float32(0.5),
           "theta_deg": np.int64(-3), "distance": np.float16(2.0), "score": np.float32(np.nan),
           "seconds": 1}
    want = {**row, "azimuth_deg": 10.0, "elevation_deg": 0.5, "theta_deg": -3.0,
            "distance": 2.0, "score": math.nan, "seconds": 1.0}
    csv_path = write_predictions_csv(tmp_path / "p.csv", [row])
    line = csv_path.read_text().splitlines()[1]
    assert line == '"a.jpg","a:0","car",10.0,0.5,-3.0,2.0,nan,1.0,""'
    _same_rows(read_predictions_csv(csv_path), [want])
    jsonl = write_predictions_jsonl(tmp_path / "p.jsonl", [row])
    assert json.loads(jsonl.read_text())["score"] is None
    _same_rows(read_predictions_jsonl(jsonl), [want])


_CSV_ROW = '"a.jpg","a:0","car",30.0,10.0,0.0,5.0,0.5,0.1,""'


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('"a.jpg","a:0","car",30.0,10.0,0.0,5.0,0.5,0.1', "line 2 error"),  # a field short
        (_CSV_ROW + ",x", "line 2 (after error)"),  # one too many
        (_CSV_ROW.replace("30.0", '" 3_0 "'), "line 2 azimuth_deg"),  # float() took it as 30
        (_CSV_ROW.replace("30.0", "3_0"), "line 2 azimuth_deg"),
        (_CSV_ROW.replace("30.0", "٣٠"), "line 2 azimuth_deg"),  # Arabic-Indic digits
        (_CSV_ROW.replace('"a:0"', '"a"b'), "line 2"),  # a stray quote, read as part of it
        (f'{_CSV_ROW}\n"b.jpg","b\n:0","car",1.0', "line 3 elevation_deg"),  # a row's first line
    ],
)
def test_csv_reader_refuses_rows_the_writer_never_writes(tmp_path: Path, body: str,
                                                          field: str) -> None:
    from nvsm.data.errors import DataFormatError

    path = tmp_path / "p.csv"
    path.write_text(",".join(ROW_FIELDS) + "\n" + body + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        read_predictions_csv(path)
    assert info.value.path == path and info.value.field == field, str(info.value)


def test_csv_reader_refuses_other_columns(tmp_path: Path) -> None:
    # Extra columns were read and dropped without a word.
    from nvsm.data.errors import DataFormatError

    path = tmp_path / "p.csv"
    path.write_text(",".join(ROW_FIELDS) + ",note\n" + _CSV_ROW + ",x\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"p\.csv: field 'line 1 \(header\)'"):
        read_predictions_csv(path)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({**_GOOD_ROW, "azimuth_deg": "10"}, "line 1 azimuth_deg"),  # a number as a string
        ({**_GOOD_ROW, "azimuth_deg": " 1_0 "}, "line 1 azimuth_deg"),
        ({**_GOOD_ROW, "error": False}, "line 1 error"),  # read as no error
        ({**_GOOD_ROW, "error": None}, "line 1 error"),
        ({**_GOOD_ROW, "note": "x"}, "line 1 note"),  # an unknown field, dropped
    ],
)
def test_jsonl_reader_refuses_rows_the_writer_never_writes(tmp_path: Path, row: dict,
                                                            field: str) -> None:
    from nvsm.data.errors import DataFormatError

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataFormatError) as info:
        read_predictions_jsonl(path)
    assert info.value.path == path and info.value.field == field, str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(_GOOD_ROW).replace('"uid": "a:0"', '"uid": "a:0", "uid": "b:0"'),  # last won
        json.dumps(_GOOD_ROW).replace("0.5", "NaN"),  # not JSON; the writer writes null
    ],
)
def test_jsonl_reader_refuses_what_is_not_strict_json(tmp_path: Path, text: str) -> None:
    from nvsm.data.errors import DataFormatError

    path = tmp_path / "p.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(DataFormatError, match=r"p\.jsonl: field 'line 1': expected a JSON "):
        read_predictions_jsonl(path)


def test_draw_overlay_colours_projected_corners():
    mesh = cuboid_mesh([-0.3, -0.6, -0.2], [0.3, 0.6, 0.2], 200)
    size = (96, 128)
    k = np.asarray(intrinsics(400.0, 63.5, 47.5))
    pose = torch.tensor([math.radians(40), math.radians(20), 0.1, 5.0], dtype=torch.float64)
    crop = torch.zeros(3, *size, dtype=torch.uint8)
    img = np.asarray(draw_overlay(crop, mesh, pose, k))
    assert img.shape == (*size, 3)
    pix, depth = project_corners(mesh, pose, k)
    assert (depth > 0).all()
    inside = 0
    for x, y in pix:
        xi, yi = round(float(x)), round(float(y))
        if 0 <= xi < size[1] and 0 <= yi < size[0]:
            assert tuple(img[yi, xi]) == EDGE_COLOR
            inside += 1
    assert inside >= 4
    # Far from the box (the crop corner) nothing is drawn; a failed pose draws nothing.
    assert tuple(img[0, 0]) == (0, 0, 0)
    blank = np.asarray(draw_overlay(crop, mesh, torch.full((4,), math.nan), k))
    assert not blank.any()


def test_occlusion_map_hand_made():
    # D = 2, a 1 × 3 map. Clutter b = e2.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]).T.reshape(2, 1, 3)
    r = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]).T.reshape(2, 1, 3)
    mask = torch.tensor([[True, True, False]])
    b = torch.tensor([0.0, 1.0])
    m = occlusion_map(f, r, mask, b)
    # cell 0: obj 1, clu 0 → 1; cell 1: obj 0, clu 1 → 0 (occluded); cell 2: off the mask → 0.
    assert torch.allclose(m, torch.tensor([[1.0, 0.0, 0.0]]))
    loss = pose_loss(f[None], r[None], mask[None].float(), b)
    assert torch.allclose(1 - m.mean(), loss[0])
    # Mesh explains the cell only partly: ReLU(0.6 − 0.8) = 0; with a mask it is 0.6 − 0.0.
    m2 = occlusion_map(f, r, torch.ones(1, 3, dtype=torch.bool), torch.tensor([0.0, 0.0]))
    assert torch.allclose(m2, torch.tensor([[1.0, 0.0, 0.6]]))


# ---------------------------------------------------------------------- category inference

MAP = (24, 40)  # feature map (h, w)
FOCAL = 600.0  # normalised focal of the crops (crop_scale 0.2)
DIM = 16


def _smooth_features(mesh, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(mesh.num_vertices, DIM, generator=g)
    weights = torch.exp(-(torch.cdist(mesh.vertices, mesh.vertices) ** 2) / 0.1**2)
    return torch.nn.functional.normalize(weights @ raw, dim=1)


def _two_categories():
    """A long flat box and a tall one, each with its own smooth random vertex features."""
    meshes = {
        "car": cuboid_mesh([-0.15, -0.45, -0.1], [0.15, 0.45, 0.1], 300),
        "bottle": cuboid_mesh([-0.12, -0.12, -0.35], [0.12, 0.12, 0.35], 300),
    }
    feats = {cat: _smooth_features(mesh, seed) for seed, (cat, mesh) in enumerate(meshes.items())}
    g = torch.Generator().manual_seed(3)
    clutter = torch.nn.functional.normalize(torch.randn(DIM, generator=g), dim=0)
    return meshes, feats, clutter


def _feature_images(meshes, feats, clutter, k, cats, poses):
    maps = []
    for cat, p in zip(cats, poses, strict=True):
        out = render_pose(meshes[cat], feats[cat], *p[:, None], k, MAP)
        fm = out.features + (~out.mask)[:, None] * clutter[None, :, None, None]
        maps.append(torch.nn.functional.normalize(fm, dim=1))
    return torch.cat(maps)


SCHEDULE = InferenceSchedule(
    n_azimuth=8, elevations_deg=(0.0, 30.0), thetas_deg=(0.0,), top_k=1, steps=8
)
POSES = torch.tensor(
    [[math.radians(45), math.radians(30), 0.0, 5.0], [math.radians(135), 0.0, 0.0, 5.0]]
)


def test_category_inference_picks_the_right_mesh():
    meshes, feats, clutter = _two_categories()
    k = torch.as_tensor(canonical_feature_camera(MAP, 8, FOCAL), dtype=torch.float32)
    fm = _feature_images(meshes, feats, clutter, k, ["car", "bottle"], POSES)
    cands = {
        cat: CategoryModel(
            meshes[cat],
            feats[cat],
            clutter,
            render_templates(meshes[cat], feats[cat], SCHEDULE, MAP, 8, k_feat=k),
        )
        for cat in ("bottle", "car")
    }
    pred = estimate_poses_categories(fm, k, torch.tensor([5.0, 5.0]), cands, SCHEDULE)
    assert pred.names() == ["car", "bottle"]
    assert pred.category_loss.shape == (2, 2)
    # The right mesh explains its image far better than the other one: its foreground
    # evidence (1 − loss, a mean over the whole map) is several times larger.
    evidence = 1 - pred.category_loss  # columns: bottle, car
    assert evidence[0, 1] > 3 * evidence[0, 0] and evidence[1, 0] > 3 * evidence[1, 1]
    assert torch.allclose(pred.poses[:, :2].float(), POSES[:, :2], atol=math.radians(5))


class _LookupBackbone(torch.nn.Module):
    """Returns stored feature maps, recognising each image by its first pixel (the index)."""

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = maps
        index = torch.arange(len(maps)).float().view(-1, 1, 1, 1).expand(-1, 3, 1, 1)
        self.keys = normalize_images(index / 255)[:, 0, 0, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        idx = (images[:, 0, 0, 0, None] - self.keys[None]).abs().argmin(1)
        return self.maps[idx]


def test_predict_infers_the_category_with_a_model():
    meshes, feats, clutter = _two_categories()
    k = torch.as_tensor(canonical_feature_camera(MAP, 8, FOCAL), dtype=torch.float32)
    fm = _feature_images(meshes, feats, clutter, k, ["car", "bottle"], POSES)
    cfg = RunConfig()
    cfg.model.feature_dim = DIM
    cfg.train.clutter_size = 4
    model = NeMoModel(_LookupBackbone(fm), meshes, cfg)
    for cat, bank in model.banks.items():
        bank.memory = feats[cat].clone()
        bank.clutter = clutter[None].repeat(4, 1)
        bank.clutter_count = torch.tensor(4)
    data = _cropset(2, (MAP[0] * 8, MAP[1] * 8), FOCAL)
    images = data.images[:]
    images[:, :, 0, 0] = torch.arange(2, dtype=torch.uint8)[:, None]
    data.images = CropImages.of(images)
    data.categories = ["car", "car"]  # wrong for image 1: ignored when inferring
    preds = predict(model, data, SCHEDULE, show_progress=False, infer_category=True)
    assert preds.categories == ["car", "bottle"] and preds.errors == [None, None]
    given = predict(model, data, SCHEDULE, show_progress=False)
    assert given.categories == ["car", "car"]
    assert 1 - given.loss[1] < (1 - preds.loss[1]) / 3  # the wrong mesh explains it badly
    assert given.loss[0] == pytest.approx(preds.loss[0].item())
    # Overlays: [cuboid | occlusion heat]; the black crops light up where the mesh explains
    # the features (the heat), and the cuboid is drawn in the left panel.
    pictures = [np.asarray(p) for p in render_overlays(model, data, preds)]
    h, w = data.images.shape[-2:]
    assert len(pictures) == 2 and pictures[0].shape == (h, 2 * w, 3)
    for pic in pictures:
        assert (pic[:, :w] == EDGE_COLOR).all(-1).sum() > 20
        assert pic[:, w:].max() > 100 and pic[:, w:].min() < 20
    # A failed crop (an unreadable image) gets no picture: it had one of its black crop, which
    # nvsm infer wrote and counted as an overlay.
    failed = mark_failed(preds, {1: "DataFormatError: not an image"})
    pictures = list(render_overlays(model, data, failed))
    assert pictures[0] is not None and pictures[1] is None


def test_image_cropset_centres_the_whole_image(tmp_path):
    Image.fromarray(np.full((30, 60, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    data, failed = image_cropset([tmp_path / "a.png", tmp_path / "broken.jpg"], (32, 48))
    assert data.images.shape == (2, 3, 32, 48) and list(failed) == [1]
    assert data.uids == ["a:0", "broken:0"] and data.categories == ["", ""]
    crop = data.images[0][0]
    # The image (aspect 2:1) fills 0.8 of the crop width, centred: 38.4 of 48 columns.
    cols = (crop > 100).any(0).nonzero().flatten()
    assert abs((cols.min() + cols.max()).item() / 2 - 23.5) <= 0.5
    assert 36 <= cols.max() - cols.min() + 1 <= 41


def test_infer_refuses_a_folder_holding_an_inference(tmp_path):
    # A second inference into one folder replaced the predictions and left the first one's
    # overlays beside them. Refused before the checkpoint is read (here it does not exist).
    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for name in ("predictions.csv", "predictions.jsonl", "infer_info.json", "overlays"):
        out = tmp_path / f"preds-{name}"
        out.mkdir()
        if name in ("overlays", "predictions.jsonl"):  # a folder by a file's name too
            (out / name).mkdir()
            (out / name / "00000_old_0.png").write_bytes(b"old")
        else:
            (out / name).write_text("old")
        for flags in ([], ["--overlays"]):
            res = runner.invoke(
                app, ["infer", "-m", str(tmp_path / "model.pt"), str(image), "--out", str(out),
                      *flags]
            )
            assert res.exit_code == 2, res.output
            assert (f"error: {out} holds an inference already ({out / name}): choose another "
                    "folder (--out) or delete it") in res.output
        assert [p.name for p in out.iterdir()] == [name]  # untouched


def test_evaluate_refuses_to_replace_a_metrics_json(tmp_path):
    # ``--out`` a train run's own folder replaced the run's metrics.json. Refused before the
    # checkpoint is read (here it does not exist).
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    res = runner.invoke(app, ["evaluate", "-m", str(run / "model.pt"), "--out", str(run)])
    assert res.exit_code == 2, res.output
    message = f"{run / 'metrics.json'} exists already: choose another folder (--out) or delete it"
    assert f"error: {message}" in res.output
    assert (run / "metrics.json").read_text() == "{}"


def test_ctrl_c_in_infer_and_evaluate_says_nothing_was_written(tmp_path, monkeypatch):
    # Both exited 130 without a word. Neither writes before its end (infer writes aside and
    # moves its outputs into place: ``test_infer_end_to_end``).
    import nvsm.infer.predict_io
    import nvsm.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nvsm.infer.predict_io, "run_inference", interrupted)
    monkeypatch.setattr(nvsm.pipeline, "evaluate_checkpoint", interrupted)
    out = tmp_path / "out"
    for cmd, said in (
        (["infer", "-m", "model.pt", "--out", str(out)], f"nothing was written to {out}"),
        (["evaluate", "-m", "model.pt", "--out", str(out)], f"nothing was written to {out}"),
        (["evaluate", "-m", "model.pt"], "nothing was written"),
    ):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 130 and f"error: interrupted: {said}\n" in res.output, res.output


def test_infer_and_evaluate_help_have_examples():
    for cmd in (["infer"], ["evaluate"]):
        res = runner.invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0 and "nvsm " in res.output, cmd
    assert "--unseen-azimuth" in runner.invoke(app, ["evaluate", "--help"]).output


@pytest.mark.slow
def test_infer_end_to_end(tiny_synthetic, tmp_path):
    run = tmp_path / "run"
    sets = [
        "-s", f"data.root={tiny_synthetic}",
        "-s", "data.crop_scale=0.2",
        "-s", "data.crop_size=[64, 120]",
        "-s", "train.steps=3",
        "-s", "train.batch_size=2",
        "-s", "labels.annotations=2",
    ]  # fmt: skip
    res = runner.invoke(
        app, ["train", "-r", "synthetic-car-7labels", "--out", str(run), "--no-evaluate", *sets]
    )
    assert res.exit_code == 0, res.output
    ckpt = str(run / "model.pt")

    # Raw images (category inferred) with overlays; an unreadable file is a failure row.
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted((tiny_synthetic).rglob("*.JPEG"))[:2]:
        shutil.copy(src, photos / src.name)
    (photos / "zz_broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pred[a]"  # printed as it is, not read as rich markup
    res = runner.invoke(app, ["infer", "-m", ckpt, str(photos), "--overlays", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{out}/predictions.csv, {out}/predictions.jsonl" in res.output
    rows = read_predictions_csv(out / "predictions.csv")
    same = [
        (a[k] == b[k]) or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for a, b in zip(rows, read_predictions_jsonl(out / "predictions.jsonl"), strict=True)
        for k in ROW_FIELDS
    ]
    assert all(same)
    assert len(rows) == 3 and [r["category"] for r in rows[:2]] == ["car", "car"]
    assert all(r["error"] == "" and 0 <= r["azimuth_deg"] < 360 for r in rows[:2])
    assert rows[2]["error"] and math.isnan(rows[2]["azimuth_deg"])
    # The unreadable image gets no overlay (it had an all-black one, counted).
    pngs = sorted((out / "overlays").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}_{Path(r['image']).stem}_0.png"
                                      for i, r in enumerate(rows[:2])]
    with Image.open(pngs[0]) as im:
        assert im.size == (2 * 120, 64)
    assert f"2 overlay(s) in {out}/overlays" in res.output
    info = json.loads((out / "infer_info.json").read_text())
    assert info["protocol"] == "bbox" and info["category"] == "inferred" and info["failures"] == 1
    assert info["overlays"] == 2
    # The resolved config, seed, package versions, commit and command line, as a run records.
    assert info["run"]["config"]["data"]["crop_size"] == [64, 120] and info["run"]["seed"] == 0
    assert info["run"]["versions"]["torch"] and "git_commit" in info["run"]
    broken = str(photos / "zz_broken.jpg")
    assert [f["image"] for f in info["failed"]] == [broken]
    assert f"failed: {broken} (zz_broken:0): DataFormatError" in res.output
    # Interrupted after its first overlay, an inference leaves its --out as it was: the overlays
    # were written into --out one by one, beside no predictions.
    import nvsm.infer.overlay

    real_overlays = nvsm.infer.overlay.render_overlays

    def first_then_ctrl_c(*args, **kwargs):
        yield next(iter(real_overlays(*args, **kwargs)))
        raise KeyboardInterrupt

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nvsm.infer.overlay, "render_overlays", first_then_ctrl_c)
        for target in (stopped, tmp_path / "new"):  # one there before, one the command makes
            res = runner.invoke(app, ["infer", "-m", ckpt, str(photos), "--overlays", "--out",
                                      str(target)])
            assert res.exit_code == 130, res.output
            assert f"interrupted: nothing was written to {target}" in res.output
    assert list(stopped.iterdir()) == [] and not (tmp_path / "new").exists()
    # When no image can be read the command fails (it exited 0, the reasons only in the CSV).
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"")
    res = runner.invoke(app, ["infer", "-m", ckpt, str(junk), "--out", str(tmp_path / "pj")])
    assert res.exit_code == 1 and "no image gave a pose" in res.output
    assert f"failed: {junk / 'a.png'} (a:0)" in res.output
    # The options of a dataset split are refused beside images (they were ignored in silence).
    for option in (["--dataset-split", "train"], ["--infer-category"]):
        target = tmp_path / "beside"
        res = runner.invoke(app, ["infer", "-m", ckpt, str(pngs[0]), *option, "--out", str(target)])
        assert res.exit_code == 2, res.output
        assert f"error: {option[0]}: applies without PATHS only" in res.output
        assert not target.exists()
    # A second inference into the same folder is refused before any work: it replaced the
    # predictions and left the first run's overlays beside them.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = runner.invoke(app, ["infer", "-m", ckpt, str(pngs[0]), "--out", str(out)])
    assert res.exit_code == 2 and f"{out} holds an inference already" in res.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # The checkpoint's test split (category given), then the unseen-azimuth evaluation.
    split = tmp_path / "split"
    res = runner.invoke(app, ["infer", "-m", ckpt, "--dataset-split", "val", "--out", str(split)])
    assert res.exit_code == 0, res.output
    rows = read_predictions_jsonl(split / "predictions.jsonl")
    assert len(rows) == 4 and all(r["error"] == "" for r in rows)
    assert json.loads((split / "infer_info.json").read_text())["protocol"] == "gt-normalized"
    res = runner.invoke(
        app, ["evaluate", "-m", ckpt, "--unseen-azimuth", "--out", str(tmp_path / "ev")]
    )
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["subset"] == "unseen-azimuth" and ev["pooled"]["L0"]["n"] == 3
    assert ev["run"]["checkpoint"] == ckpt and ev["run"]["config"]["data"]["crop_scale"] == 0.2
    assert ev["run"]["versions"]["torch"] and "git_commit" in ev["run"]
    # Evaluating into a folder with a metrics.json is refused (it replaced a train run's).
    res = runner.invoke(app, ["evaluate", "-m", ckpt, "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2 and f"{tmp_path / 'ev' / 'metrics.json'} exists already" in res.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == ev

    # An output path that is a file, or lies under one, is refused before any work (this was
    # torch's or the OS's traceback, for evaluate and infer after all the inference).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cmd in (["infer", "-m", ckpt, str(photos)], ["evaluate", "-m", ckpt]):
        for target in (blocker, blocker / "sub"):
            res = runner.invoke(app, [*cmd, "--out", str(target)])
            assert res.exit_code == 2, res.output
            assert f"cannot write into {target}: {blocker} is a file" in res.output
    assert blocker.read_text() == "x"
    # What the checkpoint fixes cannot be overridden (it was recorded but not used), and a
    # category without a mesh is named (a KeyError traceback).
    for cmd in (["evaluate", "-m", ckpt], ["infer", "-m", ckpt, "--out", str(tmp_path / "o")]):
        res = runner.invoke(app, [*cmd, "-s", "model.feature_dim=64"])
        assert res.exit_code == 2 and "error: model.feature_dim: " in res.output, res.output
        assert "was trained with 128; it cannot be changed" in res.output
        res = runner.invoke(app, [*cmd, "-s", "data.categories=[aeroplane]"])
        assert res.exit_code == 2, res.output
        no_mesh = f"error: data.categories: {ckpt} has no mesh for aeroplane (it has car)"
        assert no_mesh in res.output
    assert not (tmp_path / "o").exists()
    res = runner.invoke(app, ["evaluate", "-m", ckpt, "--schedule", "slow"])
    assert res.exit_code == 2, res.output
    assert "--schedule (infer.schedule): expected one of fast | reference, got 'slow'" in res.output
    # A bad -s key is the override's, not the checkpoint's config's.
    res = runner.invoke(app, ["evaluate", "-m", ckpt, "-s", "train.stepz=1"])
    assert res.exit_code == 2 and "error: overrides.train: unknown key(s) ['stepz']" in res.output
    # -s infer.schedule was recorded but --schedule's default used. Which schedule runs is
    # recorded here; the real fast one stands in for it (the reference one takes minutes).
    import nvsm.infer.evaluate as infer_evaluate

    real = infer_evaluate.resolve_schedule
    used: list[str] = []

    def resolve(name: str):
        used.append(name)
        return real("fast")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(infer_evaluate, "resolve_schedule", resolve)
        for opts, out in ((["-s", "infer.schedule=reference"], "ev_s"),
                          (["--schedule", "reference"], "ev_o")):
            res = runner.invoke(app, ["evaluate", "-m", ckpt, *opts, "--out", str(tmp_path / out)])
            assert res.exit_code == 0, res.output
            ev = json.loads((tmp_path / out / "metrics.json").read_text())
            assert ev["schedule"] == ev["run"]["config"]["infer"]["schedule"] == "reference"
    assert used == ["reference", "reference"]


def test_templates_are_cached_per_model_until_the_bank_changes() -> None:
    from nvsm.infer.evaluate import category_templates
    from nvsm.infer.solve import FAST_SCHEDULE
    from nvsm.mesh import cuboid_mesh
    from nvsm.render import get_rasterizer
    from nvsm.train.model import NeMoModel

    class _Backbone(torch.nn.Module):
        pass

    from nvsm.config import load_config

    cfg = load_config(None, ["model.feature_dim=8", "train.clutter_size=4"])
    mesh = cuboid_mesh([-0.2, -0.5, -0.2], [0.2, 0.5, 0.2], 100)
    # A bare module, not a FeatureBackbone, on purpose: the templates use only the banks.
    model = NeMoModel(_Backbone(), {"car": mesh}, cfg)  # type: ignore[arg-type]
    ras = get_rasterizer("torch")
    first = category_templates(model, "car", (8, 12), 1000.0, FAST_SCHEDULE, ras)
    assert category_templates(model, "car", (8, 12), 1000.0, FAST_SCHEDULE, ras) is first
    bank = model.banks["car"]
    bank.update_vertices(
        torch.randn(1, bank.num_vertices, 8), torch.ones(1, bank.num_vertices, dtype=torch.bool)
    )
    replaced = category_templates(model, "car", (8, 12), 1000.0, FAST_SCHEDULE, ras)
    assert replaced is not first
    with torch.no_grad():
        bank.memory.mul_(-1.0)  # an in-place change (e.g. load_state_dict) also invalidates
    assert category_templates(model, "car", (8, 12), 1000.0, FAST_SCHEDULE, ras) is not replaced
