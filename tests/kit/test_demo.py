"""`postcopy demo` end to end at a small size: two namespaces, serve, receive, workload, check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_demo_migrates_and_its_final_check_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "postcopy.cli",
            "demo",
            "--size",
            "32M",
            "--rate",
            "1G",
            "--no-live",
            "--workdir",
            str(tmp_path),
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "final check (B's disk == A's disk + guest writes): PASSED" in output
    assert "network: network namespaces" in output
    assert "time to first guest I/O:" in output and "total drain time:" in output
    # It cleaned up after itself: its namespaces are gone, no files are left behind.
    created = set(re.findall(r"netns (pcdemo-[ab]-\w+)", output))
    assert len(created) == 2
    assert not created & _namespaces()
    assert list(tmp_path.iterdir()) == []


def test_demo_rejects_a_bad_size() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "postcopy.cli", "demo", "--size", "lots"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "error:" in result.stderr
