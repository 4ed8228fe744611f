import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from nvsm.config import AugmentConfig, ConfigError, load_config
from nvsm.data.datasets import load_dataset
from nvsm.infer.evaluate import Predictions, score
from nvsm.pipeline import category_meshes
from nvsm.pose.convention import opencv_extrinsics, project_opencv
from nvsm.train.cropset import (
    BatchAugmenter,
    CropImages,
    CropSet,
    affine_jitter,
    build_cropset,
    flip_batch,
    hidden_cells,
    outside_image,
)
from nvsm.train.model import NeMoModel, build_model
from nvsm.train.trainer import NeMoTrainer

SIZE = [64, 120]


def _cfg(**over):
    sets = [
        "data.crop_scale=0.2",
        f"data.crop_size={SIZE}",
        "train.batch_size=4",
        "model.feature_dim=32",
        "train.clutter_size=64",
    ]
    return load_config(None, sets + [f"{k}={v}" for k, v in over.items()])


def _points_image(poses, k, pts, h, w):
    """Rasterise projected 3D points into a (B, 1, H, W) image (one bright pixel each)."""
    r, t = opencv_extrinsics(poses[:, 0], poses[:, 1], poses[:, 2], poses[:, 3])
    px, _ = project_opencv(pts[None].double(), r, t, k.double())
    img = torch.zeros(len(poses), 1, h, w)
    for b in range(len(poses)):
        for x, y in px[b].round().long().tolist():
            if 0 <= x < w and 0 <= y < h:
                img[b, 0, y, x] = 1.0
    return img, px


def test_flip_mirrors_pose_and_camera_exactly():
    # A left/right symmetric point set: flipping its image equals rendering the mirrored pose.
    pts = torch.tensor([[0.3, 0.2, 0.1], [-0.3, 0.2, 0.1], [0.1, -0.4, 0.0], [-0.1, -0.4, 0.0]])
    h, w = 40, 60
    k = torch.tensor([[[300.0, 0, 29.5], [0, 300.0, 19.5], [0, 0, 1]]]).double()
    poses = torch.tensor([[0.7, 0.3, 0.1, 5.0]], dtype=torch.float64)
    img, _ = _points_image(poses, k, pts, h, w)
    box = torch.tensor([[0.0, 0.0, w - 1, h - 1]], dtype=torch.float64)
    f_img, f_k, f_pose, _ = flip_batch(img, k, poses, box, torch.tensor([True]))
    again, _ = _points_image(f_pose, f_k, pts, h, w)
    assert torch.equal(f_img, again)
    assert f_pose[0, 0] == pytest.approx(2 * math.pi - 0.7) and f_pose[0, 2] == pytest.approx(-0.1)


