"""Deterministic few-shot subsets, azimuth coverage and the unseen-azimuth split.

Determinism: inputs are sorted by ``ObjectRecord.uid`` before any draw, and every draw uses
``numpy.random.Generator(PCG64(SeedSequence([seed, crc32(category)])))``, so the same records and
seed give the same lists on any machine and Python/numpy version with the PCG64 stream.

Few-shot splits (NVSM protocol: N ∈ {7, 20, 50} annotated training images per category, the rest
of the training set unlabelled, the test set untouched). Lists for increasing N are *nested*
(the 7 are inside the 20, the 20 inside the 50), as NVSM's anchors are part of every annotated
set. Strategies:

* ``random``: N draws without replacement.
* ``stratified``: azimuth split into ``n_bins`` equal bins (default N) centred on
  k·360°/n_bins (so 0° = front views get their own bin); one record is drawn from each bin that
  does not hold a labelled record yet (when there are more such bins than records still to
  draw, which bins get one is drawn too); if bins are empty the remainder is drawn at random.

``nvsm fewshot`` and ``nvsm train`` take their N labelled records from the same nested chain as
``nvsm data split``'s default lists: through the sizes of ``FEW_SHOT_LADDER`` below N, then N.

Unseen-azimuth split (NeMo ``create_vp_limited_list.py``): 8 bins of 45° starting at 0° with mask
``TFFTTFFT`` (T = seen: train on [0, 45), [135, 225), [315, 360); test on the F bins). Bounds are
strict as in the reference, so azimuths exactly on a multiple of 45° are in neither set; they are
returned separately, never dropped silently.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from nvsm.data.record import ObjectRecord
from nvsm.errors import check_choice
from nvsm.io import atomic_write_text, check_output_folder, staging_folder

__all__ = [
    "FEW_SHOT_LADDER",
    "LABELS_SETTING",
    "SPLIT_STRATEGIES",
    "UNSEEN_AZIMUTH_PATTERN",
    "AzimuthCoverage",
    "FewShotSplit",
    "UnseenAzimuthSplit",
    "azimuth_bins",
    "azimuth_coverage",
    "few_shot_splits",
    "read_split_list",
    "select_labelled",
    "unseen_azimuth_split",
    "write_few_shot_split",
    "write_few_shot_splits",
    "write_split_list",
]

Strategy = Literal["random", "stratified"]
SPLIT_STRATEGIES: tuple[str, ...] = get_args(Strategy)
#: The papers' labelled-set sizes: ``nvsm data split``'s default lists, nested in this order.
FEW_SHOT_LADDER = (7, 20, 50)
#: What sets the labelled-set size of a run, named when it asks for more records than there are.
LABELS_SETTING = "labels.annotations, the --annotations option of 'nvsm fewshot'"
UNSEEN_AZIMUTH_PATTERN = "TFFTTFFT"
_TWO_PI = 2 * math.pi


def _rng(seed: int, tag: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed),
                                                                      zlib.crc32(tag.encode())])))


def _sorted_unique(records: Iterable[ObjectRecord]) -> list[ObjectRecord]:
    recs = sorted(records, key=lambda r: r.uid)
    for a, b in itertools.pairwise(recs):
        if a.uid == b.uid:
            raise ValueError(f"duplicate record id {a.uid!r} ({a.image_path}, {b.image_path})")
    return recs


def azimuth_bins(azimuth: np.ndarray | Sequence[float], n_bins: int) -> np.ndarray:
    """Bin index in [0, n_bins) of each azimuth (radians); bins are centred on k·2π/n_bins."""
    width = _TWO_PI / n_bins
    a = np.mod(np.asarray(azimuth, dtype=np.float64) + width / 2, _TWO_PI)
    return np.minimum((a // width).astype(np.int64), n_bins - 1)


def select_labelled(
    records: Sequence[ObjectRecord],
    n: int,
    strategy: Strategy = "random",
    seed: int = 0,
    *,
    n_bins: int | None = None,
    keep: Sequence[str] = (),
    tag: str = "",
    rng: np.random.Generator | None = None,
    setting: str = LABELS_SETTING,
) -> list[str]:
    """Pick ``n`` labelled record ids (``uid``) from ``records``.

    Args:
        records: candidates (order does not matter; they are sorted by uid).
        n: how many (``ValueError`` if more than there are records).
        strategy: ``"random"`` or ``"stratified"`` over azimuth.
        seed: seed of the PCG64 stream (with ``tag``) unless ``rng`` is given.
        n_bins: azimuth bins for ``"stratified"``; default ``n``.
        keep: ids that must be part of the result (nested splits); they count towards ``n``.
        tag: mixed into the seed (e.g. the category).
        setting: what set ``n``, named when it asks for more records than there are.
    Returns:
        the ``n`` ids, sorted.
    """
    check_choice(strategy, Strategy, "strategy")
    recs = _sorted_unique(records)
    _require_records(recs, n, setting)
    ids = [r.uid for r in recs]
    chosen = list(dict.fromkeys(keep))
    missing = set(chosen) - set(ids)
    if missing:
        raise ValueError(f"kept ids not among the records: {sorted(missing)[:5]}")
    if len(chosen) > n:
        raise ValueError(f"{len(chosen)} kept ids exceed n = {n}")
    rng = rng or _rng(seed, tag)
    taken = set(chosen)
    if strategy == "stratified" and len(chosen) < n:
        bins = azimuth_bins([r.azimuth for r in recs], n_bins or n)
        covered = {int(bins[ids.index(k)]) for k in chosen}
        pools = {
            b: pool
            for b in range(n_bins or n)
            if b not in covered
            and (pool := [i for i in np.flatnonzero(bins == b) if ids[i] not in taken])
        }
        if len(pools) > n - len(chosen):
            # Visited in bin order, the last bins never got a record whatever the seed.
            drawn = rng.choice(len(pools), size=n - len(chosen), replace=False)
            pools = {b: pools[b] for b in sorted(np.array(list(pools))[drawn].tolist())}
        for pool in pools.values():
            pick = ids[pool[int(rng.integers(len(pool)))]]
            chosen.append(pick)
            taken.add(pick)
    if len(chosen) < n:
        rest = [k for k in ids if k not in taken]
        extra = rng.choice(len(rest), size=n - len(chosen), replace=False)
        chosen.extend(rest[int(i)] for i in sorted(extra))
    return sorted(chosen)


@dataclass(frozen=True)
class AzimuthCoverage:
    """How well a set of azimuths covers the circle.

    Attributes:
        n_bins: number of equal bins (centred on k·360°/n_bins).
        counts: per-bin counts.
        covered_bins: bins with at least one azimuth.
        fraction: covered_bins / n_bins.
        max_gap_deg: largest angular gap between neighbouring azimuths (360 for ≤ 1 azimuth).
    """

    n_bins: int
    counts: tuple[int, ...]
    covered_bins: int
    fraction: float
    max_gap_deg: float


def azimuth_coverage(azimuths: Sequence[float] | np.ndarray, n_bins: int = 8) -> AzimuthCoverage:
    """Coverage of the azimuth circle by ``azimuths`` (radians), e.g. of a set of anchors."""
    a = np.mod(np.asarray(azimuths, dtype=np.float64).ravel(), _TWO_PI)
    counts = np.bincount(azimuth_bins(a, n_bins), minlength=n_bins) if a.size else \
        np.zeros(n_bins, dtype=np.int64)
    if a.size <= 1:
        gap = 360.0
    else:
        s = np.sort(a)
        gaps = np.diff(np.append(s, s[0] + _TWO_PI))
        gap = float(np.degrees(gaps.max()))
    covered = int(np.count_nonzero(counts))
    return AzimuthCoverage(n_bins, tuple(int(c) for c in counts), covered, covered / n_bins, gap)


@dataclass(frozen=True)
class FewShotSplit:
    """Labelled / unlabelled / test ids of one category.

    Attributes:
        category, n_labelled, strategy, seed: how it was made.
        labelled: ids with pose annotation (sorted).
        unlabelled: the rest of the training records (sorted).
        test: test record ids (sorted).
        coverage: azimuth coverage of the labelled records (8 bins).
    """

    category: str
    n_labelled: int
    strategy: str
    seed: int
    labelled: tuple[str, ...]
    unlabelled: tuple[str, ...]
    test: tuple[str, ...]
    coverage: AzimuthCoverage


def _require_records(recs: Sequence[ObjectRecord], n: int, setting: str) -> None:
    if n > len(recs):
        cats = ", ".join(sorted({r.category for r in recs})) or "the given categories"
        raise ValueError(f"asked for {n} labelled records of {cats} ({setting}) but only "
                         f"{len(recs)} are available")


def few_shot_splits(
    train: Sequence[ObjectRecord],
    test: Sequence[ObjectRecord],
    n_labelled: Sequence[int] = (7, 20, 50),
    strategy: Strategy = "stratified",
    seed: int = 0,
    *,
    nested: bool = True,
    setting: str = "n_labelled",
) -> dict[tuple[str, int], FewShotSplit]:
    """Few-shot splits for every category in ``train`` and every N in ``n_labelled``.

    Args:
        train, test: records (any categories; split per category).
        n_labelled: labelled-set sizes; with ``nested`` each set contains the smaller ones.
        strategy, seed, setting: see ``select_labelled``.
    Returns:
        {(category, N): FewShotSplit}.
    """
    out: dict[tuple[str, int], FewShotSplit] = {}
    by_cat: dict[str, list[ObjectRecord]] = {}
    for r in train:
        by_cat.setdefault(r.category, []).append(r)
    test_by_cat: dict[str, list[str]] = {}
    for r in test:
        test_by_cat.setdefault(r.category, []).append(r.uid)
    for category in sorted(by_cat):
        recs = _sorted_unique(by_cat[category])
        # The largest size first: a smaller one that does not fit either named that one, which
        # the user may never have asked for (a nested ladder rung below --annotations).
        _require_records(recs, max(n_labelled, default=0), setting)
        azimuth = {r.uid: r.azimuth for r in recs}
        rng = _rng(seed, category)
        previous: list[str] = []
        for n in sorted(set(n_labelled)):
            keep = previous if nested else ()
            labelled = select_labelled(recs, n, strategy, seed, keep=keep,
                                       rng=rng if nested else _rng(seed, f"{category}/{n}"),
                                       setting=setting)
            chosen = set(labelled)
            out[(category, n)] = FewShotSplit(
                category=category, n_labelled=n, strategy=strategy, seed=seed,
                labelled=tuple(labelled),
                unlabelled=tuple(r.uid for r in recs if r.uid not in chosen),
                test=tuple(sorted(test_by_cat.get(category, []))),
                coverage=azimuth_coverage([azimuth[k] for k in labelled]),
            )
            previous = labelled
    return out


def write_split_list(path: Path, ids: Iterable[str]) -> Path:
    """Write one id per line, atomically (temp file + ``os.replace``)."""
    path = Path(path)
    atomic_write_text(path, "".join(f"{i}\n" for i in ids))
    return path


def read_split_list(path: Path) -> list[str]:
    """Ids from a list written by ``write_split_list`` (blank lines ignored; a UTF-8 byte-order
    mark, as some editors write, is not part of the first id)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _split_folder(split: FewShotSplit, out_dir: Path) -> Path:
    return Path(out_dir) / split.category / f"n{split.n_labelled}_{split.strategy}_seed{split.seed}"


