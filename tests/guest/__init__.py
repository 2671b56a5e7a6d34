"""The tiny test guest and the tools to run it: `build` (kernel + initramfs, cached),
`workload.c` (the self-checking disk workload), `qemu` (start QEMU, read its console markers),
`scenario` (the postcopy migration of a running guest), `fixtures` (pytest), `measure` (timings).
"""