def test_affine_jitter_keeps_projection_exact():
    # Warp coordinate ramps (channel 0 = x, channel 1 = y of the ORIGINAL crop). Bilinear
    # sampling reproduces a ramp exactly, so reading the warped ramps at a point's projection
    # through the jittered camera must give its projection through the original camera.
    pts = torch.tensor([[0.03, 0.02, 0.01], [-0.02, 0.01, 0.015], [0.0, 0.0, 0.0]])
    h, w = 40, 60
    k = torch.tensor([[[300.0, 0, 29.5], [0, 300.0, 19.5], [0, 0, 1]]], dtype=torch.float64)
    poses = torch.tensor([[0.7, 0.3, 0.1, 5.0]], dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    ramps = torch.stack([xs, ys])[None]
    box = torch.tensor([[0.0, 0.0, w - 1, h - 1]], dtype=torch.float64)
    out, k2, padded = affine_jitter(
        ramps, k, box, torch.tensor([0.9]), torch.tensor([[3.0, -2.0]])
    )
    # The padding is exactly where the warp reads outside the crop: zeros there, hidden from
    # training (vertices on it were sampled from the zeros as visible).
    src_x = (xs - 29.5 - 3.0) / 0.9 + 29.5
    src_y = (ys - 19.5 + 2.0) / 0.9 + 19.5
    outside = (src_x < 0) | (src_x > w - 1) | (src_y < 0) | (src_y > h - 1)
    assert torch.equal(padded[0], outside) and outside.any() and not outside.all()
    torch.testing.assert_close(out[0, 0][~outside], src_x[~outside], rtol=0, atol=1e-5)
    _, px = _points_image(poses, k, pts, h, w)
    _, px2 = _points_image(poses, k2, pts, h, w)
    grid = torch.stack([2 * px2[..., 0] / (w - 1) - 1, 2 * px2[..., 1] / (h - 1) - 1], -1)
    read = torch.nn.functional.grid_sample(out, grid[:, None].to(out), align_corners=True)
    assert torch.allclose(read[0, :, 0].T, px[0], atol=1e-6)


def _crop_past_the_left_border(tmp_path, value=200):
    """A one-crop set whose object origin projects 10 px from the left border of a flat image
    (every pixel ``value``), so the left part of its crop is the warp's zero padding."""
    from PIL import Image

    from nvsm.data.record import ObjectRecord

    path = tmp_path / "img.png"
    Image.fromarray(np.full((300, 400, 3), value, dtype=np.uint8)).save(path)
    rec = ObjectRecord(
        image_path=path, category="car", bbox=(0, 100, 120, 200), azimuth=math.radians(90),
        elevation=0.2, theta=0.0, distance=6.0, px=10.0, py=150.0, focal=1.0, viewport=3000.0,
        cad_index=0, truncated=True, occluded=False, difficult=False, occlusion_level=0,
        source="synthetic", image_id="img", object_index=0,
    )  # fmt: skip
    return build_cropset([rec], crop_scale=0.2, crop_size=tuple(SIZE), show_progress=False)


def _trainer_without_augmentation() -> NeMoTrainer:
    """A trainer of a fresh car cuboid model, one crop a batch, no augmentation."""
    from nvsm.mesh import cuboid_mesh

    cfg = _cfg(**{"train.batch_size": 1, "train.augment.flip": "false",
                  "train.augment.color_jitter": 0, "train.augment.scale_jitter": 0,
                  "train.augment.translate_jitter": 0})  # fmt: skip
    model = build_model(cfg, {"car": cuboid_mesh([-0.2, -0.4, -0.15], [0.2, 0.4, 0.15], 200)})
    return NeMoTrainer(model, cfg.train, seed=0)


def test_the_image_box_marks_a_crops_own_padding(tmp_path):
    data = _crop_past_the_left_border(tmp_path)
    crop = data.images[0]
    outside = outside_image(data.image_box, tuple(SIZE))[0]
    # Padding is zero and marked; every unmarked pixel is image (the flat 200).
    assert 10 < int(outside.all(0).sum()) < SIZE[1] - 10  # a band of whole columns
    assert bool((crop[:, ~outside] == 200).all())
    assert bool(outside[(crop == 0).all(0)].all())
    # The mirror's box marks the mirrored padding.
    assert torch.equal(outside_image(data.mirrored().image_box, tuple(SIZE))[0], outside.flip(-1))
    # Without jitter the augmenter hides exactly the padding; with jitter, the padding moved
    # with the image plus whatever the jitter read from off the crop.
    images = crop[None].float() / 255
    still = AugmentConfig(flip=False, color_jitter=0.0, scale_jitter=0.0, translate_jitter=0.0)
    batch = BatchAugmenter(still)(images, data.k, data.poses, data.image_box)
    assert torch.equal(batch.padding[0], outside) and torch.equal(batch.hidden[0], outside)
    moved, _, padded = affine_jitter(
        images, data.k, data.image_box, torch.tensor([0.9]), torch.tensor([[-6.0, 3.0]])
    )
    assert torch.allclose(moved[0][:, ~padded[0]], torch.tensor(200 / 255), atol=1e-6)
    assert bool(padded[0][(moved[0] == 0).all(0)].all()) and bool((~padded[0]).any())


def test_vertices_on_a_crops_own_padding_are_not_trained_as_seen(tmp_path):
    """The trainer treats the crop's padding as it does the jitter's: a vertex projected onto
    the zeros beyond the image is not a visible vertex (its feature would train the bank)."""
    from nvsm.models.common import STRIDE
    from nvsm.pose.camera import feature_intrinsics
    from nvsm.train.trainer import project_mesh_vertices

    data = _crop_past_the_left_border(tmp_path)
    trainer = _trainer_without_augmentation()
    model = trainer.model
    _, updates = trainer.batch_loss(data, torch.tensor([0]))
    visible = updates["car"]["visible"][0]
    mesh = model.meshes["car"]
    k_feat = torch.as_tensor(feature_intrinsics(data.k.numpy(), STRIDE))
    cell_x = torch.floor(project_mesh_vertices(mesh.vertices, data.poses, k_feat)[0, :, 0] + 0.5)
    # Cells whose pixels include padding (the band of zero columns on the left).
    first_image_cell = math.ceil(float(data.image_box[0, 0]) / STRIDE)
    assert bool(visible.any())
    assert not bool((visible & (cell_x < first_image_cell)).any())
    # ... though vertices there face the camera: the padding rule, not the geometry, left
    # them out.
    from nvsm.mesh import facing_visibility
    from nvsm.pose.convention import camera_centre

    p = data.poses
    facing = facing_visibility(mesh, camera_centre(p[:, 0], p[:, 1], p[:, 3]))[0]
    on_padding = (cell_x >= 0) & (cell_x < first_image_cell - 1)
    assert bool((facing & on_padding).any())


def test_clutter_is_not_drawn_from_a_crops_own_padding(tmp_path, monkeypatch):
    """Clutter features teach the bank what background looks like; the zeros beyond the image
    are no scene's background, so the cells holding them are excluded as the object's are."""
    import nvsm.train.trainer as trainer_module
    from nvsm.models.common import STRIDE

    data = _crop_past_the_left_border(tmp_path)
    trainer = _trainer_without_augmentation()
    excluded = []
    draw = trainer_module.sample_clutter_features

    def spy(feature_map, object_mask, n_per_image, generator=None):
        excluded.append(object_mask.clone())
        return draw(feature_map, object_mask, n_per_image, generator)

    monkeypatch.setattr(trainer_module, "sample_clutter_features", spy)
    trainer.batch_loss(data, torch.tensor([0]))
    padding = hidden_cells(outside_image(data.image_box, tuple(SIZE)), STRIDE)
    (mask,) = excluded
    assert bool(padding.any()) and bool((~padding).any())
    assert bool(mask[padding].all())  # every padding cell is off limits ...
    assert bool((~mask).any())  # ... and background cells remain to draw from


def test_augmenter_is_seeded():
    imgs = torch.rand(3, 3, 32, 48)
    k = torch.eye(3).double().repeat(3, 1, 1)
    k[:, 0, 0] = k[:, 1, 1] = 100.0
    poses = torch.rand(3, 4).double()
    box = torch.tensor([[0.0, 0.0, 47.0, 31.0]] * 3, dtype=torch.float64)
    a = BatchAugmenter(AugmentConfig(occluders=1.0), seed=3)(imgs, k, poses, box)
    b = BatchAugmenter(AugmentConfig(occluders=1.0), seed=3)(imgs, k, poses, box)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert a.occluded.any()  # occluders were pasted and reported
    assert torch.equal(a.hidden, a.padding | a.occluded)
    # ... and the seed matters (each DDP rank and round gets its own).
    c = BatchAugmenter(AugmentConfig(occluders=1.0), seed=4)(imgs, k, poses, box)
    assert not torch.equal(a[0], c[0])


def test_score_counts_failures_and_levels():
    data = CropSet(
        images=CropImages.of(torch.zeros(4, 3, 8, 8, dtype=torch.uint8)),
        k=torch.eye(3).repeat(4, 1, 1).double(),
        poses=torch.tensor([[0.0, 0.1, 0.0, 5.0]] * 4).double(),
        weights=torch.ones(4),
        categories=["car"] * 4,
        uids=list("abcd"),
        occlusion_levels=torch.tensor([0, 0, 1, 1]),
        reference_distance=torch.full((4,), 5.0).double(),
        image_box=torch.tensor([[0.0, 0.0, 7.0, 7.0]] * 4, dtype=torch.float64),
    )
    poses = data.poses.clone()
    poses[1, 0] = math.radians(20)
    poses[3] = float("nan")
    preds = Predictions(poses, torch.zeros(4), torch.full((4,), 0.5), [None, None, "boom", None])
    m = score(data, preds)
    assert m["failures"] == 2
    l0, l1 = m["pooled"]["L0"], m["pooled"]["L1"]
    assert l0["acc_pi_6"] == 1.0 and l0["acc_pi_18"] == 0.5 and l0["n"] == 2
    assert l1["acc_pi_6"] == 0.0 and l1["median_error_deg"] == pytest.approx(180.0)
    assert l1["failures"] == 2


def test_training_steps_checkpoint_and_reload(tiny_synthetic, tmp_path):
    cfg = _cfg()
    recs = load_dataset("synthetic", tiny_synthetic, split="train").records
    data = build_cropset(recs, crop_scale=0.2, crop_size=tuple(SIZE), show_progress=False)
    assert data.images.shape == (6, 3, *SIZE)
    model = build_model(cfg, category_meshes(tiny_synthetic, ["car"], 200))
    assert model.backbone.memory_format == torch.channels_last  # model.channels_last default
    before = model.banks["car"].memory.clone()
    trainer = NeMoTrainer(model, cfg.train, seed=0)
    summary = trainer.fit(data, steps=3, checkpoint_path=tmp_path / "model.pt", show_progress=False)
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    bank = model.banks["car"]
    assert not torch.allclose(bank.memory, before)  # visible vertices moved
    assert torch.allclose(bank.memory.norm(dim=1), torch.ones(bank.num_vertices), atol=1e-5)
    assert int(bank.clutter_count) > 0
    loaded, meta = NeMoModel.load(tmp_path / "model.pt")
    assert meta["step"] == 3 and loaded.config == cfg
    assert loaded.backbone.memory_format == torch.channels_last
    assert torch.equal(loaded.banks["car"].memory, bank.memory)
    x = torch.rand(1, 3, *SIZE)
    model.eval(), loaded.eval()
    assert torch.allclose(model.features(x), loaded.features(x), atol=1e-6)


def test_training_state_is_taken_over_only_when_it_fits(tiny_synthetic, tmp_path):
    from nvsm.models.checkpoint import load_checkpoint, save_checkpoint

    recs = load_dataset("synthetic", tiny_synthetic, split="train").records
    data = build_cropset(recs, crop_scale=0.2, crop_size=tuple(SIZE), show_progress=False)
    cfg = _cfg()
    meshes = category_meshes(tiny_synthetic, ["car"], 200)
    trainer = NeMoTrainer(build_model(cfg, meshes), cfg.train, seed=0)
    trainer.fit(data, steps=2, checkpoint_path=tmp_path / "model.pt", show_progress=False)
    state_file = tmp_path / "model.train_state.rank0.pt"
    saved = load_checkpoint(state_file)

    def fresh(step=2):
        other = NeMoTrainer(NeMoModel.load(tmp_path / "model.pt")[0], cfg.train, seed=5)
        other.step = step
        return other

    taker = fresh()
    assert taker.restore_training_state(tmp_path / "model.pt") is None
    assert torch.equal(taker.generator.get_state(), trainer.generator.get_state())
    assert torch.equal(taker.augment.generator.get_state(), trainer.augment.generator.get_state())
    ours, theirs = taker.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(torch.equal(ours[i]["exp_avg_sq"], theirs[i]["exp_avg_sq"]) for i in ours)

    def refused(tensors, metadata, step=2):
        save_checkpoint(state_file, tensors, metadata)
        other = fresh(step)
        before = other.generator.get_state()
        why = other.restore_training_state(tmp_path / "model.pt")
        assert torch.equal(other.generator.get_state(), before)  # nothing taken over
        assert other.optimizer.state_dict()["state"] == {}
        return why

    tensors, meta = saved.tensors, saved.metadata
    assert refused(tensors, meta, step=4) == f"{state_file} is from step 2, the model from step 4"
    assert refused(tensors, {**meta, "world_size": 2}) == (
        f"{state_file} was saved by 2 process(es), this run has 1")
    assert refused(tensors, {**meta, "device": "cuda"}) == (
        f"{state_file} was saved on cuda, this run is on cpu")
    random = {k: v for k, v in tensors["random"].items() if k != "augment"}
    assert refused({**tensors, "random": random}, meta) == (
        f"{state_file}: entry 'random' lacks a generator state for ['augment']")
    garbled = {**tensors["random"], "torch": torch.zeros(3, dtype=torch.uint8)}
    assert refused({**tensors, "random": garbled}, meta) == (
        f"{state_file}: entry 'random' lacks a generator state for ['torch']")
    assert refused({**tensors, "random": torch.zeros(2)}, meta) == (
        f"{state_file}: entries 'random' and 'optimizer' must each hold named tensors")
    moments = dict(tensors["optimizer"])
    moments["0"] = {**moments["0"], "exp_avg": torch.zeros(3)}
    assert refused({**tensors, "optimizer": moments}, meta) == (
        f"{state_file}: entry 'optimizer.0' fits no parameter of this model")
    assert refused({**tensors, "optimizer": {"x": {}}}, meta) == (
        f"{state_file}: entry 'optimizer.x' fits no parameter of this model")
    state_file.write_bytes(b"not a checkpoint")
    assert fresh().restore_training_state(tmp_path / "model.pt").startswith(
        f"{state_file}: corrupt or unreadable checkpoint")


def test_near_mode_2d_trains_and_bad_mode_is_rejected(tiny_synthetic):
    recs = load_dataset("synthetic", tiny_synthetic, split="train").records
    data = build_cropset(recs, crop_scale=0.2, crop_size=tuple(SIZE), show_progress=False)
    meshes = category_meshes(tiny_synthetic, ["car"], 200)
    cfg = _cfg(**{"train.near_mode": "2d", "train.near_radius_px": 2.0})
    trainer = NeMoTrainer(build_model(cfg, meshes), cfg.train, seed=0)
    assert np.isfinite(trainer.fit(data, steps=1, show_progress=False)["final_loss"])
    # A config built in code (loading rejects it already) is checked by the trainer itself.
    bad = dataclasses.replace(cfg.train, near_mode="sideways")
    message = r"train\.near_mode: expected one of 3d \| 2d, got 'sideways'"
    with pytest.raises(ConfigError, match=message):
        NeMoTrainer(build_model(cfg, meshes), bad)


def test_a_loss_scaler_wraps_the_step_when_mixed_precision_is_on(tiny_synthetic):
    # On CUDA, float16 autocast ran without loss scaling (small gradients flush to zero). No GPU
    # here: on the CPU there is no scaler, and a recording one shows how a step uses it.
    recs = load_dataset("synthetic", tiny_synthetic, split="train").records
    data = build_cropset(recs, crop_scale=0.2, crop_size=tuple(SIZE), show_progress=False)
    cfg = _cfg()
    trainer = NeMoTrainer(build_model(cfg, category_meshes(tiny_synthetic, ["car"], 200)),
                          cfg.train, seed=0)
    assert cfg.train.amp and not trainer.use_amp and trainer.scaler is None
    calls = []

    class RecordingScaler:
        def scale(self, loss):
            calls.append("scale")
            return loss

        def step(self, optimizer):
            calls.append("step")
            optimizer.step()

        def update(self):
            calls.append("update")

    trainer.scaler = RecordingScaler()
    trainer.fit(data, steps=2, show_progress=False)
    assert calls == ["scale", "step", "update"] * 2


def test_checkpoints_follow_the_run_step_and_a_diverged_loss_stops_training(tiny_synthetic,
                                                                            tmp_path):
    from nvsm.train.trainer import TrainingDiverged

    recs = load_dataset("synthetic", tiny_synthetic, split="train").records
    data = build_cropset(recs, crop_scale=0.2, crop_size=tuple(SIZE), show_progress=False)
    meshes = category_meshes(tiny_synthetic, ["car"], 200)
    cfg = _cfg(**{"train.checkpoint_every": 4})
    trainer = NeMoTrainer(build_model(cfg, meshes), cfg.train, seed=0)
    saved: list[int] = []
    trainer.save = lambda path: saved.append(trainer.step)
    # Resumed at step 5: the saves were counted from the resume (9, 13) and the last one,
    # at a multiple, written twice.
    trainer.step = 5
    trainer.fit(data, steps=8, checkpoint_path=tmp_path / "model.pt", show_progress=False)
    assert saved == [8, 12, 13]
    saved.clear()
    trainer.fit(data, steps=3, checkpoint_path=tmp_path / "model.pt", show_progress=False)
    assert saved == [16]
    # A loss that is no longer a number ended in exit 0 and a checkpoint of NaN weights.
    hot = _cfg(**{"train.lr_head": 1e30, "train.lr_backbone": 1e30, "train.warmup_steps": 0})
    trainer = NeMoTrainer(build_model(hot, meshes), hot.train, seed=0)
    saved.clear()
    trainer.save = lambda path: saved.append(trainer.step)
    message = r"training diverged at step (\d+): the loss is nan .*model\.pt keeps the last step"
    with pytest.raises(TrainingDiverged, match=message) as info:
        trainer.fit(data, steps=6, checkpoint_path=tmp_path / "model.pt", show_progress=False)
    diverged = int(re.search(r"step (\d+)", str(info.value)).group(1))
    assert all(step < diverged for step in saved)  # nothing written from the diverged step on


def test_a_checkpoint_with_the_wrong_contents_is_named(tiny_synthetic, tmp_path):
    # Each of these is nvsm's own file format holding parts that do not fit the model; loading
    # used to end in torch's RuntimeError, a KeyError or an IndexError from inside.
    from nvsm.models import CheckpointError, load_checkpoint, save_checkpoint

    cfg = _cfg()
    build_model(cfg, category_meshes(tiny_synthetic, ["car"], 200)).save(tmp_path / "good.pt")
    good = load_checkpoint(tmp_path / "good.pt")
    stem = next(iter(good.tensors["backbone"]))
    bank = good.tensors["banks"]["car"]
    mesh = good.tensors["meshes"]["car"]
    cases = {
        "backbone": ({**good.tensors, "backbone": {**good.tensors["backbone"],
                                                   stem: torch.zeros(3)}}, good.metadata,
                     "entry 'backbone' does not fit"),
        "no_config": (good.tensors, {"step": 1}, "metadata lacks the run's config"),
        "mesh": ({**good.tensors, "meshes": {"car": {"vertices": torch.zeros(5)}}},
                 good.metadata, "entry 'meshes.car' must hold 'vertices' and 'faces'"),
        "mesh_shape": ({**good.tensors, "meshes": {"car": {"vertices": torch.zeros(5),
                                                           "faces": torch.zeros(1, 3)}}},
                       good.metadata, "entry 'meshes.car': "),
        "bank_category": ({**good.tensors, "banks": {"bus": bank}}, good.metadata,
                          "entry 'banks' must hold a bank for each of the meshes' categories "
                          "['car'] (not none), has ['bus']"),
        "bank_shape": ({**good.tensors, "banks": {"car": {**bank, "memory": torch.zeros(3, 2)}}},
                       good.metadata, "entry 'banks.car' does not fit FeatureBank: 1 of another "
                       f"shape (memory (3, 2) for {tuple(bank['memory'].shape)})"),
        "other_config": (good.tensors, {"config": {}}, "entry 'backbone' does not fit"),
        "other_backbone": (good.tensors, {"config": {"model": {"backbone": "resnet50-unet"}}},
                           "entry 'backbone' does not fit ResNet50UNetBackbone: "),
        # Entries of the wrong kind ended in AttributeError, RuntimeError or TypeError.
        "meshes_tensor": ({**good.tensors, "meshes": torch.zeros(3)}, good.metadata,
                          "entry 'meshes' must map categories to meshes, is a tensor"),
        "mesh_tensor": ({**good.tensors, "meshes": {"car": torch.zeros(3)}}, good.metadata,
                        "entry 'meshes.car' must hold 'vertices' and 'faces', has a tensor"),
        "bank_tensor": ({**good.tensors, "banks": {"car": torch.zeros(3)}}, good.metadata,
                        "no state dict 'banks.car'"),
        # Float faces failed in rendering; NaN vertices gave every image the first template.
        "float_faces": ({**good.tensors,
                         "meshes": {"car": {**mesh, "faces": mesh["faces"].float()}}},
                        good.metadata, "entry 'meshes.car': Mesh.faces must be int32 or int64 "
                        "vertex indices, got torch.float32"),
        "nan_vertices": ({**good.tensors, "meshes": {"car": {
            **mesh, "vertices": mesh["vertices"].clone().fill_(math.nan)}}}, good.metadata,
            "entry 'meshes.car': Mesh.vertices must be finite"),
    }
    for name, (tensors, meta, message) in cases.items():
        path = save_checkpoint(tmp_path / f"{name}.pt", tensors, meta)
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: {message}")) as info:
            NeMoModel.load(path)
        # One line: another kind of backbone made torch list thousands of keys (14 kB).
        assert "\n" not in str(info.value) and len(str(info.value)) < 600, (name, str(info.value))
    # Metadata that is JSON but not a mapping (save_checkpoint itself writes only mappings).
    payload = torch.load(tmp_path / "good.pt", weights_only=True)
    torch.save({**payload, "metadata": "[1, 2]"}, tmp_path / "list_meta.pt")
    with pytest.raises(CheckpointError,
                       match=r"list_meta\.pt: checkpoint metadata must be a JSON object, got list"):
        NeMoModel.load(tmp_path / "list_meta.pt")


def test_vertex_projection_follows_the_mesh_device():
    # Training moves the mesh to the model's device and hands in the crop set's CPU poses and
    # cameras: the projection mixed the two, so every training step failed on a GPU. No GPU
    # here: a fake CUDA device (fake tensors carry a device and shape but no data) shows it.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nvsm.mesh import cuboid_mesh
    from nvsm.train.trainer import project_mesh_vertices

    vertices = cuboid_mesh([-1, -1, -1], [1, 1, 1], 50).vertices
    poses = torch.tensor([[0.3, 0.2, 0.0, 5.0], [1.0, 0.1, 0.1, 5.0]], dtype=torch.float64)
    k = torch.tensor([[[375.0, 0, 40], [0, 375.0, 16], [0, 0, 1]]] * 2, dtype=torch.float64)
    with FakeTensorMode(allow_non_fake_inputs=True):
        px = project_mesh_vertices(vertices.to("cuda"), poses, k)
    assert px.device.type == "cuda" and px.shape == (2, len(vertices), 2)
