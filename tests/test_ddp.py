"""Distributed (DDP) training on CPU: 2 processes, gloo backend, set up by ``init_distributed``
from torchrun-style environment variables.

The workers are spawned with ``torch.multiprocessing`` (start method ``spawn``), get a free
local port, a 60 s collective time-out and an overall deadline after which they are killed, so
a broken collective fails the test instead of hanging it. Each worker writes what it saw to a
file in ``tmp_path``; the assertions run in the parent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from nvsm.cli import app
from nvsm.config import ConfigError, RunConfig, load_config
from nvsm.data.datasets import load_dataset
from nvsm.mesh import Mesh
from nvsm.pipeline import category_meshes, resolve_device
from nvsm.train.cropset import CropSet, build_cropset
from nvsm.train.distributed import (
    TORCHRUN_ENV,
    DistInfo,
    _pick_device,
    cleanup,
    get_rank,
    init_distributed,
    is_main_process,
    launched_by_torchrun,
    main_first,
    on_main,
)
from nvsm.train.model import NeMoModel, build_model
from nvsm.train.trainer import NeMoTrainer, all_gather_rows, rank_seed

WORLD = 2
SIZE = (64, 120)
DEADLINE_S = 240.0  # whole spawn (two interpreters importing torch on a busy 2-core machine)
COLLECTIVE_TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


def _cfg(*extra: str) -> RunConfig:
    sets = [
        "device=cpu",
        "data.crop_scale=0.2",
        f"data.crop_size={list(SIZE)}",
        "train.batch_size=3",
        "model.feature_dim=16",
        "model.n_vertices=200",
        "train.clutter_size=64",
        "train.clutter_per_image=8",
        "train.amp=false",
    ]
    return load_config(None, [*sets, *extra])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., None], port: int, args: tuple[Any, ...]) -> None:
    """Worker main: torchrun's environment, ``init_distributed``, ``fn(rank, *args)``."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = init_distributed("cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    assert (info.rank, info.world_size, info.local_rank) == (rank, WORLD, rank)
    assert info.device == torch.device("cpu") and info.distributed
    assert torch.distributed.get_backend() == "gloo"
    assert is_main_process() == (rank == 0)
    try:
        fn(rank, *args)
    finally:
        cleanup()


