"""Every example command in README's code blocks and in the commands' --help parses against the
CLI, and where the command resolves a config, the config loads; every ``python benchmarks/...``
command README gives for its numbers parses against its script. A renamed option, recipe or
config key that the documentation still spells fails here instead of in a user's terminal."""

from __future__ import annotations

import inspect
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from nvsm.cli import app
from nvsm.config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT_COMMAND = typer.main.get_command(app)
runner = CliRunner()


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _torchrun_as_nvsm(line: str) -> str:
    """``torchrun [its options] -m nvsm.cli ARGS`` read as ``nvsm ARGS`` (other lines as they
    are): what every process runs."""
    return re.sub(r"^torchrun .*?-m nvsm\.cli ", "nvsm ", line)


def _readme_examples() -> list[str]:
    """``nvsm ...`` lines of README's bash blocks (continuations joined, comments dropped;
    ``torchrun ... -m nvsm.cli`` lines included)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            # "nvsm ...", ".venv/bin/nvsm ..." or "./install.sh && .venv/bin/nvsm ...".
            line = _torchrun_as_nvsm(line.split(" #")[0].strip())
            command = re.match(r"(?:.*&&\s*)?(?:\S*/)?(nvsm .*)", line)
            if command:
                found.append(command.group(1))
    return found


def _help_examples() -> list[str]:
    """The example lines of every command's --help (deeper-indented lines continue one)."""
    found: list[str] = []
    for _, command in _commands(ROOT_COMMAND):
        text = inspect.cleandoc(command.help or "")
        _, sep, examples = text.partition("Example")
        assert sep, command.name
        for line in examples.split("\n")[1:]:
            if _torchrun_as_nvsm(line.strip()).startswith("nvsm "):
                found.append(_torchrun_as_nvsm(line.strip()).removesuffix("\\").strip())
            elif line.strip() and found:
                found[-1] += " " + line.strip().removesuffix("\\").strip()
    return found


