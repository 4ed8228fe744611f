"""Feature banks: one unit-norm prototype per mesh vertex plus a queue of clutter features.

Functional core (pure, no in-place writes to their inputs):

* ``momentum_update(bank, feats, vis, momentum, weights)``: visibility-weighted mean update.
* ``enqueue(queue, ptr, new)``: ring-buffer write.

Shells: ``FeatureBank`` (one mesh; ``nn.Module`` with buffers only, so it moves with ``.to()``
and saves with ``state_dict()``, but is never an optimiser parameter) and ``BankSet`` (one bank
per category, for a shared multi-category backbone).

Fixes relative to the reference ``NearestMemoryManager`` (memo §5.2 and §11):

* the vertex mean divides by the number of images in which the vertex is visible (optionally
  confidence-weighted), not by the batch size;
* the clutter queue has exactly the configured number of slots and a pointer that wraps modulo
  that size, so every slot is overwritten in turn;
* updates build new tensors and rebind the buffers, so tensors captured by an earlier autograd
  graph (the loss of the current step) are never modified.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def momentum_update(
    bank: torch.Tensor,
    feats: torch.Tensor,
    vis: torch.Tensor,
    momentum: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Momentum update of vertex prototypes with the visibility-weighted batch mean.

    For vertex k with w_nk = vis_nk · weights_n and s_k = Σ_n w_nk:

        g_k = Σ_n w_nk f_nk / s_k
        m_k ← normalise(momentum · m_k + (1 − momentum) · g_k)     if s_k > 0
        m_k ← m_k (unchanged, bit for bit)                          otherwise

    Args:
        bank: (K, D) current prototypes.
        feats: (B, K, D) features sampled at the projected vertices (detached here).
        vis: (B, K) bool (or 0/1) visibility.
        momentum: μ in [0, 1]; the weight of the old prototype.
        weights: optional (B,) non-negative per-image weights (e.g. pseudo-label confidence).

    Returns:
        (K, D) new prototypes (a new tensor; ``bank`` is not modified).
    """
    if feats.ndim != 3 or feats.shape[1:] != bank.shape:
        raise ValueError(
            f"feats must be (B, K, D) with (K, D) = {tuple(bank.shape)}, got {tuple(feats.shape)}"
        )
    if vis.shape != feats.shape[:2]:
        raise ValueError(f"vis must be (B, K) = {tuple(feats.shape[:2])}, got {tuple(vis.shape)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    with torch.no_grad():
        feats = feats.detach().to(bank.dtype)
        w = vis.to(bank.dtype)
        if weights is not None:
            if weights.shape != feats.shape[:1]:
                raise ValueError(
                    f"weights must be (B,) = ({feats.shape[0]},), got {tuple(weights.shape)}"
                )
            if bool((weights < 0).any()):
                raise ValueError("per-image weights must be non-negative")
            w = w * weights.detach().to(bank.dtype)[:, None]
        total = w.sum(0)  # (K,)
        seen = total > 0
        # Rows that do not count are zeroed, not multiplied by 0: a NaN there (0 · NaN = NaN)
        # reached the prototype of a vertex the image never saw.
        feats = torch.where((w > 0)[..., None], feats, 0.0)
        mean = (
            torch.einsum("bk,bkd->kd", w, feats)
            / total.clamp_min(torch.finfo(bank.dtype).tiny)[:, None]
        )
        mixed = F.normalize(momentum * bank + (1.0 - momentum) * mean, dim=1)
        return torch.where(seen[:, None], mixed, bank.detach())


def enqueue(queue: torch.Tensor, ptr: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Write ``new`` into a ring buffer starting at slot ``ptr``, wrapping modulo its size.

    With M new rows and Q slots, rows go to slots (ptr + i) mod Q. When M > Q only the last Q
    rows are kept (they end at the same slot as if all M had been written in turn).

    Args:
        queue: (Q, D).
        ptr: next slot to write, in [0, Q).
        new: (M, D) rows (detached here).

    Returns:
        (new queue (Q, D), a new tensor; new pointer (ptr + M) mod Q).
    """
    q = int(queue.shape[0])
    if new.ndim != 2 or new.shape[1] != queue.shape[1]:
        raise ValueError(f"new rows must be (M, {queue.shape[1]}), got {tuple(new.shape)}")
    if q == 0:
        return queue, 0
    if not 0 <= ptr < q:
        raise ValueError(f"queue pointer {ptr} outside [0, {q})")
    m = int(new.shape[0])
    if m == 0:
        return queue, ptr
    rows = new.detach().to(queue.dtype)
    start = ptr
    if m > q:
        rows = rows[m - q :]
        start = (ptr + m - q) % q
    idx = (start + torch.arange(rows.shape[0], device=queue.device)) % q
    return queue.detach().index_copy(0, idx, rows), (ptr + m) % q


def random_unit(n: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, dim) random unit vectors (uniform on the sphere)."""
    return F.normalize(torch.randn(n, dim, generator=generator), dim=1)


class FeatureBank(nn.Module):
    """Vertex prototypes and a clutter queue for one mesh.

    Buffers (all in ``state_dict()``):
        memory: (K, D) unit vertex prototypes, random unit vectors at start.
        clutter: (Q, D) clutter queue.
        clutter_ptr: () int64, next slot to overwrite.
        clutter_count: () int64, slots filled so far (saturates at Q).

    Args:
        num_vertices: K.
        feature_dim: D.
        clutter_size: Q, the exact number of clutter slots.
        momentum: μ of ``momentum_update``.
        seed: seed of the random initial prototypes (and of the unused clutter slots).
    """

    memory: torch.Tensor
    clutter: torch.Tensor
    clutter_ptr: torch.Tensor
    clutter_count: torch.Tensor

    def __init__(
        self,
        num_vertices: int,
        feature_dim: int = 128,
        clutter_size: int = 512,
        momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_vertices <= 0 or feature_dim <= 0 or clutter_size < 0:
            raise ValueError(
                f"FeatureBank needs num_vertices > 0, feature_dim > 0, clutter_size >= 0; got "
                f"{num_vertices}, {feature_dim}, {clutter_size}"
            )
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("memory", random_unit(num_vertices, feature_dim, gen))
        self.register_buffer("clutter", random_unit(clutter_size, feature_dim, gen))
        self.register_buffer("clutter_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("clutter_count", torch.zeros((), dtype=torch.long))

    @property
    def num_vertices(self) -> int:
        return int(self.memory.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.memory.shape[1])

    @property
    def clutter_size(self) -> int:
        return int(self.clutter.shape[0])

    def clutter_queue(self) -> torch.Tensor:
        """(Q', D) the filled clutter slots (all Q once the queue has wrapped once).

        Slots that were never written hold random unit vectors and are left out, so the loss
        never compares against them.
        """
        n = int(self.clutter_count)
        return self.clutter if n >= self.clutter_size else self.clutter[:n]

    @torch.no_grad()
    def update_vertices(
        self, feats: torch.Tensor, visible: torch.Tensor, weights: torch.Tensor | None = None
    ) -> None:
        """Momentum-update the prototypes: feats (B, K, D), visible (B, K), weights (B,)|None."""
        self.memory = momentum_update(self.memory, feats, visible, self.momentum, weights)

    @torch.no_grad()
    def enqueue_clutter(self, feats: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Push clutter features into the queue.

        Args:
            feats: (M, D) or (B, n, D) clutter features (detached here).
            valid: optional mask of the leading dims of ``feats`` ((M,) or (B, n)); rows with
                False are not enqueued.
        """
        if valid is not None:
            feats = feats[valid.bool()]
        feats = feats.reshape(-1, self.feature_dim)
        queue, ptr = enqueue(self.clutter, int(self.clutter_ptr), feats)
        self.clutter = queue
        self.clutter_ptr = torch.tensor(ptr, dtype=torch.long, device=self.clutter.device)
        count = min(self.clutter_size, int(self.clutter_count) + int(feats.shape[0]))
        self.clutter_count = torch.tensor(count, dtype=torch.long, device=self.clutter.device)

    def update(
        self,
        vertex_feats: torch.Tensor,
        visible: torch.Tensor,
        clutter_feats: torch.Tensor | None = None,
        clutter_valid: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """One training step's bank update (call after the loss has been computed).

        Args:
            vertex_feats: (B, K, D); visible: (B, K); weights: (B,)|None, as ``update_vertices``.
            clutter_feats: (B, n, D) or (M, D) clutter features, or None.
            clutter_valid: mask for ``clutter_feats`` as in ``enqueue_clutter``.
        """
        self.update_vertices(vertex_feats, visible, weights)
        if clutter_feats is not None:
            self.enqueue_clutter(clutter_feats, clutter_valid)

    def extra_repr(self) -> str:
        return (
            f"num_vertices={self.num_vertices}, feature_dim={self.feature_dim}, "
            f"clutter_size={self.clutter_size}, momentum={self.momentum}"
        )


class BankSet(nn.Module):
    """One ``FeatureBank`` per category (shared backbone, one mesh and bank per category).

    Args:
        num_vertices: category -> K of its mesh.
        feature_dim, clutter_size, momentum: as ``FeatureBank``.
        seed: base seed; category i gets ``seed + i`` (in sorted category order).
    """

    def __init__(
        self,
        num_vertices: Mapping[str, int],
        feature_dim: int = 128,
        clutter_size: int = 512,
        momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not num_vertices:
            raise ValueError("BankSet needs at least one category")
        for cat in num_vertices:
            if not cat or "." in cat:
                raise ValueError(
                    f"category names must be non-empty and contain no '.', got {cat!r}"
                )
        self.banks = nn.ModuleDict(
            {
                cat: FeatureBank(num_vertices[cat], feature_dim, clutter_size, momentum, seed + i)
                for i, cat in enumerate(sorted(num_vertices))
            }
        )

    @property
    def categories(self) -> list[str]:
        return list(self.banks.keys())

    def __getitem__(self, category: str) -> FeatureBank:
        if category not in self.banks:
            raise KeyError(f"no feature bank for category {category!r}; have {self.categories}")
        return self.banks[category]  # type: ignore[return-value]

    def __contains__(self, category: object) -> bool:
        return isinstance(category, str) and category in self.banks

    def __iter__(self) -> Iterator[str]:
        return iter(self.banks.keys())

    def items(self) -> Iterator[tuple[str, FeatureBank]]:
        """(category, bank) pairs in sorted category order."""
        for cat in self.banks:
            yield cat, self[cat]

    def values(self) -> Iterator[FeatureBank]:
        for _, bank in self.items():
            yield bank

    def __len__(self) -> int:
        return len(self.banks)
