"""The verification before release: B proves it holds A's bytes before A lets go.

How it works (issue 12, item 3), per disk: A computes the per-chunk digests of its frozen image
(`postcopy.source.digest.compute_digests`, what `postcopy digest` runs), and B compares them with
its local file for every chunk the guest has not written there: `postcopy verify --json
--state-dir DIR --digests -` runs on B over the remote command with the digest file on its stdin.
Digests cross the link (16 bytes per chunk), not data.  The report comes back as JSON
(`VerifyReport.to_record`): `match`, or `mismatch` with the first offsets, and then the
orchestration keeps A.  A refusal of kind `not-complete` (B's map not durable yet) is retried a
few times.

A build without them (`postcopy.source.digest` missing) answers `not-run` with the reason; the
orchestration then says so loudly and releases A unverified.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from postcopy.migrate.records import DiskPlan
from postcopy.migrate.remote import RemoteHost

NOT_COMPLETE_RETRIES = 10
RETRY_SECONDS = 0.5


@dataclass(frozen=True)
class Verification:
    status: str  # match | mismatch | not-run | error
    detail: str
    mismatches: dict[str, list[int]] = field(default_factory=dict)  # device -> byte offsets
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> B's record

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, "mismatches": self.mismatches,
                "reports": self.reports}  # fmt: skip


def digests_available() -> bool:
    return importlib.util.find_spec("postcopy.source.digest") is not None


async def _verify_one(remote: RemoteHost, disk: DiskPlan) -> dict[str, Any]:
    from postcopy.source.digest import compute_digests

    digests = await trio.to_thread.run_sync(
        compute_digests, Path(disk.source_image), disk.chunk_size
    )
    data = digests.encode()
    argv = ["verify", "--json", "--state-dir", disk.state_dir, "--digests", "-",
            "--dest", disk.dest_file]  # fmt: skip
    for _ in range(NOT_COMPLETE_RETRIES):
        code, out, err = await remote.run_with_input(argv, data)
        try:
            record: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            lines = err.strip().splitlines()
            return {"result": "error", "error": lines[-1] if lines else f"exit status {code}"}
        if record.get("kind") != "not-complete":
            return record
        await trio.sleep(RETRY_SECONDS)
    return record


async def verify_disks(remote: RemoteHost, disks: list[DiskPlan]) -> Verification:
    """Compare A's digests with B's files (see the module docstring)."""
    if not digests_available():
        return Verification(
            "not-run",
            "postcopy digest/verify are not in this build: B's copy was not checked against "
            "A's image",
        )
    reports = {disk.device: await _verify_one(remote, disk) for disk in disks}
    errors = {d: r.get("error", "?") for d, r in reports.items() if r.get("result") == "error"}
    if errors:
        detail = "; ".join(f"{d}: {e}" for d, e in errors.items())
        return Verification("error", f"B could not verify: {detail}", reports=reports)
    mismatches = {
        d: list(r.get("mismatch_offsets", [])) for d, r in reports.items()
        if r.get("result") != "match"
    }  # fmt: skip
    if mismatches:
        detail = "; ".join(
            f"{d}: {reports[d].get('mismatch_count')} chunk(s) differ from A at byte offsets "
            + ", ".join(f"{o:#x}" for o in offsets)
            for d, offsets in mismatches.items()
        )
        return Verification("mismatch", detail, mismatches, reports)
    compared = sum(int(r.get("chunks_compared", 0)) for r in reports.values())
    skipped = sum(int(r.get("chunks_skipped_guest_written", 0)) for r in reports.values())
    return Verification(
        "match", f"{compared} chunks match A's, {skipped} guest-written on B skipped",
        reports=reports,
    )  # fmt: skip