def _readme_benchmark_commands() -> list[str]:
    """``python benchmarks/...`` commands of README, in code blocks and in inline code (whose
    line breaks are spaces), environment settings before them dropped."""
    text = re.sub(r"\\\n\s*", " ", README.read_text())
    spans = re.findall(r"`([^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    found = [" ".join(part.split(" #")[0].split()) for part in [*lines, *spans]]
    commands = (re.search(r"python benchmarks/\w+\.py.*", c) for c in found)
    return sorted({c.group(0) for c in commands if c})


README_EXAMPLES = _readme_examples()
BENCHMARK_COMMANDS = _readme_benchmark_commands()
HELP_EXAMPLES = _help_examples()


def _args(example: str) -> list[str]:
    """The arguments after ``nvsm``: shell redirection dropped, README's ``[--opt]`` usage
    brackets opened."""
    tokens = shlex.split(re.sub(r"\[(--[^]]*)\]", r"\1", example.split(" > ")[0]))
    assert tokens[0] == "nvsm", example
    return tokens[1:]


def _parse(args: list[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Parse ``args`` as click would before running the command; returns the command path and
    the parsed parameters. Raises click's usage errors (unknown option, bad value, missing
    argument) as they are."""
    command, path, rest = ROOT_COMMAND, [], list(args)
    while isinstance(command, TyperGroup) and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    assert not getattr(command, "commands", None), f"no such command: {args}"
    ctx = command.make_context(" ".join(["nvsm", *path]), rest)
    return tuple(path), ctx.params


class _Reached(Exception):
    """Raised by the stand-in for a command's work: the command got that far."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args_seen, self.kwargs_seen = args, kwargs


# The work each command hands its checked options to. Standing in for it runs everything the
# command itself does first (recipe choice, -s overrides, option checks) without the work.
WORK = {
    ("fewshot",): "nvsm.fewshot.loop.run_fewshot",
    ("train",): "nvsm.pipeline.train_and_evaluate",
    ("evaluate",): "nvsm.pipeline.evaluate_checkpoint",
    ("infer",): "nvsm.infer.predict_io.run_inference",
    ("pseudo-labels", "export"): "nvsm.fewshot.report.export_labels",
    ("pseudo-labels", "inspect"): "nvsm.fewshot.report.write_report",
    ("data", "verify"): "nvsm.data.cli.verify_dataset",
}


def _stand_in(*args: Any, **kwargs: Any) -> None:
    raise _Reached(*args, **kwargs)


def _check(example: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = _args(example)
    if args == ["COMMAND", "--help"]:  # the top-level help's pointer to every command's help
        for path, _ in _commands(ROOT_COMMAND):
            res = runner.invoke(app, [*path, "--help"])
            assert res.exit_code == 0, (path, res.output)
        return
    path, _ = _parse(args)
    monkeypatch.chdir(tmp_path)  # relative --out folders land here, should anything write
    if path in WORK:
        monkeypatch.setattr(WORK[path], _stand_in)
        if path == ("pseudo-labels", "inspect"):  # it checks the run folder before the work
            (tmp_path / args[2] / "round_1").mkdir(parents=True, exist_ok=True)
    elif path not in {("info",), ("recipes", "list"), ("recipes", "show")}:
        return  # parsed; the rest of these commands is reading the data the example names
    res = runner.invoke(app, args)
    if path in WORK:
        assert isinstance(res.exception, _Reached), (example, res.output)
        if path in {("fewshot",), ("train",)}:  # the recipe and -s values resolved
            assert isinstance(res.exception.args_seen[0], RunConfig), example
    else:
        assert res.exit_code == 0, (example, res.output)


@pytest.mark.parametrize("example", README_EXAMPLES)
def test_readme_example_commands_run_as_written(example: str, monkeypatch, tmp_path) -> None:
    _check(example, monkeypatch, tmp_path)


@pytest.mark.parametrize("example", HELP_EXAMPLES)
def test_help_example_commands_run_as_written(example: str, monkeypatch, tmp_path) -> None:
    _check(example, monkeypatch, tmp_path)


@pytest.mark.parametrize("command", BENCHMARK_COMMANDS, ids=BENCHMARK_COMMANDS)
def test_readme_benchmark_commands_parse(command: str, load_benchmark, monkeypatch,
                                         tmp_path) -> None:
    _, script, *args = shlex.split(command)
    module = load_benchmark(Path(script).stem)
    if hasattr(module, "split_argv"):  # fewshot_draws: what follows "--" goes to nvsm fewshot
        own, extra = module.split_argv(args)
        parsed = module.build_parser().parse_args(own)
        for seed in parsed.seeds:
            nvsm_args = module.fewshot_args(parsed, seed, parsed.out / "draw", extra)
            _check(shlex.join(["nvsm", *nvsm_args]), monkeypatch, tmp_path)
    else:
        module.build_parser().parse_args(args)  # argparse exits (SystemExit) on a bad one


def test_the_examples_are_found() -> None:
    # The extraction itself: README's first command and a continued help example are there.
    assert README_EXAMPLES[0] == "nvsm fewshot --annotations 7"
    assert ("nvsm fewshot --dataset kitti --root /data/kitti/object "
            "-s data.cad_root=/data/PASCAL3D+_release1.1") in HELP_EXAMPLES
    assert len(README_EXAMPLES) >= 20 and len(HELP_EXAMPLES) >= 30
    assert {Path(shlex.split(c)[1]).stem for c in BENCHMARK_COMMANDS} >= {
        "bench_fewshot", "bench_inference", "bench_malloc", "bench_memory_format", "bench_render",
        "fewshot_draws", "flip_diagnostics", "pseudo_label_controls"}


def _heading_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_within_the_page_lead_somewhere():
    text = README.read_text()
    targets = {_heading_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
    targets |= set(re.findall(r'<a id="([^"]+)"></a>', text))
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) > 30  # the contents and the measured section's index
    assert sorted(set(links) - targets) == []
