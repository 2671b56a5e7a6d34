"""Run every benchmark module (bench/bench_*.py, each with `main() -> int`), or the named ones."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main(argv: list[str]) -> int:
    modules = pkgutil.iter_modules(bench.__path__)
    names = sorted(m.name for m in modules if m.name.startswith("bench_"))
    chosen = [n for n in names if not argv or n in argv or n.removeprefix("bench_") in argv]
    status = 0
    for name in chosen:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        status |= int(module.main())
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
