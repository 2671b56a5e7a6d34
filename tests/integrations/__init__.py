"""Toolstack integrations (xl, libvirt, QEMU args), QMP and qemu-migrate."""
