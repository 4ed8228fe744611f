"""Benchmark feature rendering: milliseconds per rendered view for every available backend.

Setting (NeMo's car pose-optimisation case): a ~1000-vertex NeMo cuboid of a 4.5 m x 1.8 m x
1.5 m car scaled to unit length, rendered at random viewpoints at distance 5 into a 32x84 feature
map (a 256x672 crop at stride 8, focal 3000/8 = 375 px) with 128-d vertex features.

Columns (all in ms per view = time of one batched call / batch size):

* raster    ``rasterizer.rasterize`` only (projection done beforehand).
* forward   ``render_pose`` (projection, rasterisation, interpolation, visibility).
* fwd+bwd   ``render_pose`` + loss ``Σ rendered · target`` + backward to the pose (azimuth,
            elevation, theta, distance); ``--feature-grad`` also backpropagates to the features.

Each number is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones.

Usage: python benchmarks/bench_render.py [--device cpu] [--batches 1 144] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _cli import int_at_least, non_negative_int, positive_int, run_main, torch_device

from nvsm.mesh import Mesh, cuboid_mesh
from nvsm.pose import feature_intrinsics, intrinsics, opencv_extrinsics
from nvsm.render import (
    Pytorch3dRasterizer,
    Rasterizer,
    TorchRasterizer,
    default_rasterizer,
    project_vertices,
    pytorch3d_available,
    render_pose,
)

FEATURE_SIZE = (32, 84)
STRIDE = 8
CROP_SIZE = (FEATURE_SIZE[0] * STRIDE, FEATURE_SIZE[1] * STRIDE)
#: Car of length 4.5 (y), width 1.8 (x), height 1.5 (z), scaled to unit length and centred.
CAR_HALF = (0.9 / 4.5, 2.25 / 4.5, 0.75 / 4.5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_case(
    rast: Rasterizer,
    mesh: Mesh,
    feats: torch.Tensor,
    k: torch.Tensor,
    pose: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    target: torch.Tensor,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Time one backend at one batch size (pose tensors (B,), target (B, D, H, W))."""
    batch = int(pose[0].shape[0])
    r_cv, t_cv = opencv_extrinsics(*pose)
    vs = project_vertices(mesh.vertices, r_cv, t_cv, k)
    fill = render_pose(mesh, feats, *pose, k, FEATURE_SIZE, rast).mask.float().mean().item()

    def raster() -> object:
        return rast.rasterize(vs, mesh.faces, FEATURE_SIZE)

    def forward() -> object:
        with torch.no_grad():
            return render_pose(mesh, feats, *pose, k, FEATURE_SIZE, rast)

    def fwd_bwd() -> object:
        a, e, t, d = (x.clone().requires_grad_() for x in pose)
        f = feats.clone().requires_grad_(args.feature_grad)
        o = render_pose(mesh, f, a, e, t, d, k, FEATURE_SIZE, rast)
        (o.features * target).sum().backward()
        return a.grad

    res: dict[str, object] = {"backend": rast.name, "batch": batch, "mask_fill": fill}
    for col, fn in (("raster", raster), ("forward", forward), ("fwd+bwd", fwd_bwd)):
        res[col + "_ms_per_view"] = 1000 * _time(fn, device, args.warmup, args.repeats) / batch
    return res


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it in the tests)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", type=torch_device, default="cpu")
    ap.add_argument("--batches", type=positive_int, nargs="+", default=[1, 144])
    ap.add_argument("--dim", type=positive_int, default=128, help="feature dimension")
    ap.add_argument(
        "--vertices", type=int_at_least(8), default=1000, help="target cuboid vertex count (>= 8)"
    )
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument(
        "--backends", nargs="+", choices=("torch", "pytorch3d"), default=["torch", "pytorch3d"]
    )
    ap.add_argument("--feature-grad", action="store_true", help="also backprop to the features")
    ap.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch CPU threads (0: default)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    return ap


def main() -> None:
    args = build_parser().parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mesh = cuboid_mesh([-h for h in CAR_HALF], list(CAR_HALF), args.vertices).to(device)
    k_crop = intrinsics(3000.0, (CROP_SIZE[1] - 1) / 2, (CROP_SIZE[0] - 1) / 2)
    k = torch.as_tensor(feature_intrinsics(np.asarray(k_crop), STRIDE), dtype=torch.float32,
                        device=device)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(mesh.num_vertices, args.dim, generator=gen).to(device)

    backends: list[Rasterizer] = []
    for name in args.backends:
        if name == "torch":
            backends.append(TorchRasterizer())
        elif pytorch3d_available():
            backends.append(Pytorch3dRasterizer())
        else:
            print("pytorch3d is not importable: skipped")
    if not backends:
        raise SystemExit("error: no backend left to benchmark (see --backends)")

    print(f"device {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"mesh: {mesh.num_vertices} vertices, {mesh.faces.shape[0]} faces; map {FEATURE_SIZE}, "
          f"D = {args.dim}; default rasterizer here: {default_rasterizer(device).name}")

    rows = []
    for batch in args.batches:
        a = (torch.rand(batch, generator=gen) * 2 * math.pi).to(device)
        e = (torch.rand(batch, generator=gen) * 0.6 - 0.1).to(device)
        th = ((torch.rand(batch, generator=gen) - 0.5) * 0.3).to(device)
        d = torch.full((batch,), 5.0, device=device)
        target = torch.randn(batch, args.dim, *FEATURE_SIZE, generator=gen).to(device)
        for rast in backends:
            rows.append(
                _bench_case(rast, mesh, feats, k, (a, e, th, d), target, device, args)
            )
            print(f"  done: {rast.name} batch {batch}", flush=True)

    head = (f"{'backend':<10} {'batch':>5} {'raster':>10} {'forward':>10} {'fwd+bwd':>10} "
            f"{'fill':>6}")
    print(f"\nms per view (median of {args.repeats} runs after {args.warmup} warm-up runs)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:<10} {r['batch']:>5} {r['raster_ms_per_view']:>10.3f} "
              f"{r['forward_ms_per_view']:>10.3f} {r['fwd+bwd_ms_per_view']:>10.3f} "
              f"{r['mask_fill']:>6.2f}")
    if args.json is not None:
        meta = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "vertices": mesh.num_vertices,
            "faces": int(mesh.faces.shape[0]),
            "feature_size": FEATURE_SIZE,
            "dim": args.dim,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "feature_grad": args.feature_grad,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
