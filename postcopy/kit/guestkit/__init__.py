"""A tiny real guest and the tools to run it, for the tests, the benchmark and `demo --vm`.

`build` makes (or finds in the cache) Debian's kernel plus an initramfs of our own whose init runs
`workload.c`, a self-checking disk workload that prints one marker line per pass on the serial
console; `qemu` starts QEMU (TCG) with that guest and reads its markers; `scenario` runs the
postcopy migration of a running guest (`postcopy serve` on A, `postcopy receive
--wait-for-source` and QEMU `-incoming defer` on B, then `migrate_qemu_domain`).
`init.sh` and `workload.c` are package data, read from next to these modules.
"""
