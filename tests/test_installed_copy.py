"""An installed postcopy (`pip install .`, not editable) works outside the checkout.

The sources are copied to a temporary directory and installed into a fresh venv built from
Debian's interpreter (the one nbdkit's python plugin embeds).  Run from another directory, that
copy's `postcopy receive` finds the plugin script as installed package data, hands nbdkit's
embedded Python a path without the checkout, and serves the source's bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.peers import running_receive_command, running_serve, sparse_test_image

CHECKOUT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "nbdsrv", "postcopy", "plugin")
INSTALL_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("installed")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = CHECKOUT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    venv = root / "venv"
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base_python), "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
        check=True, cwd=root, timeout=INSTALL_TIMEOUT, capture_output=True,
    )  # fmt: skip
    shutil.rmtree(source)  # nothing may still point into the copied sources
    return venv


def clean_environment() -> dict[str, str]:
    """This test's environment without the variables that would lead into the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_installed_receive_locates_the_plugin_package(installed_venv: Path, tmp_path: Path) -> None:
    probe = (
        "from postcopy.destination import receive\n"
        "print(receive.PLUGIN_PATH)\n"
        "print(receive.plugin_file('fastpath.c'))\n"
        "print(receive.plugin_environment()['PYTHONPATH'])\n"
    )
    done = subprocess.run(
        [str(installed_venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
        env=clean_environment(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    plugin, fastpath_source, python_path = done.stdout.splitlines()
    site = installed_venv.resolve()
    assert Path(plugin).is_relative_to(site) and Path(plugin).name == "postcopy_plugin.py"
    assert Path(fastpath_source).is_relative_to(site) and Path(fastpath_source).is_file()
    assert str(CHECKOUT) not in python_path.split(os.pathsep)


@pytest.fixture
def installed_receive(installed_venv: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    image = tmp_path / "source.img"
    sparse_test_image(image, 4 * 1024 * 1024, seed=11)
    with running_serve(f"disk={image}") as serve:
        command = [
            str(installed_venv / "bin" / "postcopy"), "receive",
            "--source", serve.export_uri("disk"),
            "--dest", str(tmp_path / "dest.img"), "--state-dir", str(tmp_path / "state"),
            "--socket", str(tmp_path / "d.sock"),
        ]  # fmt: skip
        log = tmp_path / "receive.log"
        with running_receive_command(command, log, cwd=tmp_path, env=clean_environment()):
            yield image, tmp_path / "d.sock"


def test_installed_receive_serves_the_source_bytes(installed_receive: tuple[Path, Path]) -> None:
    image, socket_path = installed_receive
    handle = nbd.NBD()
    handle.connect_uri(f"nbd+unix:///?socket={socket_path}")
    try:
        expected = image.read_bytes()
        assert handle.get_size() == len(expected)
        got = b"".join(
            handle.pread(min(1 << 20, len(expected) - offset), offset)
            for offset in range(0, len(expected), 1 << 20)
        )
        assert got == expected
    finally:
        handle.shutdown()
