"""The ``nvsm`` command line: every command is a thin shell over the library."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from nvsm.data.cli import app as data_app

app = typer.Typer(
    help="nvsm: few-shot category-level 3D pose (Neural View Synthesis and Matching on NeMo).",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(data_app, name="data")


@app.command()
def info() -> None:
    """Show versions, the git commit and the rendering backends available here.

    Example:
        nvsm info
    """
    from nvsm.io import git_commit, package_versions
    from nvsm.render import default_rasterizer, pytorch3d_available

    table = Table(title="nvsm environment")
    table.add_column("item")
    table.add_column("value")
    for name, version in package_versions().items():
        table.add_row(name, str(version))
    table.add_row("git commit", str(git_commit()))
    table.add_row("pytorch3d rasteriser", "available" if pytorch3d_available() else "missing")
    table.add_row("default rasteriser (cpu)", default_rasterizer("cpu").name)
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