def _spawn(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(rank, *args)`` on ``WORLD`` gloo ranks; fail (never hang) past the deadline."""
    ctx = mp.start_processes(
        _entry, args=(fn, _free_port(), args), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {DEADLINE_S:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None  # a trainable parameter after a step
    return p.grad


def _bank_state(model: NeMoModel) -> dict[str, torch.Tensor]:
    return {
        f"{cat}.{k}": v.detach().clone()
        for cat, bank in model.banks.items()
        for k, v in bank.state_dict().items()
    }


def test_init_distributed_without_torchrun_is_a_no_op(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun()
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"))
    assert not info.distributed and info.is_main and is_main_process()
    assert not torch.distributed.is_initialized()
    assert init_distributed("auto").device == resolve_device("auto")
    cleanup()  # nothing to clean up: no error


def test_more_processes_than_gpus_are_refused_by_name(monkeypatch):
    # Local ranks past the GPU count were wrapped onto a GPU another rank held: NCCL refuses
    # two ranks on one GPU deep inside its first collective.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _pick_device("auto", 1) == torch.device("cuda", 1)
    assert _pick_device("cpu", 5) == torch.device("cpu")
    for name, value in {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"local rank 2 .* 2 CUDA device.* -s device=cpu"):
        init_distributed("cuda")  # refused before it joins a process group
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"local rank 0 .* 0 CUDA device"):
        _pick_device("cuda", 0)


def _once_worker(rank: int, out: Path) -> None:
    ran: list[int] = []

    def work() -> dict[str, int]:
        ran.append(rank)
        return {"from": rank}

    assert on_main(work) == {"from": 0}
    assert main_first(work) == {"from": rank}  # rank 0's run first, then each its own
    assert ran == ([0, 0] if rank == 0 else [1])
    caught = []
    for error in (ValueError("bad value in f.json"), FileNotFoundError("no f.json"),
                  ConfigError("train.steps: bad"), KeyError("deep inside")):

        def failing(error: Exception = error) -> None:
            if get_rank() == 0:
                raise error
            ran.append(-1)  # the others must not run it

        try:
            on_main(failing)
        except Exception as exc:
            caught.append(f"{type(exc).__name__}: {exc}")
    assert -1 not in ran
    (out / f"rank{rank}.json").write_text(json.dumps(caught))


def test_work_done_once_on_rank_0_reaches_every_rank_and_so_do_its_errors(tmp_path):
    # What rank 0 alone does (an E-step, an evaluation, a write) reaches the others, and so
    # does its failure: the others would wait in a collective until the time-out.
    _spawn(_once_worker, tmp_path)
    caught = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert caught[0] == ["ValueError: bad value in f.json", "FileNotFoundError: no f.json",
                         "ConfigError: train.steps: bad", "KeyError: 'deep inside'"]
    # A subclass of ValueError (ConfigError, DatasetError) arrives as the ValueError the
    # commands turn into their one-line error.
    assert caught[1] == ["ValueError: bad value in f.json", "FileNotFoundError: no f.json",
                         "ValueError: train.steps: bad",
                         "RuntimeError: rank 0 failed: KeyError: 'deep inside'"]


# -- training: identical models, different batches ------------------------------------------


def _train_worker(
    rank: int, data: CropSet, meshes: dict[str, Mesh], cfg: RunConfig, out: Path
) -> None:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, meshes)
    if rank == 1:  # a different start: the trainer must adopt rank 0's backbone and banks
        with torch.no_grad():
            for p in model.backbone.parameters():
                p.add_(0.01)
            for bank in model.banks.values():
                bank.memory.neg_()
    trainer = NeMoTrainer(model, cfg.train, seed=cfg.seed)
    start_backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    start_banks = _bank_state(model)
    seen: list[list[int]] = []
    sample = trainer.sample_batch

    def recording_sample(n: int) -> torch.Tensor:
        index = sample(n)
        seen.append(index.tolist())
        return index

    trainer.sample_batch = recording_sample  # type: ignore[method-assign]
    summary = trainer.fit(
        data, steps=3, checkpoint_path=out / f"model{rank}.pt", show_progress=False
    )
    banks = _bank_state(model)
    # Ranks holding different numbers of rows (none at all on rank 1) gather in rank order.
    rows = torch.arange(2 * rank, dtype=torch.float32)[:, None].repeat(1, 3)  # 0 rows, 2 rows
    assert torch.equal(all_gather_rows(rows), torch.arange(2.0)[:, None].repeat(1, 3))
    flags = torch.ones(1 - rank, 4, dtype=torch.bool)  # 1 row, 0 rows
    gathered = all_gather_rows(flags)
    assert gathered.dtype == torch.bool and gathered.shape == (1, 4) and bool(gathered.all())
    # A category missing from one rank's batch (as in multi-category training): that rank
    # contributes no rows and both still update the bank identically (and do not hang).
    with torch.no_grad():
        _, updates = trainer.batch_loss(data, torch.tensor([rank]))
    trainer.update_banks(updates if rank == 0 else {})
    torch.save(
        {
            "start_backbone": start_backbone,
            "start_banks": start_banks,
            "backbone": model.backbone.state_dict(),
            "banks": banks,
            "banks_partial": _bank_state(model),
            "seen": seen,
            "summary": summary,
        },
        out / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_ddp_training_keeps_ranks_identical_on_different_batches(tiny_synthetic, tmp_path):
    cfg = _cfg()
    recs = load_dataset("synthetic", tiny_synthetic, split="train").records
    data = build_cropset(recs, crop_scale=0.2, crop_size=SIZE, show_progress=False)
    assert len(data) >= WORLD * cfg.train.batch_size  # so the ranks' batches are disjoint
    meshes = category_meshes(tiny_synthetic, ["car"], cfg.model.n_vertices)
    _spawn(_train_worker, data, meshes, cfg, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))

    # Rank 1 started from a perturbed model: DDP broadcast rank 0's backbone, the trainer its banks.
    for key in ("start_backbone", "start_banks", "backbone", "banks", "banks_partial"):
        assert r0[key].keys() == r1[key].keys()
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"{key}.{name} differs across ranks"
    # ... and the three steps changed both (identically, checked above).
    moved = [n for n, v in r0["backbone"].items() if not torch.equal(v, r0["start_backbone"][n])]
    assert moved
    assert not torch.equal(r0["banks"]["car.memory"], r0["start_banks"]["car.memory"])
    assert not torch.equal(r0["banks_partial"]["car.memory"], r0["banks"]["car.memory"])
    # The ranks drew different (here disjoint: 6 crops ≥ 2 × 3) batches at every step.
    assert len(r0["seen"]) == len(r1["seen"]) == 3
    for a, b in zip(r0["seen"], r1["seen"], strict=True):
        assert len(a) == len(b) == cfg.train.batch_size
        assert not set(a) & set(b), (a, b)
    # The reported loss is the mean over the ranks, hence the same on both.
    assert r0["summary"]["final_loss"] == r1["summary"]["final_loss"]
    # Only rank 0 writes checkpoints.
    assert (tmp_path / "model0.pt").is_file() and not (tmp_path / "model1.pt").exists()


# -- one step: gradient averaging ----------------------------------------------------------

INDEX = ([0, 1, 2], [3, 4, 5])  # batch A on rank 0, batch B on rank 1


def _step_worker(
    rank: int, data: CropSet, meshes: dict[str, Mesh], cfg: RunConfig, out: Path
) -> None:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, meshes)
    trainer = NeMoTrainer(model, cfg.train, seed=cfg.seed)
    result = trainer.train_step(data, torch.tensor(INDEX[rank]))
    torch.save(
        {
            "grads": {n: _grad(p).clone() for n, p in _trainable(model).items()},
            "params": {n: p.detach().clone() for n, p in _trainable(model).items()},
            "banks": _bank_state(model),
            "loss": result.loss,
        },
        out / f"step{rank}.pt",
    )


@pytest.mark.slow
def test_ddp_step_averages_the_per_rank_gradients(tiny_synthetic, tmp_path):
    """One DDP step with batch A on rank 0 and B on rank 1 equals one single-process step on
    the loss (L(A) + L(B)) / 2, bank update on A ∪ B.

    This, and not L(A ∪ B), is DDP's semantics: each rank's contrastive loss is a mean over ITS
    visible vertices, so L(A ∪ B) = (N_A L(A) + N_B L(B)) / (N_A + N_B) weights the two halves
    by their visible-vertex counts and matches only when N_A = N_B. The reference below runs
    the trainer's own ``batch_loss`` on A and on B in one process, with B's clutter drawn from
    rank 1's seed (the ranks' clutter streams are seeded per rank by design); augmentation is
    off. Only the float32 summation order then differs (gloo's all-reduce of the two gradients
    then ÷2, against autograd's accumulation of ½ ∇L(A) + ½ ∇L(B)), so gradients must agree
    to a few ulps: rtol 1e-5 and atol 1e-6 × the largest gradient entry.

    Gradients are compared directly because AdamW is almost invariant to the gradient scale (a
    sum instead of a mean over ranks would change the first update by ε-terms only). The first
    AdamW step is Δp = −lr · g / (|g| + ε) (after the decoupled decay), so by the mean-value
    theorem a gradient change δg moves p by at most lr · ε · |δg| / (min |g| + ε)² (min over
    the two gradients; 0 when their signs differ): with ε = 1e-8 a rounding-level δg on a
    near-zero gradient entry can move p by ~1e-6, which is why the parameters are checked
    against this per-element bound (plus float32 rounding) rather than a fixed tolerance.
    """
    cfg = _cfg(
        "train.augment.flip=false",
        "train.augment.color_jitter=0",
        "train.augment.scale_jitter=0",
        "train.augment.translate_jitter=0",
        "train.augment.occluders=0",
    )
    recs = load_dataset("synthetic", tiny_synthetic, split="train").records
    data = build_cropset(recs, crop_scale=0.2, crop_size=SIZE, show_progress=False)
    meshes = category_meshes(tiny_synthetic, ["car"], cfg.model.n_vertices)
    _spawn(_step_worker, data, meshes, cfg, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"step{r}.pt", weights_only=False) for r in range(WORLD))

    # Single-process reference (no process group in this pytest process).
    assert not torch.distributed.is_initialized()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, meshes)
    ref = NeMoTrainer(model, cfg.train, seed=cfg.seed)
    model.train()
    ref._set_lr()
    loss_a, upd_a = ref.batch_loss(data, torch.tensor(INDEX[0]))
    ref.generator = torch.Generator().manual_seed(rank_seed(cfg.seed, 1))  # rank 1's clutter
    loss_b, upd_b = ref.batch_loss(data, torch.tensor(INDEX[1]))
    ref.optimizer.zero_grad(set_to_none=True)
    ((loss_a + loss_b) / 2).backward()
    ref.optimizer.step()
    ref.update_banks(
        {cat: {k: torch.cat([upd_a[cat][k], upd_b[cat][k]]) for k in upd_a[cat]} for cat in upd_a}
    )

    grads = {n: p.grad for n, p in _trainable(model).items()}
    assert grads.keys() == r0["grads"].keys()
    scale = max(float(g.abs().max()) for g in grads.values())
    assert scale > 0
    for name, g in grads.items():
        for r in (r0, r1):
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-6 * scale)
    # Parameters: bound the effect of the gradient's rounding differences through the first
    # AdamW step (see the docstring), element by element, plus float32 rounding of the update.
    lr_eps = {
        id(q): (group["lr"], group["eps"])
        for group in ref.optimizer.param_groups
        for q in group["params"]
    }
    for name, p in _trainable(model).items():
        lr, eps = lr_eps[id(p)]
        g, g_ddp = grads[name], r0["grads"][name]
        same_sign = torch.sign(g) == torch.sign(g_ddp)
        g_min = torch.where(same_sign, torch.minimum(g.abs(), g_ddp.abs()), torch.zeros_like(g))
        bound = lr * eps * (g - g_ddp).abs() / (g_min + eps) ** 2
        rounding = 4 * torch.finfo(p.dtype).eps * (p.detach().abs() + lr)
        diff = (r0["params"][name] - p.detach()).abs()
        assert bool((diff <= bound + rounding).all()), name
        assert torch.equal(r0["params"][name], r1["params"][name])
    for name, b in _bank_state(model).items():
        torch.testing.assert_close(r0["banks"][name], b, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["banks"][name], r1["banks"][name])
    la, lb = float(loss_a.detach()), float(loss_b.detach())
    assert r0["loss"] == r1["loss"] == pytest.approx((la + lb) / 2, rel=1e-5)
    # Sanity: the two halves really differ, so the averaging is actually exercised.
    assert abs(la - lb) > 1e-4


# -- the command line under torchrun --------------------------------------------------------


@pytest.mark.slow
def test_torchrun_train_command(tiny_synthetic, tmp_path):
    """``torchrun --standalone --nproc_per_node 2 -m nvsm.cli train ...`` (as documented in
    ``nvsm.train.distributed``) trains, and only rank 0 writes files and evaluates."""
    run = tmp_path / "run"
    sets = [
        f"data.root={tiny_synthetic}",
        "data.crop_scale=0.2",
        f"data.crop_size={list(SIZE)}",
        "train.steps=3",
        "train.batch_size=2",
        "labels.annotations=3",
        "model.feature_dim=16",
        "model.n_vertices=200",
        "device=cpu",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # = torchrun
        "--standalone",
        f"--nproc_per_node={WORLD}",
        "-m",
        "nvsm.cli",
        "train",
        "-r",
        "synthetic-car-7labels",
        "--out",
        str(run),
        *(arg for s in sets for arg in ("-s", s)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVSM_DIST_TIMEOUT": str(COLLECTIVE_TIMEOUT_S)}
    for name in TORCHRUN_ENV:  # a clean launch, whatever the calling environment
        env.pop(name, None)
    res = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["steps"] == 3
    assert (run / "model.pt").is_file() and (run / "run_info.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["pooled"]["L0"]["n"] == 4
    assert res.stdout.count("synthetic-car-7labels: test") == 1  # rank 0 alone evaluates
    # Each rank keeps its own training state; a resume restores them on both or on neither.
    assert sorted(p.name for p in run.glob("model.train_state.*")) == [
        "model.train_state.rank0.pt", "model.train_state.rank1.pt"]
    more = [*cmd, "--no-evaluate", "--resume", "-s", "train.steps=4"]
    res = subprocess.run(
        more, env=env, capture_output=True, text=True, timeout=DEADLINE_S, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "note:" not in res.stderr
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_at_step"] == 3 and summary["steps"] == 1
    assert summary["resumed_exactly"] is True
    # One process cannot take over two processes' random streams: it says so and goes on.
    alone = more[more.index("nvsm.cli") + 1 :]
    alone[alone.index("train.steps=4")] = "train.steps=5"
    res = CliRunner().invoke(app, alone)
    assert res.exit_code == 0, res.output
    assert (f"{run / 'model.train_state.rank0.pt'} was saved by 2 process(es), this run has 1"
            in " ".join(res.output.split())), res.output
    assert json.loads((run / "train_summary.json").read_text())["resumed_exactly"] is False
    # A dataset error (rank 0 reads first): every rank stops with the same one-line error; rank
    # 1, waiting in a barrier, died with gloo's connection traceback. (torchrun's launcher then
    # reports the failed children with a traceback of its own.)
    missing = tmp_path / "nowhere"
    bad = [arg.replace(str(tiny_synthetic), str(missing)) for arg in cmd]
    bad[bad.index(str(run))] = str(tmp_path / "run2")
    res = subprocess.run(
        bad, env=env, capture_output=True, text=True, timeout=DEADLINE_S, check=False
    )
    output = res.stdout + res.stderr
    assert res.returncode != 0 and "[rank1]: Traceback" not in output, output[-3000:]
    assert output.count(f"error: {missing}/Image_sets/car_imagenet_train.txt") == WORLD
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_a_process_that_fails_mid_training_stops_the_other_with_one_line(tiny_synthetic,
                                                                          tmp_path):
    # Rank 1 fails at its third step; rank 0 then failed in its next collective with a
    # 180-line gloo traceback ("Connection closed by peer") that hid rank 1's error line.
    script = tmp_path / "rank1_fails.py"
    script.write_text(
        "import sys\n"
        "from nvsm.train.trainer import NeMoTrainer\n"
        "real = NeMoTrainer.train_step\n"
        "def step(self, data, index):\n"
        "    if self.rank == 1 and self.step == 2:\n"
        "        raise ValueError('bad crop on rank 1')\n"
        "    return real(self, data, index)\n"
        "NeMoTrainer.train_step = step\n"
        "from nvsm.cli import app\n"
        "app(sys.argv[1:])\n"
    )
    sets = [f"data.root={tiny_synthetic}", "data.crop_scale=0.2", f"data.crop_size={list(SIZE)}",
            "train.steps=50", "train.batch_size=2", "labels.annotations=3",
            "model.feature_dim=16", "model.n_vertices=200", "device=cpu"]
    # torchrun looks at its children every 5 s here, so that rank 0 meets the lost peer in
    # its own next collective before torchrun's SIGTERM reaches it ("error: terminated").
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=5",
           f"--nproc_per_node={WORLD}", str(script), "train", "-r", "synthetic-car-7labels",
           "--no-evaluate", "--out", str(tmp_path / "run"),
           *(arg for s in sets for arg in ("-s", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVSM_DIST_TIMEOUT": str(COLLECTIVE_TIMEOUT_S)}
    for name in TORCHRUN_ENV:
        env.pop(name, None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S,
                         check=False)
    output = res.stdout + res.stderr
    assert res.returncode != 0 and "error: bad crop on rank 1" in output, output[-3000:]
    # rank 0 says in one line that another process stopped; torchrun's own launcher still
    # reports its failed children with a traceback of its own, after that.
    said = [line for line in output.splitlines() if line.startswith("error: rank 0:")]
    assert said and "another process of this run stopped" in said[0], output[-3000:]
    assert "[rank0]: Traceback" not in output and "pair.cc" not in output.split(said[0])[0]


@pytest.mark.slow
def test_torchrun_fewshot_command(tiny_synthetic, tmp_path):
    """``torchrun ... -m nvsm.cli fewshot``: every training stage is one DDP training, rank 0
    alone runs the E-steps, evaluates, writes and reports, and the run resumes."""
    run = tmp_path / "run"
    sets = [
        f"data.root={tiny_synthetic}", "data.crop_scale=0.2", f"data.crop_size={list(SIZE)}",
        "train.steps=4", "train.batch_size=2", "labels.annotations=3", "model.feature_dim=16",
        "model.n_vertices=200", "device=cpu", "fewshot.rounds=1", "fewshot.mstep_steps=2",
        "fewshot.refine_steps=2", "fewshot.hubness_k=2",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "-m", "nvsm.cli", "fewshot", "--out", str(run),
           *(arg for s in sets for arg in ("-s", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVSM_DIST_TIMEOUT": str(COLLECTIVE_TIMEOUT_S)}
    for name in TORCHRUN_ENV:
        env.pop(name, None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == WORLD
    assert {"nemo", "nemo_same_steps", "self_training", "nvsm"} <= set(metrics)
    for stage in ("round_0", "round_1", "nemo_same_steps", "self_training/round_1"):
        assert json.loads((run / stage / "metrics.json").read_text())["train"]["world_size"] == 2
    labels = (run / "round_1" / "pseudo_labels.jsonl").read_text().splitlines()
    assert len(labels) == metrics["rounds"][1]["pseudo_labels"]["pool"] > 0
    assert res.stdout.count("nvsm round 1: accepted") == 1  # rank 0 alone reports
    assert res.stdout.count("synthetic-car-7shot: 3 labels") == 1  # the table
    again = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True,
                           timeout=DEADLINE_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("complete, loaded") == 4
    assert json.loads((run / "metrics.json").read_text()) == metrics
