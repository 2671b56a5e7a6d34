"""Benchmark verification before release (issue 12, item 3): `postcopy digest` on A and
`postcopy verify` on B against the plain tools that read and hash the same file.

    .venv/bin/python -m bench verify

On a dense 1 GiB file of random bytes (in the page cache: warmed first, so the figures are the
CPU cost, not the disk's), in the same run, ROUNDS times in alternation, medians:

- peers: `cat FILE > /dev/null` (the read alone), `b2sum FILE` and `sha256sum FILE` (coreutils:
  one process hashing the whole file);
- `compute_digests` (the library `postcopy digest` calls) with each algorithm, 1 and 2 threads;
- `verify_destination` of a complete state directory whose destination is a copy of the file
  (the default algorithm, 1 thread);
- both again on a 1 GiB file that is 1% data and 99% holes: holes are not read.

Printed as MiB/s of file size and ratios against `cat` and `b2sum`, with the bytes the digest file
puts on the link (against the data bytes a second transfer would move).  Results also go to
bench/results/verify-<timestamp>.json.  Exit status 0: the numbers are the output.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postcopy.destination.blockmap import BlockMap, MapIdentity
from postcopy.destination.verify import verify_destination
from postcopy.source.digest import ALGORITHMS, DEFAULT_ALGORITHM, compute_digests

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
MiB, GiB = 1 << 20, 1 << 30
SIZE = 1 * GiB
CHUNK = 64 * 1024
ROUNDS = 3


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run_tool(*argv: str) -> None:
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)


def make_dense(path: Path) -> None:
    with open(path, "wb") as f:
        for _ in range(SIZE // (64 * MiB)):
            f.write(os.urandom(64 * MiB))


def make_mostly_holes(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, 100 * MiB):  # 1 MiB of data every 100 MiB
            f.seek(offset)
            f.write(os.urandom(MiB))


def complete_destination(workdir: Path, image: Path) -> tuple[Path, Path]:
    """B's side of a finished migration of `image`: a copy and a complete block map."""
    dest, state_dir = workdir / f"{image.stem}.dest.img", workdir / f"{image.stem}.state"
    subprocess.run(["cp", "--sparse=always", str(image), str(dest)], check=True)
    state_dir.mkdir()
    identity = MapIdentity(SIZE, CHUNK, SIZE, "", "bench")
    block_map = BlockMap.open(state_dir, identity)
    block_map.mark_present(0, block_map.chunk_count)
    block_map.make_durable(lambda: None)
    block_map.close()
    return state_dir, dest


def main() -> int:
    results: dict[str, Any] = {"size_bytes": SIZE, "chunk_size": CHUNK, "rounds": ROUNDS}
    with tempfile.TemporaryDirectory(prefix="bench-verify-", dir="/var/tmp") as workdir_name:
        workdir = Path(workdir_name)
        dense, sparse = workdir / "dense.img", workdir / "sparse.img"
        make_dense(dense)
        make_mostly_holes(sparse)
        destinations = {image: complete_destination(workdir, image) for image in (dense, sparse)}
        for path in (dense, sparse, *(dest for _, dest in destinations.values())):
            run_tool("cat", str(path))  # warm the page cache
        digests = {image: compute_digests(image, CHUNK) for image in (dense, sparse)}
        for image in (dense, sparse):
            cases: dict[str, Callable[[], object]] = {
                "cat > /dev/null": lambda image=image: run_tool("cat", str(image)),
                "b2sum": lambda image=image: run_tool("b2sum", str(image)),
                "sha256sum": lambda image=image: run_tool("sha256sum", str(image)),
            }
            for algorithm in ALGORITHMS:
                for threads in (1, 2):
                    cases[f"digest {algorithm} x{threads}"] = (
                        lambda image=image, a=algorithm, t=threads: compute_digests(
                            image, CHUNK, algorithm=a, threads=t
                        )
                    )
            state_dir, dest = destinations[image]
            cases[f"verify {DEFAULT_ALGORITHM} x1"] = (
                lambda image=image, s=state_dir, d=dest: verify_destination(
                    s, digests[image], dest=d
                )
            )
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(ROUNDS):
                for name, action in cases.items():
                    times[name].append(timed(action))
            rates = {name: SIZE / MiB / statistics.median(values) for name, values in times.items()}
            kind = "dense (random bytes)" if image == dense else "1% data, 99% holes"
            print(f"1 GiB file, {kind}, in the page cache; median of {ROUNDS} rounds:")
            for name, rate in rates.items():
                print(
                    f"  {name:28s} {rate:8.0f} MiB/s  {rate / rates['cat > /dev/null']:6.2f}x cat"
                    f"  {rate / rates['b2sum']:6.2f}x b2sum"
                )
            report = verify_destination(*destinations[image][:1], digests[image],
                                        dest=destinations[image][1])  # fmt: skip
            assert report.matched, report.summary()
            results[image.stem] = {"mib_per_second": rates, "seconds": times}
        encoded = len(digests[dense].encode())
        print(
            f"  on the link: a digest file of {encoded} bytes for {SIZE} bytes of image "
            f"({encoded / SIZE:.6f}x a second transfer of dense data; 16 bytes per 64 KiB chunk)"
        )
        results["digest_file_bytes"] = encoded
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"verify-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"  results: {out}")
    return 0