def write_few_shot_split(split: FewShotSplit, out_dir: Path, dataset: str = "") -> Path:
    """Write ``labelled.txt``, ``unlabelled.txt``, ``test.txt`` and ``split.json`` into
    ``<out_dir>/<category>/n<N>_<strategy>_seed<seed>/``; returns that folder."""
    folder = _split_folder(split, out_dir)
    for name in ("labelled", "unlabelled", "test"):
        write_split_list(folder / f"{name}.txt", getattr(split, name))
    meta = {
        "dataset": dataset, "category": split.category, "n_labelled": split.n_labelled,
        "strategy": split.strategy, "seed": split.seed,
        "counts": {k: len(getattr(split, k)) for k in ("labelled", "unlabelled", "test")},
        "labelled_azimuth_coverage": asdict(split.coverage),
        "id_format": "<image_id>:<object_index>",
    }
    atomic_write_text(folder / "split.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def write_few_shot_splits(
    splits: Sequence[FewShotSplit], out_dir: Path, dataset: str = ""
) -> list[Path]:
    """Write several splits (``write_few_shot_split``) as one unit; returns their folders.

    All are written into a staging folder first (``staging_folder``), so that a failure leaves
    ``out_dir`` as it was rather than holding the splits of some categories only. A new
    ``out_dir`` is then renamed into place whole; in an existing one each split folder is
    swapped in (one it held already is replaced), after checking that no file stands in the
    way of any of them.

    Raises:
        ValueError: no splits, or ``out_dir`` or a folder inside it that a split needs is a file.
    """
    out_dir = Path(out_dir)
    if not splits:
        raise ValueError(f"no splits to write into {out_dir}")
    targets = [_split_folder(sp, out_dir) for sp in splits]
    for target in targets:  # out_dir and every folder below it that a split needs
        check_output_folder(target)
    with staging_folder(out_dir) as tmp:
        staged = tmp / "out"
        for sp in splits:
            write_few_shot_split(sp, staged, dataset)
        if not out_dir.exists():
            os.replace(staged, out_dir)
            return targets
        for sp, target in zip(splits, targets, strict=True):
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                os.replace(target, tmp / "replaced")
            os.replace(_split_folder(sp, staged), target)
            shutil.rmtree(tmp / "replaced", ignore_errors=True)
        return targets


