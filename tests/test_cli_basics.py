"""The CLI's own surface: version, exit codes that scripts rely on."""

from importlib.metadata import version

from typer.testing import CliRunner

from mmtok.cli.app import app


def test_version_prints_the_installed_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.output.strip() == f"mmtok {version('mmtok')}"
