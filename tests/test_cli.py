import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nvsm.cli import app
from nvsm.config import RunConfig

runner = CliRunner()


def _record_configs(monkeypatch: pytest.MonkeyPatch, target: str) -> list[RunConfig]:
    """Replace the library entry point ``target`` (``run_fewshot``, ``train_and_evaluate``)
    with a stand-in that records the config the command passes and stops there (a
    ``ValueError`` "stop here", which the command reports); returns the recorded configs."""
    seen: list[RunConfig] = []

    def record(config: RunConfig, folder: Path, **kwargs: object) -> None:
        seen.append(config)
        raise ValueError("stop here")

    monkeypatch.setattr(target, record)
    return seen


def test_recipes_list_and_show():
    res = runner.invoke(app, ["recipes", "list"])
    assert res.exit_code == 0 and "synthetic-car-7labels" in res.output
    res = runner.invoke(app, ["recipes", "show", "synthetic-car-7labels", "-s", "train.steps=5"])
    assert res.exit_code == 0 and "steps: 5" in res.output and "annotations: 7" in res.output
    res = runner.invoke(app, ["recipes", "show", "synthetic-car-7labels", "-s", "train.stepz=5"])
    assert res.exit_code == 2 and "unknown key" in res.output


def test_errors_print_the_user_input_whole(tmp_path):
    # Neither folded at the terminal width nor read as rich markup: a path can be copied.
    root = tmp_path / ("x" * 90) / "[bold]data"
    res = runner.invoke(app, ["fewshot", "--dataset", "pascal3d", "--root", str(root), "--out",
                              str(tmp_path / "run")])
    assert res.exit_code == 2 and str(root / "Image_sets" / "car_imagenet_train.txt") in res.output
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start
    res = runner.invoke(app, ["train", "-r", "synthetic-car-supervised", "-s", f"data.root={root}",
                              "--out", str(tmp_path / "train")])
    assert res.exit_code == 2 and str(root / "Image_sets" / "car_imagenet_train.txt") in res.output
    assert not (tmp_path / "train").exists()
    res = runner.invoke(app, ["fewshot", "--anchors", f"[bold]{'y' * 90}"])
    assert res.exit_code == 2 and f"got '[bold]{'y' * 90}'" in res.output
    res = runner.invoke(app, ["fewshot", "--dataset", "coco"])
    message = "--dataset: expected one of synthetic | pascal3d | kitti, got 'coco'"
    assert res.exit_code == 2 and message in res.output, res.output
    recipe = root / "my.yaml"  # a config error names the recipe file
    recipe.parent.mkdir(parents=True)
    recipe.write_text("trian: {steps: 5}\n")
    res = runner.invoke(app, ["recipes", "show", str(recipe)])
    assert res.exit_code == 2 and f"{recipe}: unknown key(s) ['trian']" in res.output


