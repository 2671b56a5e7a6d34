"""pytest fixtures for the tests that boot the test guest (`fixtures`).

The guest itself and the tools to run it live in the package: `postcopy.kit.guestkit` (`build`,
`qemu`, `scenario`); the timing measurements are `bench/bench_guest.py`.
"""
