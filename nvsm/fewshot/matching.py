"""Neural view matching (NVSM E-step, part 2): score synthesised views against target images.

The NVSM score of a synthesised view m (features V_m, usable-pixel mask Ω_m from
``SynthesizedViews.mask``) for a target image t (feature map F_t) is

    linear:           s(t, m) = 1/A_m · Σ_{p ∈ Ω_m} ⟨V̂_m(p), F̂_t(p)⟩
    clutter-aware:    s(t, m) = 1/A_m · Σ_{p ∈ Ω_m} ReLU(⟨V̂_m(p), F̂_t(p)⟩ − ⟨b, F̂_t(p)⟩)

with V̂, F̂ the per-pixel L2-renormalised features (rendered features are barycentric mixes of
unit vectors, shorter than 1), b the clutter model (``nvsm.infer.solve.clutter_model``) and A_m
the view's area: |Ω_m| by default (``areas=None``), or the caller's (M,) ``areas`` — the loop
passes the view's whole silhouette (``SynthesizedViews.silhouette``), so that the holes (faces
the anchor never saw) count as no evidence instead of dropping out of the mean.

Why divide by |Ω_m| and not by the map size: the reference (``retrieve_similarity``) sums the
correlation over all pixels, so a view's score grows with its silhouette area and large views
(side views of a car) win matches they do not deserve; the clutter-aware sum of the NeMo loss
has the same bias. The mean over the view's own covered pixels is a cosine in [−1, 1] for every
view, comparable across views of any size (the feasibility prototype measured 1–10 points more
pseudo-label precision). But the mean over Ω_m alone rewards views that are mostly holes: a view
synthesised far from its anchor keeps a few usable faces, and a small patch can agree with a
target by chance (measured: in a fourth EM round, shifts up to 120°, the accepted pseudo-labels
fell to 81 % Acc@π/6; with A_m = the silhouette 99 %). Dividing by the silhouette keeps the
score comparable across view sizes and scales it by the share of the view the anchor supports.
A view with no usable pixel scores −inf and is never matched.

Exact linear encoding (used by ``FaissMatcher``): with u_m = vec(1_{Ω_m} · V̂_m) / A_m and
x_t = vec(F̂_t) over the same (D × pixels) layout, s_linear(t, m) = ⟨x_t, u_m⟩ exactly, so a
maximum-inner-product index over the views answers the linear score. Pixels no view covers never
contribute and are dropped from both encodings (``support``). The ReLU of the clutter-aware
score is not linear, so FAISS then only shortlists the top-k' views per target by the linear
score and the shortlist is re-scored exactly (``nvsm_similarity_pairs``): exact whenever the
clutter-aware top-k lies inside the linear top-k' (always when k' ≥ M).

Hubness (``view_hubness``): a view that scores high against many targets (in practice the
unshifted views, Δ = 0, which reproduce an anchor's own features without synthesis holes, and
the anchors whose appearance is close to the average car) wins matches it does not deserve, so
an end-on car is matched to the half-turn view of a "hub" anchor. The correction is CSLS
(cross-domain similarity local scaling, Conneau et al., ICLR 2018, from nearest-neighbour word
translation): s'(t, m) = s(t, m) − r_m / 2 with r_m the mean of view m's k best scores over the
targets. (CSLS's target term r_t is the same for every view of a target, so it cannot change a
target's ranking and is left out.) The matchers take −r_m / 2 as per-view ``offsets`` and add
them before their top-k, so the k views kept per target are the best by the corrected score
(correcting the k best raw scores afterwards would miss a view that only the correction lifts
into the top k).

Self-matches are excluded by masking the score matrix (−inf): ``exclude`` is a (T, M) bool mask
(True = forbidden) or a pair (target_ids (T,), view_source_ids (M,)) forbidding equal ids.
Returned indices are −1 (and scores −inf) where fewer than k views can be matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from nvsm.config import FaissIndexType, check_choice

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "Exclude",
    "FaissMatcher",
    "FaissViewIndex",
    "Matcher",
    "PreparedViews",
    "TorchMatcher",
    "encode_targets",
    "encode_views",
    "exclusion_mask",
    "faiss_available",
    "nvsm_similarity",
    "nvsm_similarity_pairs",
    "prepare_views",
    "top_scores",
    "view_hubness",
]

#: Element budget of one intermediate tensor in the chunked computations (64 MiB of float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 24

#: A (T, M) bool mask (True = forbidden), or (target_ids (T,), view_source_ids (M,)), or None.
Exclude = torch.Tensor | tuple[Any, Any] | None

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Preparation and encodings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedViews:
    """Views reduced to the pixels any view covers, renormalised and masked.

    Attributes:
        features: (M, D, Ps) per-pixel unit features, zero outside each view's mask.
        mask: (M, Ps) bool usable pixels.
        counts: (M,) number of usable pixels (float, the compute dtype).
        support: (h·w,) bool, the Ps pixels covered by at least one view.
        map_shape: (D, h, w) of the original maps.
        areas: (M,) the score's denominators A_m (module docstring; float, the compute dtype).
        offsets: optional (M,) added to every score of each view (the CSLS correction −r_m / 2;
            float, the compute dtype).
    """

    features: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor
    support: torch.Tensor
    map_shape: tuple[int, int, int]
    areas: torch.Tensor
    offsets: torch.Tensor | None = None

    @property
    def num_views(self) -> int:
        return int(self.features.shape[0])

    @property
    def empty(self) -> torch.Tensor:
        """(M,) bool, views without a usable pixel (scored −inf)."""
        return self.counts == 0

    def encoded(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """(M', D·Ps) u_m = vec(1_Ω V̂_m) / A_m of the selected views (a new tensor; zero
        rows for empty views)."""
        f = self.features[rows].flatten(1)  # (reshape(n, -1) is ambiguous with no rows)
        return f / self.areas[rows].clamp(min=1)[:, None]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_maps(name: str, x: torch.Tensor) -> tuple[int, int, int, int]:
    if x.ndim != 4:
        raise ValueError(f"{name} must be (N, D, h, w), got {tuple(x.shape)}")
    n, d, h, w = x.shape
    return int(n), int(d), int(h), int(w)


def prepare_views(
    views: torch.Tensor,
    view_masks: torch.Tensor,
    dtype: torch.dtype | None = None,
    chunk: int = 1024,
    areas: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> PreparedViews:
    """Renormalise, mask and support-restrict synthesised views (``chunk`` views at a time, so
    the transient memory stays near one copy of the result).

    Args:
        views: (M, D, h, w) synthesised features; view_masks: (M, h, w) bool usable pixels.
        dtype: compute dtype (default: float32, or float64 for float64 views).
        areas: optional (M,) score denominators A_m, each ≥ the view's usable pixel count
            (default: that count).
        offsets: optional (M,) finite values added to each view's scores.
    Returns:
        ``PreparedViews``.
    """
    m, d, h, w = _check_maps("views", views)
    if view_masks.shape != (m, h, w):
        raise ValueError(f"view_masks must be ({m}, {h}, {w}), got {tuple(view_masks.shape)}")
    dtype = dtype or _compute_dtype(views)
    masks = view_masks.to(device=views.device, dtype=torch.bool).reshape(m, h * w)
    support = masks.any(dim=0)
    sel = masks[:, support]
    feats = views.new_empty((m, d, int(support.sum())), dtype=dtype)
    for m0 in range(0, m, chunk):
        m1 = min(m0 + chunk, m)
        part = views[m0:m1].to(dtype).reshape(m1 - m0, d, h * w)[:, :, support]
        part = F.normalize(part, dim=1, eps=1e-12)
        feats[m0:m1] = part * sel[m0:m1, None, :].to(dtype)
    counts = sel.sum(1).to(dtype)
    if areas is None:
        denominators = counts
    else:
        if areas.shape != (m,):
            raise ValueError(f"areas must be ({m},), got {tuple(areas.shape)}")
        denominators = areas.to(device=counts.device, dtype=dtype)
        if bool((denominators < counts).any()):
            raise ValueError("areas must be >= each view's number of usable pixels")
    if offsets is not None:
        if offsets.shape != (m,):
            raise ValueError(f"offsets must be ({m},), got {tuple(offsets.shape)}")
        offsets = offsets.to(device=counts.device, dtype=dtype)
        if not bool(torch.isfinite(offsets).all()):
            raise ValueError("offsets must be finite")
    return PreparedViews(feats, sel, counts, support, (d, h, w), denominators, offsets)


def _select_targets(targets: torch.Tensor, pv: PreparedViews) -> torch.Tensor:
    """(T, D, h, w) → (T, D, Ps) per-pixel unit features on the views' support."""
    t, d, h, w = _check_maps("targets", targets)
    if (d, h, w) != pv.map_shape:
        raise ValueError(f"targets have maps {(d, h, w)}, the views {pv.map_shape}")
    x = targets.to(device=pv.features.device, dtype=pv.features.dtype).reshape(t, d, h * w)
    return F.normalize(x[:, :, pv.support], dim=1, eps=1e-12)


