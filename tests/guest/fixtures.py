"""pytest fixtures for tests that boot the test guest.

Registered for the whole suite as a plugin by tests/conftest.py (`pytest_plugins`): a test asks for
them by name (`guest_boot_files`, `guest_layout`, `guest_image`, `short_socket_dir`).
`guest_boot_files` builds the guest once per session (or finds it in `.cache/guest/`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from postcopy.kit.guestkit.build import GuestBootFiles, ensure_guest_boot_files
from postcopy.kit.guestkit.qemu import GuestLayout, prepare_disk_image


@pytest.fixture(scope="session", name="guest_boot_files")
def guest_boot_files_fixture() -> GuestBootFiles:
    return ensure_guest_boot_files()


@pytest.fixture(name="guest_layout")
def guest_layout_fixture() -> GuestLayout:
    return GuestLayout()


@pytest.fixture(name="guest_image")
def guest_image_fixture(
    tmp_path: Path, guest_boot_files: GuestBootFiles, guest_layout: GuestLayout
) -> Path:
    """A fresh raw disk image with the layout's pre-boot pattern."""
    image = tmp_path / "guest.img"
    prepare_disk_image(image, guest_layout, guest_boot_files)
    return image


@pytest.fixture(name="short_socket_dir")
def short_socket_dir_fixture() -> Iterator[Path]:
    """A private directory with a short path, for Unix sockets (their paths max out at 107 bytes,
    which pytest's tmp_path can exceed)."""
    directory = Path(tempfile.mkdtemp(prefix="pcg-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
