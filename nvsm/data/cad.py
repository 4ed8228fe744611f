"""CAD models of a dataset: PASCAL3D+'s ``CAD/<cat>.mat`` and OFF files (``CAD/<cat>/<NN>.off``).

OFF files are read with ``nvsm.mesh.read_off``; its ``MeshFormatError`` becomes a
``DataFormatError`` naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nvsm.data.errors import DataFormatError, check_items, is_real
from nvsm.data.matlab import load_mat_struct, struct_list
from nvsm.mesh import Mesh, MeshFormatError, read_off

__all__ = ["CadModel", "load_cad_models"]


@dataclass(frozen=True)
class CadModel:
    """One CAD model in PASCAL3D+ object coordinates (z up).

    Attributes:
        vertices: (V, 3) float64.
        faces: (F, 3) int64, 0-based, triangles (polygons are fan-triangulated).
        name: file name or ``"<cat>.mat[<i>]"``.
    """

    vertices: np.ndarray
    faces: np.ndarray
    name: str

    def mesh(self) -> Mesh:
        """The model as an ``nvsm.mesh.Mesh`` (float32 vertices)."""
        return Mesh(torch.as_tensor(self.vertices, dtype=torch.float32),
                    torch.as_tensor(self.faces, dtype=torch.int64))


def _read_off(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3) float64, faces (F, 3) int64) of an OFF file via ``nvsm.mesh.read_off``."""
    try:
        mesh = read_off(path)
    except MeshFormatError as exc:
        raise DataFormatError(path, "<off>", "a valid OFF mesh", str(exc)) from exc
    return mesh.vertices.double().numpy(), mesh.faces.numpy()


def _rows_of_three(value: object, path: Path, field: str, integer: bool) -> np.ndarray:
    """``value`` as an (N, 3) float64 array of finite numbers (integers when ``integer``).

    Raises:
        DataFormatError: naming ``path`` and ``field`` for any other type, shape or value.
    """
    what = "1-based vertex indices (integers)" if integer else "finite coordinates"
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros((0, 3))
    if arr.shape == (3,):  # squeeze_me turns a single row into a vector
        arr = arr.reshape(1, 3)
    if not is_real(arr) or arr.ndim != 2 or arr.shape[1] != 3:
        raise DataFormatError(path, field, f"an (N, 3) array of {what}",
                              f"{arr.dtype} array of shape {arr.shape}")
    arr = arr.astype(np.float64)
    check_items(path, field, arr, ~np.isfinite(arr) | (integer & (arr != np.round(arr))), what)
    return arr


def _index_of(path: Path) -> int:
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else -1


def load_cad_models(root: Path, category: str, cad_dir: str = "CAD") -> list[CadModel]:
    """CAD models of ``category`` ordered by their (0-based) ``cad_index``.

    Looks for ``<root>/<cad_dir>/<cat>.mat`` (PASCAL3D+: variable ``<cat>``, a struct array with
    ``vertices`` (V, 3) and 1-based ``faces``), else ``<root>/<cad_dir>/<cat>/<NN>.off`` sorted
    by NN (``01.off`` is cad_index 0). ObjectNet3D's OFF files: ``cad_dir="CAD/off"``.

    Raises:
        DataFormatError: no models found, or malformed files.
    """
    base = Path(root) / cad_dir
    mat = base / f"{category}.mat"
    if mat.is_file():
        models = []
        for i, s in enumerate(struct_list(load_mat_struct(mat, category), mat, category)):
            names = s._fieldnames
            if "vertices" not in names or "faces" not in names:
                raise DataFormatError(mat, f"{category}[{i}]", "fields 'vertices' and 'faces'",
                                      f"fields {names}")
            v = _rows_of_three(s.vertices, mat, f"{category}[{i}].vertices", integer=False)
            f = _rows_of_three(s.faces, mat, f"{category}[{i}].faces",
                               integer=True).astype(np.int64) - 1
            if f.size and (f.min() < 0 or f.max() >= len(v)):
                raise DataFormatError(mat, f"{category}[{i}].faces",
                                      f"1-based vertex indices in [1, {len(v)}]",
                                      f"[{f.min() + 1}, {f.max() + 1}]")
            models.append(CadModel(v, f, f"{mat.name}[{i}]"))
        return models
    folder = base / category
    offs = sorted(folder.glob("*.off"), key=lambda p: (_index_of(p), p.name))
    if not offs:
        raise DataFormatError(base, category, f"{mat.name} or {category}/<NN>.off", "missing")
    return [CadModel(*_read_off(p), p.name) for p in offs]