def encode_views(
    views: torch.Tensor, view_masks: torch.Tensor, areas: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-score encoding of views: ⟨encode_targets(t), encode_views(v)[m]⟩ = s_linear(t, m).

    Args:
        views: (M, D, h, w); view_masks: (M, h, w) bool; areas: as ``prepare_views``.
    Returns:
        vectors (M, D·Ps) (zero rows for views without usable pixels) and support (h·w,) bool.
    """
    pv = prepare_views(views, view_masks, areas=areas)
    return pv.encoded(), pv.support


def encode_targets(targets: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Target encoding matching ``encode_views``: (T, D, h, w) → (T, D·Ps) per-pixel unit
    features restricted to ``support`` (h·w,) bool."""
    t, d, h, w = _check_maps("targets", targets)
    if support.shape != (h * w,):
        raise ValueError(f"support must be ({h * w},), got {tuple(support.shape)}")
    dtype = _compute_dtype(targets)
    x = targets.to(dtype).reshape(t, d, h * w)[:, :, support.to(targets.device)]
    return F.normalize(x, dim=1, eps=1e-12).flatten(1)


# --------------------------------------------------------------------------------------------
# Exclusion
# --------------------------------------------------------------------------------------------


def exclusion_mask(
    target_ids: Any, view_ids: Any, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(T, M) bool, True where target_ids[t] == view_ids[m] (a view synthesised from the
    target image itself). Ids: int tensors, or any numpy-comparable sequences (e.g. uids)."""
    if isinstance(target_ids, torch.Tensor) and isinstance(view_ids, torch.Tensor):
        return (target_ids.to(device)[:, None] == view_ids.to(device)[None, :]).to(torch.bool)
    a = np.asarray(target_ids)
    b = np.asarray(view_ids)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError("target_ids and view_ids must be 1-D")
    return torch.as_tensor(a[:, None] == b[None, :], dtype=torch.bool, device=device)


class _Exclusion:
    """Row slices of an ``Exclude`` specification for T targets and M views."""

    def __init__(self, exclude: Exclude, t: int, m: int) -> None:
        self.mask: torch.Tensor | None = None
        self.ids: tuple[Any, Any] | None = None
        if exclude is None:
            return
        if isinstance(exclude, torch.Tensor):
            if exclude.shape != (t, m):
                raise ValueError(f"exclude mask must be ({t}, {m}), got {tuple(exclude.shape)}")
            self.mask = exclude.to(torch.bool)
        elif isinstance(exclude, tuple) and len(exclude) == 2:
            tid, vid = exclude
            if len(tid) != t or len(vid) != m:
                raise ValueError(
                    f"exclude ids must have lengths ({t}, {m}), got ({len(tid)}, {len(vid)})"
                )
            self.ids = (tid, vid)
        else:
            raise TypeError("exclude must be a (T, M) bool tensor or a (target_ids, view_ids) pair")

    def rows(self, start: int, stop: int, device: torch.device) -> torch.Tensor | None:
        if self.mask is not None:
            return self.mask[start:stop].to(device)
        if self.ids is not None:
            return exclusion_mask(self.ids[0][start:stop], self.ids[1], device)
        return None


# --------------------------------------------------------------------------------------------
# Brute-force scores
# --------------------------------------------------------------------------------------------


def _score_block(
    pv: PreparedViews, tsel: torch.Tensor, clutter: torch.Tensor | None, budget: int
) -> torch.Tensor:
    """(Tc, M) scores of the selected targets (Tc, D, Ps) against all prepared views."""
    tc = tsel.shape[0]
    m = pv.num_views
    ps = tsel.shape[2]
    if clutter is None:
        s = tsel.flatten(1) @ pv.features.flatten(1).T  # no views or targets: (Tc, 0) or (0, M)
    else:
        b = clutter.to(device=tsel.device, dtype=tsel.dtype)
        clu = torch.einsum("d,tdp->pt", b, tsel)[:, :, None]  # (Ps, Tc, 1)
        # Contiguous pixel-major operands: bmm on permuted views is ~50x slower on CPU.
        tp = tsel.permute(2, 0, 1).contiguous()  # (Ps, Tc, D)
        s = tsel.new_empty(tc, m)
        step = max(1, budget // max(1, ps * tc))
        for m0 in range(0, m, step):
            m1 = min(m0 + step, m)
            vp = pv.features[m0:m1].permute(2, 1, 0).contiguous()  # (Ps, D, mc)
            obj = torch.bmm(tp, vp)  # (Ps, Tc, mc)
            obj.sub_(clu).relu_().mul_(pv.mask[m0:m1].T[:, None, :].to(obj.dtype))
            s[:, m0:m1] = obj.sum(0)
    s = s / pv.areas.clamp(min=1)[None]
    if pv.offsets is not None:
        s = s + pv.offsets[None]
    return s.masked_fill(pv.empty[None], NEG_INF)


def _target_rows(pv: PreparedViews, budget: int) -> int:
    """Targets per chunk so that the per-chunk intermediates stay within ``budget`` elements."""
    d, _, _ = pv.map_shape
    ps = int(pv.support.sum())
    return max(1, budget // max(1, ps * max(d, 64), pv.num_views))


def nvsm_similarity(
    views: torch.Tensor,
    view_masks: torch.Tensor,
    targets: torch.Tensor,
    clutter: torch.Tensor | None = None,
    exclude: Exclude = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    areas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Size-normalised NVSM score of every target against every view (brute force, chunked).

    Args:
        views: (M, D, h, w) synthesised features (renormalised per pixel here).
        view_masks: (M, h, w) bool usable pixels (``SynthesizedViews.mask``).
        targets: (T, D, h, w) target feature maps (renormalised per pixel here).
        clutter: optional (D,) clutter model b; gives the clutter-aware score (module docstring).
        exclude: optional self-match exclusion (module docstring); excluded pairs score −inf.
        chunk_elements: element budget of the intermediates.
        areas: optional (M,) denominators A_m (``prepare_views``; default the usable pixels).
    Returns:
        (T, M) scores: the sum of the cosines over each view's usable pixels divided by A_m
        (clutter-aware: of ReLU(cos − clutter cos)); −inf for excluded pairs and for views
        without usable pixels.
    """
    pv = prepare_views(views, view_masks, _compute_dtype(views, targets), areas=areas)
    t = targets.shape[0]
    excl = _Exclusion(exclude, t, pv.num_views)
    rows = _target_rows(pv, chunk_elements)
    out = []
    for start in range(0, t, rows):
        stop = min(start + rows, t)
        s = _score_block(pv, _select_targets(targets[start:stop], pv), clutter, chunk_elements)
        forbid = excl.rows(start, stop, s.device)
        out.append(s if forbid is None else s.masked_fill(forbid, NEG_INF))
    if not out:
        return views.new_empty(0, pv.num_views, dtype=pv.features.dtype)
    return torch.cat(out)


def top_scores(scores: torch.Tensor, k: int, best: torch.Tensor | None = None) -> torch.Tensor:
    """(≤k, M) the k best scores of every view (column) over the targets (rows) of ``scores``
    (T, M), merged with an earlier ``best`` (k', M) so that targets can come in chunks;
    descending, −inf where a view has fewer finite scores."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pool = scores if best is None else torch.cat([best.to(scores.dtype), scores])
    return pool.topk(min(k, pool.shape[0]), dim=0).values


def view_hubness(top: torch.Tensor) -> torch.Tensor:
    """(M,) CSLS hubness r_m of every view: the mean of its finite best scores ``top`` (k, M)
    (``top_scores``); 0 for a view that no target can match."""
    finite = torch.isfinite(top)
    total = torch.where(finite, top, torch.zeros_like(top)).sum(0)
    return total / finite.sum(0).clamp(min=1)


def _pair_scores(
    pv: PreparedViews,
    tsel: torch.Tensor,
    candidates: torch.Tensor,
    clutter: torch.Tensor | None,
    budget: int,
) -> torch.Tensor:
    """(Tc, K) exact scores of targets (Tc, D, Ps) against their candidate views (Tc, K) (−1 =
    none → −inf)."""
    tc, k = candidates.shape
    out = tsel.new_full((tc, k), NEG_INF)
    if tc == 0 or k == 0:
        return out
    d, ps = tsel.shape[1], tsel.shape[2]
    rows = max(1, budget // max(1, k * d * ps))
    b = None if clutter is None else clutter.to(device=tsel.device, dtype=tsel.dtype)
    for r0 in range(0, tc, rows):
        r1 = min(r0 + rows, tc)
        cand = candidates[r0:r1].to(tsel.device)
        safe = cand.clamp(min=0)
        t = tsel[r0:r1]
        obj = (pv.features[safe] * t[:, None]).sum(2)  # (r, K, Ps); faster than einsum here
        if b is not None:
            obj = torch.relu(obj - torch.einsum("d,rdp->rp", b, t)[:, None, :])
        s = (obj * pv.mask[safe]).sum(-1) / pv.areas[safe].clamp(min=1)
        if pv.offsets is not None:
            s = s + pv.offsets[safe]
        out[r0:r1] = s.masked_fill((cand < 0) | pv.empty[safe], NEG_INF)
    return out


def nvsm_similarity_pairs(
    views: torch.Tensor,
    view_masks: torch.Tensor,
    targets: torch.Tensor,
    candidates: torch.Tensor,
    clutter: torch.Tensor | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    areas: torch.Tensor | None = None,
) -> torch.Tensor:
    """``nvsm_similarity`` restricted to given (target, view) pairs.

    Args:
        views, view_masks, targets, clutter, areas: as ``nvsm_similarity``.
        candidates: (T, K) int64 view indices per target, −1 for none.
    Returns:
        (T, K) scores, −inf where the candidate is −1 or has no usable pixel.
    """
    pv = prepare_views(views, view_masks, _compute_dtype(views, targets), areas=areas)
    if candidates.ndim != 2 or candidates.shape[0] != targets.shape[0]:
        raise ValueError(
            f"candidates must be (T={targets.shape[0]}, K), got {tuple(candidates.shape)}"
        )
    return _pair_scores(pv, _select_targets(targets, pv), candidates, clutter, chunk_elements)


def _topk(
    scores: torch.Tensor, index: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row of (T, K) scores (with candidate view ids (T, K), or column ids when None),
    padded to k with −inf / −1; entries scoring −inf get index −1. Equal scores are ordered by
    view id (``torch.topk`` leaves their order to the device and the thread count, so the
    chosen view, its anchor and its shift could change with them)."""
    t, kk = scores.shape
    n = min(k, kk)
    if index is None:
        ids = torch.arange(kk, device=scores.device).expand(t, kk)
        by_id = ids
    else:
        ids = index.to(scores.device)
        by_id = ids.argsort(dim=1, stable=True)
    # A stable sort by score of the columns in view-id order keeps equal scores in that order.
    order = scores.gather(1, by_id).argsort(dim=1, descending=True, stable=True)[:, :n]
    pos = by_id.gather(1, order)
    vals, idx = scores.gather(1, pos), ids.gather(1, pos)
    idx = idx.masked_fill(vals == NEG_INF, -1)
    if n < k:
        vals = torch.cat([vals, vals.new_full((t, k - n), NEG_INF)], dim=1)
        idx = torch.cat([idx, idx.new_full((t, k - n), -1)], dim=1)
    return vals, idx


# --------------------------------------------------------------------------------------------
# Matchers
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Matcher(Protocol):
    """Finds, for every target image, the k best-scoring synthesised views."""

    def search(
        self,
        views: torch.Tensor,
        view_masks: torch.Tensor,
        targets: torch.Tensor,
        k: int,
        *,
        clutter: torch.Tensor | None = None,
        exclude: Exclude = None,
        areas: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k views per target.

        Args:
            views: (M, D, h, w); view_masks: (M, h, w) bool; targets: (T, D, h, w); k ≥ 1.
            clutter: optional (D,), selects the clutter-aware score.
            exclude: optional self-match exclusion.
            areas: optional (M,) score denominators (module docstring; default |Ω_m|).
            offsets: optional (M,) added to each view's scores before the top-k (the hubness
                correction −r_m / 2), so that the k kept are the best corrected ones.
        Returns:
            scores (T, k) descending (equal scores: the lower view index first) and index
            (T, k) int64 view indices (−1 / −inf padding).
        """
        ...


@dataclass(frozen=True)
class TorchMatcher:
    """Exact brute-force matcher (``nvsm_similarity`` + top-k), targets in chunks.

    Attributes:
        query_batch: targets per chunk (None: derived from ``chunk_elements``).
        chunk_elements: element budget of the intermediates.
    """

    query_batch: int | None = None
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    def search(
        self,
        views: torch.Tensor,
        view_masks: torch.Tensor,
        targets: torch.Tensor,
        k: int,
        *,
        clutter: torch.Tensor | None = None,
        exclude: Exclude = None,
        areas: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See ``Matcher.search``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        pv = prepare_views(
            views, view_masks, _compute_dtype(views, targets), areas=areas, offsets=offsets
        )
        t = targets.shape[0]
        excl = _Exclusion(exclude, t, pv.num_views)
        rows = self.query_batch or _target_rows(pv, self.chunk_elements)
        out_s, out_i = [], []
        for start in range(0, t, rows):
            stop = min(start + rows, t)
            s = _score_block(
                pv, _select_targets(targets[start:stop], pv), clutter, self.chunk_elements
            )
            forbid = excl.rows(start, stop, s.device)
            if forbid is not None:
                s = s.masked_fill(forbid, NEG_INF)
            vals, idx = _topk(s, None, k)
            out_s.append(vals)
            out_i.append(idx)
        if not out_s:
            return pv.features.new_empty(0, k), torch.empty(0, k, dtype=torch.int64)
        return torch.cat(out_s), torch.cat(out_i)


def faiss_available() -> bool:
    """Whether ``faiss`` can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "FaissMatcher needs faiss (`pip install faiss-cpu`); TorchMatcher needs nothing"
        ) from exc
    return faiss


@dataclass
class FaissViewIndex:
    """A FAISS index over the non-empty views (built by ``FaissMatcher.build``).

    Attributes:
        index: the faiss index (inner product) over the encoded views ``valid``.
        views: the ``PreparedViews`` (kept for the exact re-scoring).
        valid: (M',) int64 view ids of the index rows (views with usable pixels).
        projection: optional (D·Ps, pca_dim) orthonormal columns applied to both encodings.
        keep: objects the index references (e.g. the IVF quantizer, GPU resources).
    """

    index: Any
    views: PreparedViews
    valid: torch.Tensor
    projection: torch.Tensor | None
    keep: list[Any] = field(default_factory=list, repr=False)

    @property
    def num_views(self) -> int:
        return self.views.num_views


@dataclass(frozen=True)
class FaissMatcher:
    """FAISS inner-product search over the views' linear encodings (module docstring).

    The index holds the (fewer) synthesised views; targets are encoded and queried in batches
    of ``query_batch`` (memory bounded; ``build`` once and ``query`` per streamed chunk of
    targets to avoid holding all targets at all).

    * Linear score, uncompressed: FAISS returns exact scores (flat; IVF with nprobe = nlist).
    * Clutter-aware score, or ``pca_dim`` set: FAISS shortlists max(k, ``shortlist``) views per
      target by the (possibly compressed) linear score and the shortlist is re-scored exactly
      (``nvsm_similarity_pairs``); the top-k of the re-scored shortlist is returned.
    * ``pca_dim``: uncentred PCA of the view encodings (a centred PCA would bias inner products
      by the mean); ⟨Wᵀx, Wᵀu⟩ = ⟨x, u⟩ whenever u lies in the span of W, so with pca_dim ≥ the
      number of views (trained on all of them) the compressed linear scores are exact.

    Attributes:
        index_type: ``'flat'`` (exact) or ``'ivf'`` (IndexIVFFlat, inverted lists).
        nlist: IVF lists (clamped to the number of views); nprobe: lists visited per query.
        use_gpu: move the index to GPU 0 (needs a GPU build of faiss).
        pca_dim: optional compressed dimension.
        shortlist: k' of the re-scored paths.
        query_batch: targets per query batch.
        pca_train_size: at most this many views fit the PCA; seed: its random draws.
        full_rescore_ratio: re-score a shortlist of k' views pair by pair only when
            full_rescore_ratio·k' < M, else take the exact full score block and gather
            (gathered pair scoring was measured ~30-50x slower per pair than the batched
            block on a 2-core CPU). The results are the same either way.
        chunk_elements: element budget of the torch intermediates.
    """

    index_type: FaissIndexType = "flat"
    nlist: int = 64
    nprobe: int = 8
    use_gpu: bool = False
    pca_dim: int | None = None
    shortlist: int = 64
    query_batch: int = 256
    pca_train_size: int = 20_000
    seed: int = 0
    full_rescore_ratio: int = 32
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    def __post_init__(self) -> None:
        check_choice(self.index_type, FaissIndexType, "index_type")
        if self.nlist < 1 or self.nprobe < 1 or self.shortlist < 1 or self.query_batch < 1:
            raise ValueError("nlist, nprobe, shortlist and query_batch must be >= 1")
        if self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"pca_dim must be >= 1, got {self.pca_dim}")

    def _fit_projection(self, x: torch.Tensor) -> torch.Tensor:
        """(d, q) orthonormal basis of the dominant (uncentred) subspace of the rows of x."""
        assert self.pca_dim is not None
        g = torch.Generator().manual_seed(self.seed)
        if x.shape[0] > self.pca_train_size:
            x = x[torch.randperm(x.shape[0], generator=g)[: self.pca_train_size].to(x.device)]
        n, d = x.shape
        if self.pca_dim >= min(n, d):
            # The whole row space: exact for every training vector.
            q, _ = torch.linalg.qr(x.T.double())
            return q.to(x.dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            _, _, v = torch.svd_lowrank(x.double(), q=self.pca_dim, niter=6)
        return v.to(x.dtype)

    def _project(self, x: torch.Tensor, projection: torch.Tensor | None) -> np.ndarray:
        y = x if projection is None else x @ projection
        return np.ascontiguousarray(y.detach().to("cpu", torch.float32).numpy())

    def build(
        self,
        views: torch.Tensor,
        view_masks: torch.Tensor,
        areas: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> FaissViewIndex:
        """Encode the views (M, D, h, w) with masks (M, h, w) (score denominators ``areas``
        and score ``offsets``, see ``prepare_views``) and build the index. An offset is one
        more coordinate of the view's encoding, against a constant 1 in every target's, so
        the index's inner products include it exactly."""
        faiss = _import_faiss()
        pv = prepare_views(views, view_masks, areas=areas, offsets=offsets)
        valid = torch.nonzero(~pv.empty).squeeze(1).cpu()
        enc = pv.encoded(valid.to(pv.features.device))
        projection = self._fit_projection(enc) if self.pca_dim is not None and len(valid) else None
        x = self._project(enc, projection)
        if pv.offsets is not None:
            column = pv.offsets[valid.to(pv.offsets.device)][:, None]
            x = np.hstack([x, self._project(column, None)])
        dim = max(1, x.shape[1])
        keep: list[Any] = []
        if self.index_type == "flat" or len(valid) == 0:
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = min(self.nlist, len(valid))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = min(self.nprobe, nlist)
            keep.append(quantizer)
        if self.use_gpu:
            if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
                raise RuntimeError("FaissMatcher(use_gpu=True) needs faiss-gpu and a visible GPU")
            res = faiss.StandardGpuResources()
            keep.extend([res, index])
            index = faiss.index_cpu_to_gpu(res, 0, index)
        if len(valid):
            index.add(x)
        return FaissViewIndex(index, pv, valid, projection, keep)

    def query(
        self,
        built: FaissViewIndex,
        targets: torch.Tensor,
        k: int,
        *,
        clutter: torch.Tensor | None = None,
        exclude: Exclude = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k views for targets (T, D, h, w) against a built index; ``exclude`` refers to
        these T targets. Returns scores (T, k) and view indices (T, k), as ``Matcher.search``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        pv = built.views
        t = targets.shape[0]
        excl = _Exclusion(exclude, t, pv.num_views)
        n_valid = len(built.valid)
        rescore = clutter is not None or built.projection is not None
        want = max(k, self.shortlist) if rescore else k
        valid_dev = built.valid.to(pv.features.device)
        out_s, out_i = [], []
        for start in range(0, t, self.query_batch):
            stop = min(start + self.query_batch, t)
            tsel = _select_targets(targets[start:stop], pv)
            forbid = excl.rows(start, stop, tsel.device)
            extra = int(forbid.sum(1).max()) if forbid is not None and forbid.numel() else 0
            kk = min(n_valid, want + extra)
            if kk == 0:
                vals = tsel.new_full((stop - start, k), NEG_INF)
                out_s.append(vals)
                out_i.append(
                    torch.full((stop - start, k), -1, dtype=torch.int64, device=tsel.device)
                )
                continue
            q = self._project(tsel.reshape(stop - start, -1), built.projection)
            if pv.offsets is not None:
                q = np.hstack([q, np.ones((q.shape[0], 1), np.float32)])
            dist, lab = built.index.search(q, kk)
            lab_t = torch.as_tensor(lab, dtype=torch.int64, device=tsel.device)
            cand = torch.where(
                lab_t >= 0, valid_dev[lab_t.clamp(min=0)], torch.full_like(lab_t, -1)
            )
            scores = torch.as_tensor(dist, device=tsel.device).to(tsel.dtype)
            if forbid is not None:
                hit = forbid.gather(1, cand.clamp(min=0)) & (cand >= 0)
                cand = cand.masked_fill(hit, -1)
            scores = scores.masked_fill(cand < 0, NEG_INF)
            if rescore:
                if self.full_rescore_ratio * kk >= n_valid:
                    full = _score_block(pv, tsel, clutter, self.chunk_elements)
                    scores = full.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, NEG_INF)
                else:
                    scores = _pair_scores(pv, tsel, cand, clutter, self.chunk_elements)
            vals, idx = _topk(scores, cand, k)
            out_s.append(vals)
            out_i.append(idx)
        if not out_s:
            return pv.features.new_empty(0, k), torch.empty(0, k, dtype=torch.int64)
        return torch.cat(out_s), torch.cat(out_i)

    def search(
        self,
        views: torch.Tensor,
        view_masks: torch.Tensor,
        targets: torch.Tensor,
        k: int,
        *,
        clutter: torch.Tensor | None = None,
        exclude: Exclude = None,
        areas: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See ``Matcher.search`` (``build`` + ``query``)."""
        built = self.build(views, view_masks, areas, offsets)
        return self.query(built, targets, k, clutter=clutter, exclude=exclude)
