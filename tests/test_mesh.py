import numpy as np
import pytest
import torch

import nvsm.pose as P
from nvsm.mesh import (
    Mesh,
    MeshFormatError,
    coverage_interval,
    cuboid_mesh,
    facing_visibility,
    multi_cuboids,
    read_off,
    single_cuboid,
    vertex_normals,
    write_off,
)

CAR_BOX = ([-0.9, -2.2, 0.0], [0.9, 2.2, 1.5])


def test_cuboid_vertex_count_and_extent():
    m = cuboid_mesh(*CAR_BOX, n_vertices=1000)
    assert 1000 <= m.num_vertices <= 1200
    np.testing.assert_allclose(m.vertices.min(0).values, CAR_BOX[0], atol=1e-6)
    np.testing.assert_allclose(m.vertices.max(0).values, CAR_BOX[1], atol=1e-6)
    # The reference's face grids: int(L / e + 1) samples per edge, 2 triangles per cell.
    size = np.subtract(CAR_BOX[1], CAR_BOX[0])
    e = np.sqrt(2 * (size[0] * size[1] + size[1] * size[2] + size[0] * size[2]) / 1000)
    n = [int(s / e + 1) for s in size]
    expected_v = 2 * (n[0] * n[1] + n[1] * n[2] + n[0] * n[2])
    expected_f = 4 * ((n[0] - 1) * (n[1] - 1) + (n[1] - 1) * (n[2] - 1) + (n[0] - 1) * (n[2] - 1))
    assert m.num_vertices == expected_v and m.faces.shape[0] == expected_f


def test_cuboid_faces_point_outwards():
    m = cuboid_mesh(*CAR_BOX, n_vertices=300)
    tri = m.vertices[m.faces]
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    centre = torch.tensor([0.0, 0.0, 0.75])
    outward = ((tri.mean(1) - centre) * normal).sum(-1)
    assert (outward > 0).all()
    n = vertex_normals(m)
    # Unwelded: each vertex's normal is exactly one of the six axis directions.
    assert torch.allclose(n.abs().max(-1).values, torch.ones(m.num_vertices))


def test_visibility_matches_face_test_and_camera_side():
    m = cuboid_mesh(*CAR_BOX, n_vertices=500)
    # Camera straight in front of the +y face (azimuth 180°, elevation 0): only that face.
    c = torch.as_tensor(P.camera_centre(np.pi, 0.0, 10.0), dtype=torch.float32)[None]
    vis = facing_visibility(m, c)[0]
    on_plus_y = torch.isclose(m.vertices[:, 1], torch.tensor(2.2)) & (vertex_normals(m)[:, 1] > 0.5)
    assert torch.equal(vis, on_plus_y)
    # A batch of poses: opposite cameras see disjoint vertex sets.
    cs = torch.as_tensor(
        P.camera_centre(np.array([0.3, 0.3 + np.pi]), np.array([0.4, -0.4]), np.array([8.0, 8.0])),
        dtype=torch.float32,
    )
    v = facing_visibility(m, cs)
    assert v.shape == (2, m.num_vertices) and not (v[0] & v[1]).any() and v[0].any()


def test_coverage_rule_and_single_multi():
    rng = np.random.default_rng(0)
    full, half = ([-1, -2, 0], [1, 2, 1.4]), ([-0.5, -1, 0], [0.5, 1, 0.7])
    cad = [rng.uniform(*box, size=(5000, 3)) for box in (full, half, full)]
    cad[0][:10] = [50, 50, 50]  # 0.2 % outliers are ignored by the 99 % rule
    lo, hi = coverage_interval(cad[0][:, 0], 0.99)
    assert -1.0 <= lo < -0.97 and 0.97 < hi <= 1.0

    def fits(mesh: Mesh, box: tuple[list[float], list[float]]) -> bool:
        # The 99 % rule leaves out 1 % of uniform points: at most ~1 % of an axis's range,
        # split between its two ends (1.5 % allows for the sampling).
        v, lo, hi = mesh.vertices.numpy(), np.array(box[0]), np.array(box[1])
        return bool((np.abs(np.stack([v.min(0) - lo, v.max(0) - hi])) <= 0.015 * (hi - lo)).all())

    assert fits(single_cuboid(cad), full)  # pooled: the full-size models decide the extremes
    multi = multi_cuboids(cad)
    assert len(multi) == 3 and all(isinstance(x, Mesh) for x in multi)
    assert [fits(m, box) for m, box in zip(multi, (full, half, full), strict=True)] == [True] * 3
    assert not fits(multi[1], full)


def test_off_round_trip(tmp_path):
    m = cuboid_mesh(*CAR_BOX, n_vertices=200)
    write_off(tmp_path / "01.off", m)
    m2 = read_off(tmp_path / "01.off")
    assert torch.equal(m.faces, m2.faces)
    assert torch.allclose(m.vertices, m2.vertices, atol=1e-6)


def test_off_rejects_lines_beyond_header_counts(tmp_path):
    # The header declares 1 face and the file holds 2: the second must not be dropped.
    extra = tmp_path / "extra.off"
    extra.write_text("OFF\n4 1 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n3 0 1 2\n# c\n\n3 0 2 3\n")
    with pytest.raises(MeshFormatError, match=r"extra\.off: line 10: .* 1 faces .*'3 0 2 3'"):
        read_off(extra)
    extra.write_text("OFF\n4 1 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n3 0 1 2\n# trailing note\n\n")
    assert read_off(extra).faces.tolist() == [[0, 1, 2]]
    for text in ("OFF\n", "OFF -1 2 0\n0 0 0\n3 0 0 0\n"):
        extra.write_text(text)
        with pytest.raises(MeshFormatError, match=r"extra\.off: vertex/face list"):
            read_off(extra)


def test_off_quads_and_bad_files(tmp_path):
    p = tmp_path / "quad.off"
    p.write_text("OFF\n4 1 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n")
    assert read_off(p).faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    bad = tmp_path / "bad.off"
    bad.write_text("OFF\n4 1 0\n0 0 0\n1 0 0\n")
    with pytest.raises(MeshFormatError, match=r"bad\.off"):
        read_off(bad)
    notoff = tmp_path / "x.off"
    notoff.write_text("PLY\n")
    with pytest.raises(MeshFormatError, match="expected 'OFF'"):
        read_off(notoff)
    oob = tmp_path / "oob.off"
    oob.write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n")
    with pytest.raises(MeshFormatError, match=r"oob\.off"):
        read_off(oob)
    with pytest.raises(MeshFormatError, match="box_max > box_min"):
        cuboid_mesh([0, 0, 0], [1, -1, 1])


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8, torch.float32, torch.bool])
def test_mesh_faces_must_be_int32_or_int64(dtype):
    # int16/uint8 faces were accepted and then failed deep inside rendering (uint8 indexing
    # is even read as a bool mask).
    v = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    with pytest.raises(MeshFormatError, match=rf"Mesh.faces must be int32 or int64 .*{dtype}"):
        Mesh(v, f.to(dtype))
    for ok in (torch.int32, torch.int64):
        assert torch.equal(vertex_normals(Mesh(v, f.to(ok))), vertex_normals(Mesh(v, f)))