def test_out_of_range_values_stop_before_the_run_folder(tmp_path):
    # train.steps=0 used to reach the trainer and die there (ZeroDivisionError), leaving a folder.
    for cmd in (["train", "-s", "train.steps=0"], ["fewshot", "--tiny", "--rounds", "0"]):
        res = runner.invoke(app, [*cmd, "--out", str(tmp_path / "run")])
        assert res.exit_code == 2 and "expected a value >= 1, got 0" in res.output, res.output
        assert not (tmp_path / "run").exists()
    # A setting out of its choices, or one this machine cannot honour, used to fail after the
    # cropping (or the training, or torch's own traceback), with a run folder already written.
    for setting, message in (
        ("model.backbone=vgg", "model.backbone: expected one of efficientnet-lite0"),
        ("infer.schedule=slow", "infer.schedule: expected one of fast | reference, got 'slow'"),
        ("device=gpu", "device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ):
        for cmd in (["train"], ["fewshot", "--tiny"]):
            res = runner.invoke(app, [*cmd, "-s", setting, "--out", str(tmp_path / "run")])
            assert res.exit_code == 2 and message in res.output, res.output
            assert not (tmp_path / "run").exists()


def test_a_run_folder_that_cannot_take_the_run_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cmd in (["train"], ["fewshot", "--tiny"]):
        for target in (blocker, blocker / "run"):
            res = runner.invoke(app, [*cmd, "--out", str(target)])
            assert res.exit_code == 2, res.output
            assert f"cannot write into {target}: {blocker} is a file" in res.output
    # A new run into a folder that holds one would leave the old run's other stages beside its
    # own (a fewshot run of fewer rounds kept the old later rounds, which the exports read).
    old = tmp_path / "old"
    old.mkdir()
    (old / "run_info.json").write_text("{}")
    for cmd in (["train"], ["fewshot", "--tiny"]):
        res = runner.invoke(app, [*cmd, "--out", str(old)])
        assert res.exit_code == 2 and f"{old} holds a run already: resume it" in res.output
    assert sorted(p.name for p in old.iterdir()) == ["run_info.json"]
    assert blocker.read_text() == "x"
    # --resume with a mistyped or empty folder started the whole run anew without a word.
    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd in (["train"], ["fewshot", "--tiny"]):
        for target, state in ((tmp_path / "typo", "does not exist"), (empty, "is empty")):
            res = runner.invoke(app, [*cmd, "--resume", "--out", str(target)])
            assert res.exit_code == 2, res.output
            assert " ".join(res.output.split()) == (
                f"error: nothing to resume in {target}: it {state}; leave out --resume to "
                "start a run there")
    assert not (tmp_path / "typo").exists() and not any(empty.iterdir())


def test_a_run_folder_of_another_command_is_not_resumed(tmp_path):
    # nvsm train --resume into a few-shot run trained from scratch and replaced its
    # run_info.json and metrics.json (and the other way round).
    for made_by, cmd in (("fewshot", ["train"]), ("train", ["fewshot", "--tiny"])):
        folder = tmp_path / made_by
        folder.mkdir()
        (folder / "run_info.json").write_text(json.dumps({"command": made_by, "config": {}}))
        res = runner.invoke(app, [*cmd, "--resume", "--out", str(folder)])
        assert res.exit_code == 2, res.output
        assert " ".join(res.output.split()) == (
            f"error: cannot resume {folder} with nvsm {cmd[0]}: it holds a run of nvsm "
            f"{made_by} ({folder / 'run_info.json'} field 'command')")
        assert [p.name for p in folder.iterdir()] == ["run_info.json"]
    # One that cannot be read says so, with the way out.
    (folder / "run_info.json").write_text("{oops")
    res = runner.invoke(app, ["train", "--resume", "--out", str(folder)])
    assert res.exit_code == 2 and "expected a JSON object" in res.output
    assert f"delete {folder / 'run_info.json'} to resume" in " ".join(res.output.split())


def test_option_values_are_taken_as_typed(tmp_path, monkeypatch):
    # --root and --backbone-weights were read as YAML: "2024" became a number, "#" began a
    # comment (so "data #1" silently read ./data), "null" meant no root. --dataset was lost
    # when a --recipe was given.
    seen = _record_configs(monkeypatch, "nvsm.fewshot.loop.run_fewshot")
    for root in ("2024", "data #1", "null"):
        res = runner.invoke(app, ["fewshot", "--dataset", "pascal3d", "--root", root,
                                  "-r", "synthetic-car-tiny", "--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and "stop here" in res.output, res.output
        assert seen[-1].data.root == str(Path(root).resolve())  # made absolute, not parsed
        assert seen[-1].data.dataset == "pascal3d"
    trained = _record_configs(monkeypatch, "nvsm.pipeline.train_and_evaluate")
    res = runner.invoke(app, ["train", "--backbone-weights", "w #1.pth", "--out",
                              str(tmp_path / "t")])
    assert res.exit_code == 2, res.output
    assert trained[-1].model.backbone_weights == str(Path("w #1.pth").resolve())


def test_a_seed_torch_cannot_take_is_refused_by_name(tmp_path):
    # 2**64 failed deep in the run ("Overflow when unpacking long long"), after run_info.json.
    for cmd in (["fewshot", "--tiny", "--seed", str(2**64)], ["train", "-s", f"seed={2**64}"]):
        res = runner.invoke(app, [*cmd, "--out", str(tmp_path / "run")])
        assert res.exit_code == 2, res.output
        assert f"expected a value >= 0 and <= 4294967295, got {2**64}" in res.output
        assert not (tmp_path / "run").exists()


def test_recipe_keys_must_be_names(tmp_path):
    # A list or number key ended in TypeError tracebacks (unhashable, unorderable).
    for text in ("? [a, b]\n: 1\n", "1: 2\nfoo: 3\n"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        res = runner.invoke(app, ["recipes", "show", str(recipe)])
        assert res.exit_code == 2 and "is not a setting's name (a string)" in res.output
    res = runner.invoke(app, ["recipes", "show", "synthetic-car-tiny", "-s", "train={[a]: 1}"])
    assert res.exit_code == 2 and "key ['a'] is not a setting's name" in res.output


def test_ctrl_c_names_what_is_kept(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nvsm.fewshot.loop.run_fewshot", interrupted)
    res = runner.invoke(app, ["fewshot", "--tiny", "--out", str(tmp_path / "run")])
    assert res.exit_code == 130
    assert res.output == "error: interrupted before the run folder was written\n"

    def train_interrupted(config, folder, **kwargs):
        folder.mkdir()
        (folder / "run_info.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("nvsm.pipeline.train_and_evaluate", train_interrupted)
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "train")])
    assert res.exit_code == 130
    assert " ".join(res.output.split()) == (
        f"error: interrupted: {tmp_path / 'train'} keeps its last checkpoint, model.pt, if one "
        "was saved (every train.checkpoint_every steps); run the same command again with "
        "--resume to go on from there")


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_the_resumed_run_finishes(tiny_synthetic, tmp_path):
    # Ctrl-C exited 130 without a word; it now says what is kept and how to go on.
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nvsm.cli", "fewshot", "--no-baselines", "--out", str(run)]
    for setting in (f"data.root={tiny_synthetic}", "data.crop_scale=0.2",
                    "data.crop_size=[64, 120]", "train.steps=150", "train.batch_size=4",
                    "labels.annotations=3", "model.feature_dim=32", "device=cpu",
                    "fewshot.rounds=1", "fewshot.mstep_steps=2", "fewshot.refine_steps=2"):
        cmd += ["-s", setting]
    proc = subprocess.Popen(  # SIGINT as a terminal's Ctrl-C sends it, even if ours ignores it
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (run / "run_info.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run folder never appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert (f"error: interrupted: {run} keeps every complete stage; run the same command again "
            "with --resume to go on from there") in out
    assert "Traceback" not in out and not (run / "metrics.json").exists()
    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (run / "metrics.json").is_file()


def test_ctrl_c_caught_inside_code_run_from_a_string_still_exits_130(tmp_path):
    # The test above failed now and then with status -2: Ctrl-C landed while a lazily imported
    # module made a dataclass (exec of source), and CPython, having marked that interrupt
    # unhandled, ended `python -m` by SIGINT after the command had exited 130.
    (tmp_path / "stopped_in_exec.py").write_text(
        "import sys\n"
        "from nvsm.runtime import interruption\n"
        "try:\n"
        "    exec('raise KeyboardInterrupt')\n"
        "except KeyboardInterrupt as exc:\n"
        "    sys.exit(interruption(exc)[1])\n"
    )
    res = subprocess.run([sys.executable, "-m", "stopped_in_exec"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 130, res.stderr


def test_a_bad_option_value_is_named_as_the_option(tmp_path):
    # --rounds 0 said "overrides.fewshot.rounds: ...", a name the user never typed.
    for args, message in (
        (["--rounds", "0"], "error: --rounds (fewshot.rounds): expected a value >= 1, got 0"),
        (["--annotations", "0"],
         "error: --annotations (labels.annotations): expected a value >= 1, got 0"),
        (["--seed", "-1"], "error: --seed: expected a value >= 0 and <= 4294967295, got -1"),
    ):
        res = runner.invoke(app, ["fewshot", "--tiny", *args, "--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and res.output == message + "\n", res.output
    # The same value given with -s is named as the setting it is.
    res = runner.invoke(app, ["fewshot", "--tiny", "-s", "fewshot.rounds=0"])
    assert res.output == "error: overrides.fewshot.rounds: expected a value >= 1, got 0\n"
    assert not (tmp_path / "r").exists()


def test_only_train_and_fewshot_run_under_torchrun(tmp_path):
    # Every other command would run once per process, racing on the same output folder.
    res = runner.invoke(app, ["data", "synth", "--tiny", "--out", str(tmp_path / "syn")],
                        env={"WORLD_SIZE": "2"})
    assert res.exit_code == 2 and " ".join(res.output.split()) == (
        "error: nvsm data runs in one process, but torchrun started 2 (WORLD_SIZE=2): launch it "
        "without torchrun (only nvsm train and nvsm fewshot run on several processes)")
    assert not (tmp_path / "syn").exists()
    res = runner.invoke(app, ["recipes", "list"], env={"WORLD_SIZE": "1"})
    assert res.exit_code == 0


def test_every_command_has_help_with_an_example():
    for cmd in (
        [],
        ["fewshot"],
        ["train"],
        ["evaluate"],
        ["infer"],
        ["info"],
        ["recipes"],
        ["recipes", "list"],
        ["recipes", "show"],
        ["data"],
        ["data", "verify"],
        ["data", "split"],
        ["data", "synth"],
        ["pseudo-labels"],
        ["pseudo-labels", "export"],
        ["pseudo-labels", "inspect"],
    ):
        res = runner.invoke(app, [*cmd, "--help"], terminal_width=200)
        assert res.exit_code == 0, cmd
        # The usage line names the command too: look for an invocation after "Example".
        _, sep, examples = res.output.partition("Example")
        assert sep and f"nvsm {' '.join(cmd)}".strip() in examples, f"{cmd} --help has no example"


def test_help_prose_flows_and_examples_keep_their_lines():
    # Typer's rich help keeps a paragraph's line breaks: prose wrapped in the source printed as
    # ragged lines in a terminal narrower than the source (the command list shows each
    # summary so too).
    import inspect

    import typer

    def helps(command, name):
        yield name, inspect.cleandoc(command.help or "")
        for sub_name, sub in getattr(command, "commands", {}).items():
            yield from helps(sub, f"{name} {sub_name}")

    found = dict(helps(typer.main.get_command(app), "nvsm"))
    assert len(found) == 16 and all(found.values())
    ragged = [
        (name, paragraph)
        for name, text in found.items()
        for paragraph in text.split("\n\n")
        if not paragraph.startswith("Example")
        and any(not line[:1].isspace() for line in paragraph.split("\n")[1:])
    ]
    assert ragged == []
    res = runner.invoke(app, ["fewshot", "--help"], env={"COLUMNS": "80"})
    lines = [line.strip() for line in res.output.splitlines()]
    assert "nvsm fewshot --annotations 20 --with-oracle" in lines  # an example keeps its line
    # A wrapped paragraph fills its lines: none ends far short of the 80 columns (the ragged
    # breaks did: "... matches" / "them to the" / "unlabelled images, ...").
    start = next(i for i, line in enumerate(lines) if line.startswith("Round 0 trains NeMo"))
    assert all(len(line) > 60 for line in lines[start : start + 3]), lines[start : start + 4]


@pytest.mark.slow
def test_train_evaluate_end_to_end(tiny_synthetic, tmp_path):
    run = tmp_path / "run"
    sets = [
        "-s",
        f"data.root={tiny_synthetic}",
        "-s",
        "data.crop_scale=0.2",
        "-s",
        "data.crop_size=[64, 120]",
        "-s",
        "train.steps=4",
        "-s",
        "train.batch_size=4",
        "-s",
        "labels.annotations=3",
    ]
    res = runner.invoke(app, ["train", "-r", "synthetic-car-7labels", "--out", str(run), *sets])
    assert res.exit_code == 0, res.output
    assert (run / "model.pt").is_file() and (run / "run_info.json").is_file()
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 0 and info["config"]["train"]["steps"] == 4
    assert info["versions"]["torch"] and "git_commit" in info
    metrics = json.loads((run / "metrics.json").read_text())
    l0 = metrics["pooled"]["L0"]
    assert l0["n"] == 4 and 0.0 <= l0["acc_pi_6"] <= 1.0 and metrics["protocol"] == "gt-normalized"
    assert json.loads((run / "train_summary.json").read_text())["labelled_images"] == 3
    res = runner.invoke(
        app,
        [
            "evaluate",
            "-m",
            str(run / "model.pt"),
            "-l",
            "0",
            "-l",
            "2",
            "--out",
            str(tmp_path / "ev"),
        ],
    )
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(ev["pooled"]) == {"L0", "L2"} and ev["pooled"]["L2"]["n"] == 4
    # The footer printed raw JSON: 'protocol: gt-normalized  ·  {"seconds_per_image": ...}'.
    footer = res.output.strip().splitlines()[-1]
    assert footer == f"protocol: gt-normalized  ·  {ev['seconds_per_image']:.4f} s per image"
    res = runner.invoke(app, ["evaluate", "-m", str(run / "model.pt"), "-l", "7"])
    assert res.exit_code == 2 and "0..3" in res.output


@pytest.mark.slow
def test_a_stopped_and_resumed_training_ends_as_an_uninterrupted_one(
    tiny_synthetic, tmp_path, monkeypatch
):
    # --resume restored model and banks but restarted AdamW's moments and every random stream
    # (batches, augmentation, clutter, dropout), so a stopped run ended elsewhere than a run
    # that was not stopped.
    from nvsm.train.model import NeMoModel
    from nvsm.train.trainer import NeMoTrainer

    def command(run):
        return ["train", "-r", "synthetic-car-7labels", "--out", str(run), "--no-evaluate",
                "-s", f"data.root={tiny_synthetic}", "-s", "data.crop_scale=0.2",
                "-s", "data.crop_size=[64, 120]", "-s", "train.batch_size=2",
                "-s", "labels.annotations=3", "-s", "model.feature_dim=16",
                "-s", "train.steps=5", "-s", "train.checkpoint_every=2"]

    def tensors(run):
        model, meta = NeMoModel.load(run / "model.pt")
        assert meta["step"] == 5
        return {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
                **{f"bank.{k}": v for k, v in model.banks["car"].state_dict().items()}}

    def stopped_after_step_3(run):
        real_step = NeMoTrainer.train_step

        def train_step(self, data, index):
            if self.step == 3:
                raise KeyboardInterrupt
            return real_step(self, data, index)

        with monkeypatch.context() as patch:
            patch.setattr(NeMoTrainer, "train_step", train_step)
            assert runner.invoke(app, command(run)).exit_code == 130

    straight = tmp_path / "straight"
    assert runner.invoke(app, command(straight)).exit_code == 0
    expected = tensors(straight)
    resumed = tmp_path / "resumed"
    stopped_after_step_3(resumed)  # the checkpoint of step 2 stays
    assert sorted(p.name for p in resumed.glob("model*")) == ["model.pt",
                                                               "model.train_state.rank0.pt"]
    res = runner.invoke(app, [*command(resumed), "--resume"])
    assert res.exit_code == 0, res.output
    assert "note:" not in res.output
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert (summary["resumed_at_step"], summary["resumed_exactly"]) == (2, True)
    got = tensors(resumed)
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    # Without the training state (a checkpoint of an older nvsm) it still resumes, says that
    # the result will differ, and it does.
    fresh = tmp_path / "fresh"
    stopped_after_step_3(fresh)
    (fresh / "model.train_state.rank0.pt").unlink()
    res = runner.invoke(app, [*command(fresh), "--resume"])
    assert res.exit_code == 0, res.output
    assert (
        "\nnote: resuming at step 2 with a fresh optimiser and fresh random streams, so the "
        "result will differ from an uninterrupted run's: "
        f"{fresh / 'model.train_state.rank0.pt'} is missing (checkpoints of nvsm before "
        "2026-12-07 have none)\n") in res.output, res.output
    assert json.loads((fresh / "train_summary.json").read_text())["resumed_exactly"] is False
    got = tensors(fresh)
    assert [k for k in got if not torch.equal(got[k], expected[k])] != []


@pytest.mark.slow
def test_train_resume_continues_step_count(tiny_synthetic, tmp_path):
    from nvsm.train.model import NeMoModel

    run = tmp_path / "run"
    base = ["train", "-r", "synthetic-car-7labels", "--out", str(run), "--no-evaluate",
            "-s", f"data.root={tiny_synthetic}", "-s", "data.crop_scale=0.2",
            "-s", "data.crop_size=[64, 120]", "-s", "train.batch_size=2",
            "-s", "labels.annotations=2", "-s", "model.feature_dim=16"]
    assert runner.invoke(app, [*base, "-s", "train.steps=2"]).exit_code == 0
    first, meta = NeMoModel.load(run / "model.pt")
    assert meta["step"] == 2
    res = runner.invoke(app, [*base, "-s", "train.steps=4", "--resume"])
    assert res.exit_code == 0, res.output
    second, meta = NeMoModel.load(run / "model.pt")
    assert meta["step"] == 4
    summary = json.loads((run / "train_summary.json").read_text())  # "steps" alone read as 2
    assert (summary["steps"], summary["resumed_at_step"], summary["total_steps"]) == (2, 2, 4)
    assert not torch.equal(first.banks["car"].memory, second.banks["car"].memory)
    # The checkpoint records the config it was trained on to the end (it kept train.steps=2).
    assert second.config.train.steps == 4
    # Resumed once more with nothing left to do (as after Ctrl-C during the evaluation that
    # follows training): a ZeroDivisionError traceback from the trainer's empty loss list.
    res = runner.invoke(app, [*base, "-s", "train.steps=4", "--resume"])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "train_summary.json").read_text())
    assert (summary["steps"], summary["total_steps"], summary["final_loss"]) == (0, 4, None)
    # Resuming under another config went on with the checkpoint's model (feature_dim 16),
    # exit 0, while run_info.json recorded the new config.
    info = (run / "run_info.json").read_bytes()
    other = [*base, "-s", "train.steps=6", "-s", "model.feature_dim=32", "-s", "seed=9",
             "--resume"]
    res = runner.invoke(app, other)
    assert res.exit_code == 2, res.output
    assert "its run_info.json records another config, which differs from this run's in" in " ".join(
        res.output.split())
    assert "['model.feature_dim', 'seed']" in res.output
    assert (run / "run_info.json").read_bytes() == info
    assert NeMoModel.load(run / "model.pt")[1]["step"] == 4
    # So is a run stopped before its first checkpoint: with no model.pt to compare with, it
    # trained afresh under the other config and replaced run_info.json.
    (run / "model.pt").rename(tmp_path / "model.pt")
    res = runner.invoke(app, other)
    assert res.exit_code == 2 and "its run_info.json records another config" in " ".join(
        res.output.split())
    assert (run / "run_info.json").read_bytes() == info and not (run / "model.pt").exists()
    (tmp_path / "model.pt").rename(run / "model.pt")
    # Without run_info.json, the checkpoint's own config refuses it.
    (run / "run_info.json").rename(tmp_path / "run_info.json")
    res = runner.invoke(app, other)
    assert res.exit_code == 2, res.output
    assert "was trained with another config, which differs from this run's in" in " ".join(
        res.output.split())
    assert not (run / "run_info.json").exists()
    (tmp_path / "run_info.json").rename(run / "run_info.json")
    # Fewer steps than the checkpoint holds went on with none and recorded the fewer.
    res = runner.invoke(app, [*base, "-s", "train.steps=3", "--resume"])
    assert res.exit_code == 2, res.output
    assert (f"{run / 'model.pt'} holds step 4, beyond train.steps = 3; ask for at least 4"
            in " ".join(res.output.split()))
    assert (run / "run_info.json").read_bytes() == info


def test_an_unreadable_training_image_stops_train_before_the_run_folder(tiny_synthetic, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_synthetic, root)
    first = (root / "Image_sets" / "car_imagenet_train.txt").read_text().split()[0]
    image = root / "Images" / "car_imagenet" / f"{first}.JPEG"
    image.write_bytes(b"not a JPEG")
    res = runner.invoke(app, ["train", "-r", "synthetic-car-supervised", "-s", f"data.root={root}",
                              "-s", "data.crop_scale=0.2", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and f"{image}: field 'image'" in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()  # it held run_info.json


def _checkpoint(path: Path) -> Path:
    """A small untrained model of the built-in synthetic car set (no data.root) at ``path``."""
    import numpy as np

    from nvsm.config import load_config
    from nvsm.mesh import single_cuboid
    from nvsm.train.model import NeMoModel, configured_backbone

    cfg = load_config(None, ["device=cpu", "model.feature_dim=8", "model.n_vertices=8"])
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    mesh = single_cuboid([corners], 1.0, 8)
    NeMoModel(configured_backbone(cfg, pretrained=False), {"car": mesh}, cfg).save(path)
    return path


def test_an_incomplete_built_in_dataset_folder_is_one_line_in_every_command(tmp_path,
                                                                             monkeypatch):
    # ensure_synthetic's FileExistsError went uncaught: a boxed traceback in each command.
    from nvsm.data.synth import SIZE_PRESETS

    home = tmp_path / "home"
    for size in SIZE_PRESETS:
        (home / f"synthetic-{size}-seed0").mkdir(parents=True)
    monkeypatch.setenv("NVSM_DATA", str(home))
    model = _checkpoint(tmp_path / "model.pt")
    for cmd, size in (
        (["fewshot", "--tiny", "--out", str(tmp_path / "f")], "tiny"),
        (["train", "-s", "device=cpu", "--out", str(tmp_path / "t")], "default"),
        (["evaluate", "-m", str(model)], "default"),
        (["infer", "-m", str(model), "--out", str(tmp_path / "i")], "default"),
    ):
        res = runner.invoke(app, cmd)
        folder = home / f"synthetic-{size}-seed0"
        assert res.exit_code == 2, (cmd, res.output)
        assert res.output == (
            f"error: {folder} exists but holds no synthetic_manifest.json (not a complete nvsm "
            "synthetic dataset); remove it or set $NVSM_DATA to another folder\n"), res.output
    assert not any(p.name in ("f", "t", "i") for p in tmp_path.iterdir())


def test_option_values_keep_every_character(tmp_path, monkeypatch):
    # --root went through json.dumps' \u escapes into YAML, which read an emoji's two escapes
    # as two lone surrogates: a wrong path stored, then a UnicodeEncodeError traceback.
    seen = _record_configs(monkeypatch, "nvsm.fewshot.loop.run_fewshot")
    for root in (f"{tmp_path}/\U0001F600 data", f"{tmp_path}/a\x85b\u2028c", f"{tmp_path}/\"q\""):
        res = runner.invoke(app, ["fewshot", "--dataset", "pascal3d", "--root", root,
                                  "--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and "stop here" in res.output, res.output
        assert seen[-1].data.root == root


def test_empty_paths_are_refused_as_the_option(tmp_path):
    # Typer's Path made "" the working directory: the run read or loaded from there.
    for cmd, message in (
        (["fewshot", "--dataset", "pascal3d", "--root", ""],
         "error: --root (data.root): expected a path, got ''\n"),
        (["train", "--backbone-weights", ""],
         "error: --backbone-weights (model.backbone_weights): expected a path, got ''\n"),
        (["train", "-s", "data.root=''"], "error: overrides.data.root: expected a path, got ''\n"),
    ):
        res = runner.invoke(app, [*cmd, "--out", str(tmp_path / "run")])
        assert res.exit_code == 2 and res.output == message, res.output
    assert not (tmp_path / "run").exists()


def test_a_missing_backbone_weights_file_stops_before_the_dataset_is_made(tmp_path,
                                                                          monkeypatch):
    # It was found missing only when the model was built: after the built-in dataset had been
    # generated and the training images cropped.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("NVSM_DATA", str(home))
    weights = tmp_path / "missing.pth"
    message = (f"error: model.backbone_weights: no file {weights} (expected a local ImageNet "
               "state dict for the backbone, torchvision format)\n")
    for cmd in (["train", "-s", "data.synth_size=tiny", "-s", "device=cpu",
                 "--backbone-weights", str(weights)],
                ["fewshot", "--tiny", "-s", f"model.backbone_weights={weights}"]):
        res = runner.invoke(app, [*cmd, "--out", str(tmp_path / "run")])
        assert not any(home.iterdir()) and not (tmp_path / "run").exists()
        assert res.exit_code == 2 and res.output == message, res.output
    # So does resuming a run stopped before any model was saved: it trains a fresh one too
    # (a resumed few-shot run skipped the check and found the file missing after the crops).
    for command in ("train", "fewshot"):
        run = tmp_path / f"stopped-{command}"
        run.mkdir()
        (run / "run_info.json").write_text(json.dumps({"command": command}))
        cmd = (["train", "-s", "data.synth_size=tiny", "-s", "device=cpu",
                "--backbone-weights", str(weights)] if command == "train" else
               ["fewshot", "--tiny", "-s", f"model.backbone_weights={weights}"])
        res = runner.invoke(app, [*cmd, "--out", str(run), "--resume"])
        assert not any(home.iterdir())
        assert sorted(p.name for p in run.iterdir()) == ["run_info.json"]
        assert res.exit_code == 2 and res.output == message, res.output


def test_baselines_option_overrides_the_recipe_either_way(tmp_path, monkeypatch):
    # --baselines was ignored when the recipe turned them off ("None if baselines else False").
    seen = _record_configs(monkeypatch, "nvsm.fewshot.loop.run_fewshot")
    recipe = tmp_path / "nobase.yaml"
    recipe.write_text("labels:\n  annotations: 3\nfewshot:\n  baselines: false\n")
    for args, want in (([], False), (["--baselines"], True), (["--no-baselines"], False)):
        res = runner.invoke(app, ["fewshot", "-r", str(recipe), *args, "--out", str(tmp_path)])
        assert "stop here" in res.output and seen[-1].fewshot.baselines is want, (args, res.output)
    for args, want in (([], True), (["--baselines"], True), (["--no-baselines"], False)):
        res = runner.invoke(app, ["fewshot", "--tiny", *args, "--out", str(tmp_path)])
        assert "stop here" in res.output and seen[-1].fewshot.baselines is want, (args, res.output)


def test_fewshot_takes_the_dataset_root_from_set_or_the_recipe(tmp_path, monkeypatch):
    # --dataset pascal3d -s data.root=PATH was refused as "needs --root PATH".
    seen = _record_configs(monkeypatch, "nvsm.fewshot.loop.run_fewshot")
    res = runner.invoke(app, ["fewshot", "--dataset", "pascal3d", "-s", f"data.root={tmp_path}",
                              "--out", str(tmp_path / "r")])
    assert "stop here" in res.output, res.output
    assert seen[-1].data.root == str(tmp_path)
    assert seen[-1].data.dataset == "pascal3d"
    # Without a root the loop itself refuses, before the run folder is written (the command
    # line checked it too, in other words).
    monkeypatch.undo()
    for cmd in (["--dataset", "pascal3d"], ["-r", "kitti-car-7shot"]):
        res = runner.invoke(app, ["fewshot", *cmd, "--out", str(tmp_path / "r")])
        dataset = cmd[1].split("-")[0]
        assert res.exit_code == 2 and res.output == (
            f"error: dataset '{dataset}' needs data.root (-s data.root=PATH; nvsm fewshot: "
            "--root PATH)\n"), res.output
        assert not (tmp_path / "r").exists()


def test_help_examples_continue_their_lines_with_a_backslash():
    # The pascal3d and kitti examples of fewshot --help went on on a second line with no
    # backslash: pasted into a shell, the first line ran alone and the second failed.
    import inspect
    import itertools

    import typer

    def helps(command, name):
        yield name, inspect.cleandoc(command.help or "")
        for sub_name, sub in getattr(command, "commands", {}).items():
            yield from helps(sub, f"{name} {sub_name}")

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    continued = []
    for name, text in helps(typer.main.get_command(app), "nvsm"):
        lines = text.partition("Example")[2].split("\n")[1:]
        for line, after in itertools.pairwise(lines):
            if line.strip() and after.strip() and indent(after) > indent(line):
                continued.append(line)
                assert line.endswith(" \\"), (name, line)
    assert len(continued) >= 2


def test_an_empty_path_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch):
    # Typer read --out "" (say, --out "$RUN" with RUN unset) as ".", and a run wrote into the
    # working folder.
    monkeypatch.chdir(tmp_path)
    for args, name in (
        (["train", "--out", ""], "--out"),
        (["fewshot", "--tiny", "--out", ""], "--out"),
        (["evaluate", "-m", ""], "--model"),
        (["evaluate", "-m", "model.pt", "--out", ""], "--out"),
        (["infer", "-m", ""], "--model"),
        (["infer", "-m", "model.pt", "a.jpg", ""], "PATHS"),
        (["infer", "-m", "model.pt", "--out", ""], "--out"),
        (["data", "synth", "--tiny", "--out", ""], "--out"),
        (["data", "synth", "--tiny", "--out", "syn", "--backgrounds", ""], "--backgrounds"),
        (["data", "verify", "-d", "pascal3d", "--root", ""], "--root"),
        (["data", "verify", "-d", "occluded_pascal3d", "--root", "r", "--pascal3d-root", ""],
         "--pascal3d-root"),
        (["data", "split", "-d", "pascal3d", "--root", "", "--out", "s"], "--root"),
        (["data", "split", "-d", "pascal3d", "--root", "r", "--out", ""], "--out"),
        (["pseudo-labels", "export", ""], "RUN"),
        (["pseudo-labels", "export", "run", "--out", ""], "--out"),
        (["pseudo-labels", "inspect", "run", "--out", ""], "--out"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output == f"error: {name}: expected a path, got ''\n", (args, res.output)
        assert not any(tmp_path.iterdir()), args
