"""A nested Xen lab for tests: Xen 4.17 and a Debian dom0 in QEMU/TCG, with PVH test domUs.

`build.ensure_lab()` builds (or finds in the cache) the hypervisor, dom0's kernel, initramfs and
root file system, and the domU's kernel and initramfs running the guest kit's workload.
`lab.run_xen_lab()` boots it and drives dom0 through a command directory on a 9p share.
"""