@dataclass(frozen=True)
class UnseenAzimuthSplit:
    """Records by azimuth bin under a seen/unseen mask.

    Attributes:
        seen: records strictly inside a T bin (training side).
        unseen: records strictly inside an F bin (test side).
        on_boundary: records exactly on a bin boundary (in neither set, as in the reference).
    """

    seen: tuple[ObjectRecord, ...]
    unseen: tuple[ObjectRecord, ...]
    on_boundary: tuple[ObjectRecord, ...]


def unseen_azimuth_split(
    records: Iterable[ObjectRecord],
    pattern: str = UNSEEN_AZIMUTH_PATTERN,
    boundary_tol_deg: float = 1e-9,
) -> UnseenAzimuthSplit:
    """Split records by azimuth with a T/F mask over equal bins starting at 0°.

    Args:
        pattern: one letter per bin, T = seen (default ``"TFFTTFFT"``, 45° bins).
        boundary_tol_deg: azimuths within this of a bin boundary count as on it.
    """
    if not pattern or set(pattern) - {"T", "F"}:
        raise ValueError(f"pattern must be T/F letters, got {pattern!r}")
    width = 360.0 / len(pattern)
    seen: list[ObjectRecord] = []
    unseen: list[ObjectRecord] = []
    boundary: list[ObjectRecord] = []
    for rec in _sorted_unique(records):
        deg = math.degrees(rec.azimuth) % 360.0
        k = round(deg / width)
        if abs(deg - k * width) <= boundary_tol_deg:
            boundary.append(rec)
            continue
        (seen if pattern[int(deg // width) % len(pattern)] == "T" else unseen).append(rec)
    return UnseenAzimuthSplit(tuple(seen), tuple(unseen), tuple(boundary))
