"""Feature bank, clutter queue and contrastive loss: hand-computed golden values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nvsm.train import (
    BankSet,
    FeatureBank,
    background_regulariser,
    contrastive_loss,
    enqueue,
    momentum_update,
    near_vertex_mask_2d,
    near_vertex_mask_3d,
    sample_clutter_features,
    sample_vertex_features,
)

# --------------------------------------------------------------------------------------------
# contrastive loss
# --------------------------------------------------------------------------------------------
# K = 3 prototypes, D = 2, one clutter entry; T = 0.5 and clutter weight 0.25 keep the
# arithmetic readable.
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
CLUTTER = torch.tensor([[0.0, -1.0]])
T, W = 0.5, 0.25


def _hand_losses() -> tuple[float, float, float]:
    # Image 0, vertex 0: f = (1, 0). f·m = (1, 0, -1) -> logits (2, 0, -2); vertex 2 is "near"
    # vertex 0 and leaves the denominator. f·c = 0 -> clutter logit 0, weighted by 0.25.
    l0 = math.log(math.exp(2) + math.exp(0) + 0.25 * math.exp(0)) - 2.0
    # Image 0, vertex 1: f = (0.6, 0.8). f·m = (0.6, 0.8, -0.6) -> (1.2, 1.6, -1.2); f·c = -0.8
    # -> -1.6. Nothing is near vertex 1; target logit 1.6.
    l1 = math.log(math.exp(1.2) + math.exp(1.6) + math.exp(-1.2) + 0.25 * math.exp(-1.6)) - 1.6
    # Image 1, vertex 2: f = (0, 1). f·m = (0, 1, 0) -> (0, 2, 0); vertex 0 is near vertex 2 and
    # leaves; f·c = -1 -> -2. Target logit 0.
    l2 = math.log(math.exp(2) + math.exp(0) + 0.25 * math.exp(-2)) - 0.0
    return l0, l1, l2


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats = torch.tensor(
        [
            [[1.0, 0.0], [0.6, 0.8], [0.3, 0.3]],  # vertex 2 invisible in image 0
            [[0.5, 0.5], [0.1, 0.2], [0.0, 1.0]],  # only vertex 2 visible in image 1
        ]
    )
    visible = torch.tensor([[True, True, False], [False, False, True]])
    near = torch.zeros(3, 3, dtype=torch.bool)
    near[0, 2] = near[2, 0] = True
    near.fill_diagonal_(True)  # must be ignored: the target always stays
    return feats, visible, near


def test_contrastive_loss_matches_hand_computation():
    feats, visible, near = _case()
    l0, l1, l2 = _hand_losses()
    loss = contrastive_loss(feats, visible, BANK, CLUTTER, near, temperature=T, clutter_weight=W)
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)
    # Per-image weights (confidence): image 1 counts three times.
    wl = contrastive_loss(
        feats, visible, BANK, CLUTTER, near, T, W, weights=torch.tensor([1.0, 3.0])
    )
    assert wl.item() == pytest.approx((l0 + l1 + 3 * l2) / 5, rel=1e-6)
    # A (B, K, K) mask gives the same value as the shared (K, K) one.
    bl = contrastive_loss(feats, visible, BANK, CLUTTER, near.expand(2, 3, 3), T, W)
    assert bl.item() == pytest.approx(loss.item(), rel=1e-6)


def test_contrastive_loss_without_mask_or_clutter():
    feats, visible, _ = _case()
    # No near mask: vertex 0 also sees vertex 2 (logit -2) and vertex 2 sees vertex 0 (logit 0).
    l0 = math.log(math.exp(2) + 1 + math.exp(-2) + 0.25) - 2.0
    l1 = math.log(math.exp(1.2) + math.exp(1.6) + math.exp(-1.2) + 0.25 * math.exp(-1.6)) - 1.6
    l2 = math.log(1 + math.exp(2) + 1 + 0.25 * math.exp(-2))
    loss = contrastive_loss(feats, visible, BANK, CLUTTER, None, T, W)
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)
    # clutter_weight = 0 or an empty queue drops the clutter terms.
    l0n = math.log(math.exp(2) + 1 + math.exp(-2)) - 2.0
    l1n = math.log(math.exp(1.2) + math.exp(1.6) + math.exp(-1.2)) - 1.6
    l2n = math.log(2 + math.exp(2))
    expected = (l0n + l1n + l2n) / 3
    assert contrastive_loss(feats, visible, BANK, CLUTTER, None, T, 0.0).item() == pytest.approx(
        expected, rel=1e-6
    )
    empty = torch.zeros(0, 2)
    assert contrastive_loss(feats, visible, BANK, empty, None, T, W).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_contrastive_loss_no_visible_vertex_is_zero_with_graph():
    feats = torch.randn(2, 3, 2, requires_grad=True)
    loss = contrastive_loss(feats, torch.zeros(2, 3, dtype=torch.bool), BANK, CLUTTER)
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.all(feats.grad == 0)


def test_contrastive_loss_gradcheck_and_shape_errors():
    feats, visible, near = _case()
    f = feats.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: contrastive_loss(x, visible, BANK.double(), CLUTTER.double(), near, T, W), (f,)
    )
    with pytest.raises(ValueError, match="bank"):
        contrastive_loss(feats, visible, BANK[:2], CLUTTER)
    with pytest.raises(ValueError, match="near_mask"):
        contrastive_loss(feats, visible, BANK, CLUTTER, torch.zeros(2, 2, dtype=torch.bool))


def test_background_regulariser_hand_value():
    clutter = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, n=2, D=2)
    # mean_j m_j = (0, 1/3): sims (0, 1/3); mean 1/6; times 0.1.
    assert background_regulariser(clutter, BANK).item() == pytest.approx(0.1 / 6)
    valid = torch.tensor([[False, True]])
    assert background_regulariser(clutter, BANK, 0.5, valid).item() == pytest.approx(0.5 / 3)
    none = torch.zeros(1, 2, dtype=torch.bool)
    assert background_regulariser(clutter, BANK, valid=none).item() == 0.0


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def _fmap() -> torch.Tensor:
    c0 = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    return torch.stack([c0, 10 * (c0 + 1)])[None]  # (1, 2, 2, 3)


def test_sample_vertex_features_bilinear_hand_values():
    px = torch.tensor([[[0.5, 0.5], [2.0, 0.0], [1.25, 0.75], [-3.0, 0.0]]])
    out = sample_vertex_features(_fmap(), px, mode="bilinear", renormalize=False)
    expected = torch.tensor([[[2.0, 30.0], [2.0, 30.0], [3.5, 45.0], [0.0, 10.0]]])
    torch.testing.assert_close(out, expected)
    unit = sample_vertex_features(_fmap(), px, mode="bilinear")
    torch.testing.assert_close(unit, F.normalize(expected, dim=-1))


def test_sample_vertex_features_nearest_hand_values_and_visibility():
    px = torch.tensor([[[0.5, 0.5], [1.49, 0.2], [-3.0, 5.0], [2.0, 1.0]]])
    vis = torch.tensor([[True, True, True, False]])
    out = sample_vertex_features(_fmap(), px, vis, mode="nearest", renormalize=False)
    expected = torch.tensor([[[4.0, 50.0], [1.0, 20.0], [3.0, 40.0], [0.0, 0.0]]])
    torch.testing.assert_close(out, expected)


def test_nearest_matches_reference_integer_division():
    # Crop pixel x -> feature coordinate (x − 3.5) / 8 (feature_intrinsics); the nearest cell
    # must be the reference's x // 8 for every integer crop pixel.
    fmap = torch.arange(4.0).view(1, 1, 1, 4)
    xs = torch.arange(32.0)
    px = torch.stack([(xs - 3.5) / 8, torch.zeros_like(xs)], dim=-1)[None]
    out = sample_vertex_features(fmap, px, mode="nearest", renormalize=False)[0, :, 0]
    torch.testing.assert_close(out, torch.div(xs, 8, rounding_mode="floor"))


def test_sample_clutter_only_background_and_without_replacement():
    h, w = 4, 5
    fmap = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).repeat(2, 1, 1, 1)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[:, 1:3, 1:4] = True  # 6 object cells, 14 background cells
    gen = torch.Generator().manual_seed(0)
    feats, valid = sample_clutter_features(fmap, mask, 10, generator=gen)
    assert feats.shape == (2, 10, 1) and bool(valid.all())
    bg = set(torch.nonzero(~mask[0].flatten()).flatten().tolist())
    for b in range(2):
        cells = feats[b, :, 0].long().tolist()
        assert set(cells) <= bg and len(set(cells)) == 10
    again, _ = sample_clutter_features(fmap, mask, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(feats, again)


def test_sample_clutter_few_or_no_background_cells():
    fmap = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3).repeat(2, 1, 1, 1)
    fmap.requires_grad_(True)
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[0, 0, 1] = mask[0, 1, 2] = False  # image 0: two background cells; image 1: none
    feats, valid = sample_clutter_features(fmap, mask, 5, torch.Generator().manual_seed(1))
    cells = feats[0, :, 0].tolist()
    assert sorted(set(cells)) == [1.0, 5.0] and {cells.count(1.0), cells.count(5.0)} == {2, 3}
    assert valid[0].all() and not valid[1].any() and torch.all(feats[1] == 0)
    feats.sum().backward()
    assert fmap.grad is not None and fmap.grad[0, 0, 0, 1] > 0


def test_masks():
    verts = torch.tensor([[0.0, 0.0, 0.0], [0.05, 0.0, 0.0], [0.2, 0.0, 0.0]])
    expected = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    assert torch.equal(near_vertex_mask_3d(verts, 0.1), expected)
    px = verts[None, :, :2] * 100  # 0, 5, 20 px
    assert torch.equal(near_vertex_mask_2d(px, 10.0), expected[None])


# --------------------------------------------------------------------------------------------
# bank
# --------------------------------------------------------------------------------------------
def test_momentum_update_visibility_weighted():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    feats = torch.tensor(
        [[[0.0, 1.0], [1.0, 0.0], [9.0, 9.0]], [[1.0, 0.0], [5.0, 5.0], [7.0, 7.0]]],
        requires_grad=True,
    )
    vis = torch.tensor([[True, True, False], [True, False, False]])
    before = bank.clone()
    new = momentum_update(bank, feats, vis, momentum=0.5)
    # v0: mean over its 2 visible images (0.5, 0.5); 0.5·(1, 0) + 0.5·(0.5, 0.5) = (0.75, 0.25).
    # v1: visible once, mean (1, 0) (NOT divided by B = 2); 0.5·(0, 1) + 0.5·(1, 0).
    # v2: invisible everywhere -> unchanged bit for bit.
    expected = torch.tensor([[3.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(new[:2], F.normalize(expected, dim=1))
    assert torch.equal(new[2], bank[2]) and torch.equal(bank, before)
    assert not new.requires_grad
    # Confidence weights (1, 3): v0's mean is (0.75, 0.25) -> 0.5·(1, 0) + 0.5·mean.
    weighted = momentum_update(bank, feats, vis, 0.5, weights=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted[0], F.normalize(torch.tensor([0.875, 0.125]), dim=0))
    torch.testing.assert_close(weighted[1], new[1])
    # A zero weight on the only image that sees v1 leaves v1 unchanged.
    zero = momentum_update(bank, feats, vis, 0.5, weights=torch.tensor([0.0, 1.0]))
    assert torch.equal(zero[1], bank[1])
    # Rows that do not count are left out, not multiplied by 0: a NaN where image 1 does not see
    # v1 (0 · NaN = NaN) made v1's prototype NaN, though image 0 sees it.
    nan = feats.detach().clone()
    nan[1, 1] = math.nan
    torch.testing.assert_close(momentum_update(bank, nan, vis, momentum=0.5), new)


def test_enqueue_wraps_like_sequential_writes():
    q = torch.full((5, 1), -1.0)
    rows = torch.arange(13.0)[:, None]
    q1, p = enqueue(q, 0, rows[0:3])
    q2, p = enqueue(q1, p, rows[3:6])
    assert p == 1 and q2[:, 0].tolist() == [5, 1, 2, 3, 4]
    q3, p = enqueue(q2, p, rows[6:13])  # more rows than slots: the last 5 survive
    assert p == 3 and q3[:, 0].tolist() == [10, 11, 12, 8, 9]
    assert q[:, 0].tolist() == [-1] * 5  # inputs untouched


def test_feature_bank_queue_overwrites_every_slot_and_state_dict():
    bank = FeatureBank(num_vertices=4, feature_dim=3, clutter_size=7, momentum=0.9, seed=0)
    assert list(dict(bank.named_parameters())) == []
    assert bank.clutter_queue().shape == (0, 3)
    initial = bank.clutter.clone()
    value = 0
    for step in range(5):  # batches of 3 rows: 7 does not divide 3, the pointer must wrap
        rows = torch.arange(value, value + 3, dtype=torch.float32)[:, None].repeat(1, 3) + 100
        bank.enqueue_clutter(rows)
        value += 3
        assert bank.clutter.shape == (7, 3) and int(bank.clutter_ptr) == (3 * (step + 1)) % 7
    assert bank.clutter_queue().shape == (7, 3)
    assert not torch.isclose(bank.clutter, initial).any()  # every slot overwritten
    # The last 7 of the 15 rows written (values 108..114) are exactly what the queue holds.
    assert sorted(bank.clutter[:, 0].tolist()) == [float(v) for v in range(108, 115)]
    other = FeatureBank(4, 3, 7, seed=1)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.clutter, bank.clutter) and int(other.clutter_ptr) == 1


def test_feature_bank_update_keeps_autograd_graph_valid():
    bank = FeatureBank(3, 2, clutter_size=4)
    bank.enqueue_clutter(F.normalize(torch.randn(2, 2), dim=1))
    feats = F.normalize(torch.randn(2, 3, 2), dim=-1).requires_grad_(True)
    vis = torch.tensor([[True, True, False], [True, False, True]])
    old_memory = bank.memory
    snapshot = old_memory.clone()
    loss = contrastive_loss(feats, vis, bank.memory, bank.clutter_queue())
    clutter = F.normalize(torch.randn(2, 3, 2), dim=-1)
    bank.update(feats, vis, clutter, clutter_valid=torch.tensor([[True, True, False]] * 2))
    loss.backward()  # would fail if the update had modified saved tensors in place
    assert feats.grad is not None
    assert torch.equal(old_memory, snapshot) and bank.memory is not old_memory
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(3))
    assert int(bank.clutter_count) == 4 and int(bank.clutter_ptr) == 2


def test_bank_set():
    banks = BankSet({"car": 5, "bus": 7}, feature_dim=4, clutter_size=8)
    assert banks.categories == ["bus", "car"] and len(banks) == 2 and "car" in banks
    assert banks["car"].memory.shape == (5, 4) and banks["bus"].memory.shape == (7, 4)
    assert "banks.car.memory" in banks.state_dict()
    with pytest.raises(KeyError, match="boat"):
        banks["boat"]
    with pytest.raises(ValueError, match="category"):
        BankSet({"a.b": 3})


# --------------------------------------------------------------------------------------------
# end to end: the loss trains the backbone
# --------------------------------------------------------------------------------------------
def test_gradient_reaches_backbone():
    from nvsm.models import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("efficientnet-lite0").train()
    fmap = bb(torch.randn(2, 3, 64, 96))  # (2, 128, 8, 12)
    k = 6
    px = torch.rand(2, k, 2) * torch.tensor([11.0, 7.0])
    vis = torch.rand(2, k) > 0.3
    vis[:, 0] = True
    bank = FeatureBank(k, 128, clutter_size=16)
    bank.enqueue_clutter(F.normalize(torch.randn(16, 128), dim=1))
    f = sample_vertex_features(fmap, px, vis)
    obj = torch.zeros(2, 8, 12, dtype=torch.bool)
    obj[:, 2:6, 3:9] = True  # an object box; clutter comes from outside it
    clutter, valid = sample_clutter_features(fmap, obj, 4, torch.Generator().manual_seed(0))
    loss = contrastive_loss(
        f, vis, bank.memory, bank.clutter_queue(), near_vertex_mask_2d(px, 2.0)
    ) + background_regulariser(clutter, bank.memory, valid=valid)
    loss.backward()
    bank.update(f, vis, clutter, valid)
    assert bb.stage8[0]._project_conv.weight.grad.abs().sum() > 0
    assert bb.stage16[-1]._project_conv.weight.grad.abs().sum() > 0
    assert bb.head.proj.weight.grad.abs().sum() > 0
    assert bb.stem[0].weight.grad is None  # frozen
