"""Build (or find in the cache) the nested Xen lab: Xen, a Debian dom0 and a PVH test domU.

How it works (nothing Xen is ever installed on the host; everything lands in the cache):
1. dom0's root file system is a `debootstrap --variant=minbase` tree of the host's Debian suite with
   the Xen tools, nbdkit with its python plugin and python3-libnbd (so that a checkout shared
   into dom0 runs `postcopy receive` there), nbd-client, kmod, dmsetup and QEMU's Xen device model
   (for the qdisk backend); documentation, locales and apt's caches are deleted.  It is shared
   read-only into the nested VM over 9p; dom0 puts a tmpfs overlay over it, so a run never writes
   to the cache.
2. The hypervisor is the `xen-hypervisor-4.17-amd64` package at exactly the version of the tools
   debootstrap installed (`apt-get download PKG=VERSION`, `dpkg -x`), gunzipped: QEMU's `-kernel`
   boots the ELF32 multiboot image.
3. The kernel package (the one the guest kit uses, `linux-image-amd64`'s dependency) is unpacked
   with `dpkg -x`; dom0 boots its vmlinuz.  Only the modules dom0 needs (and their `depends=`
   closure, read from each module's .modinfo) go into the root file system, indexed by the tree's
   own depmod.
4. dom0's initramfs (`initramfs-init.sh`, busybox, the 9p/virtio/overlay modules in dependency
   order) mounts the 9p root under an overlay and the run's control share, then switch_roots.
5. The domU: the guest kit's uncompressed vmlinux (PVH entry, no decompression in libxenguest) and
   an initramfs of busybox, xen-blkfront and the guest kit's self-checking workload
   (`domu-init.sh` runs it on /dev/xvda; its console is hvc0).

Cache layout, under `cache_root()/xenlab` (the guest kit's cache root, `.cache/guest/` in a
checkout): `rootfs-<key>/` keyed by the builder version, the kernel and the Xen tools' versions;
`lab-<key>/` (hypervisor, dom0 kernel and initramfs, domU kernel and initramfs) keyed by the same
plus hashes of the shipped scripts and the workload.  An entry is used only once its `complete`
file exists; a file lock serialises builders.  `python -m postcopy.kit.xenlab.build` builds by
hand (as root).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from postcopy.kit.guestkit.build import (
    CpioNewcWriter,
    GuestBuildError,
    _find_busybox,
    _locked,
    cache_root,
    ensure_guest_boot_files,
    modinfo_depends,
)

KIT_DIR = Path(__file__).resolve().parent  # the shell scripts ship next to this module
BUILDER_VERSION = "2"  # bump to invalidate every cached lab
SUITE = "bookworm"
XEN_BRANCH = "4.17"
XEN_UTILS_PACKAGE = f"xen-utils-{XEN_BRANCH}"
XEN_HYPERVISOR_PACKAGE = f"xen-hypervisor-{XEN_BRANCH}-amd64"
ROOTFS_PACKAGES = (
    XEN_UTILS_PACKAGE,
    "qemu-system-xen",  # the qdisk backend (only the negative test needs it)
    "nbdkit",
    "nbdkit-plugin-python",  # `postcopy receive` in dom0 (the project comes over 9p, see lab.py)
    "python3-libnbd",  # the engine's blocking source connection
    "nbd-client",
    "kmod",
    "dmsetup",
    "busybox",
)
DOM0_MODULES = (
    "xenfs", "xen_evtchn", "xen_gntdev", "xen_gntalloc", "xen_privcmd", "xen_blkback",
    "nbd", "loop", "dm_mod",
)  # fmt: skip
DOM0_INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
DOMU_MODULES = ("xen_blkfront",)
TRIMMED_DIRS = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
    "var/cache/apt/archives", "var/lib/apt/lists", "var/cache/debconf",
)  # fmt: skip
APT_TIMEOUT = 900


class LabBuildError(GuestBuildError):
    """The lab could not be built (not root, no debootstrap, a package apt does not offer...)."""


@dataclass(frozen=True)
class LabFiles:
    """Everything a nested Xen run boots, all inside the cache."""

    hypervisor: Path  # ELF32 multiboot image for QEMU -kernel
    dom0_kernel: Path
    dom0_initramfs: Path
    rootfs: Path  # shared read-only over 9p
    domu_kernel: Path  # the guest kit's uncompressed vmlinux (PVH entry), copied into the lab
    domu_initramfs: Path
    workload_tool: Path  # the guest kit's host tool (`workload fill ...` prepares images)
    kernel_version: str  # e.g. "6.1.0-57-amd64"
    kernel_package_version: str
    xen_version: str
    cache_dir: Path

    def size_bytes(self) -> int:
        """Bytes the lab occupies in the cache (root file system and images)."""
        total = 0
        for directory in (self.rootfs, self.hypervisor.parent):
            for path in directory.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    total += path.stat().st_size
        return total


def lab_cache_root() -> Path:
    return cache_root() / "xenlab"


def _run(argv: list[str], cwd: Path | None = None, timeout: float = APT_TIMEOUT) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, check=True, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise LabBuildError(f"{argv[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip()[-800:]
        raise LabBuildError(f"{' '.join(argv)} failed ({exc.returncode}): {tail}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabBuildError(f"{' '.join(argv)} took more than {timeout:g} s") from exc
    return done.stdout


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb" and "security" not in fields[1]:
                return fields[1]
    return "http://deb.debian.org/debian"


def installed_version(rootfs: Path, package: str) -> str:
    """The version dpkg recorded for `package` in a root file system."""
    status = (rootfs / "var/lib/dpkg/status").read_text()
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Package") == package and "installed" in fields.get("Status", ""):
            return fields["Version"]
    raise LabBuildError(f"{package} is not installed in {rootfs}")


def _module_index(modules_root: Path) -> dict[str, Path]:
    """Module name (dashes as underscores) -> its .ko file, for one kernel's module tree."""
    return {
        path.name.removesuffix(".ko").replace("-", "_"): path for path in modules_root.rglob("*.ko")
    }


def _builtin_modules(modules_root: Path) -> set[str]:
    builtin = modules_root / "modules.builtin"
    if not builtin.exists():
        return set()
    return {
        os.path.basename(line).removesuffix(".ko").replace("-", "_")
        for line in builtin.read_text().split()
    }


def module_load_order(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files of `wanted` and their dependencies, dependencies first; built-ins skipped."""
    index = _module_index(modules_root)
    builtin = _builtin_modules(modules_root)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, depth: int) -> None:
        if name in seen or name in builtin:
            return
        if depth > 30:
            raise LabBuildError(f"module dependency chain too deep at {name}")
        if name not in index:
            raise LabBuildError(f"kernel module {name} is neither built in nor in {modules_root}")
        seen.add(name)
        for dependency in modinfo_depends(index[name].read_bytes()):
            visit(dependency.replace("-", "_"), depth + 1)
        order.append(index[name])

    for name in wanted:
        visit(name, 0)
    return order


def _unmount_under(directory: Path) -> None:
    """Lazily unmount whatever is mounted at or below `directory`, deepest first."""
    prefix = str(directory.resolve())
    mounts = [
        line.split()[1].replace("\\040", " ")
        for line in Path("/proc/mounts").read_text().splitlines()
    ]
    for mount_point in sorted(mounts, key=len, reverse=True):
        if mount_point == prefix or mount_point.startswith(prefix + "/"):
            subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=30)


# ---- dom0 root file system -----------------------------------------------------------------


def _build_rootfs(target: Path, kernel_tree: Path, kernel_version: str) -> None:
    """debootstrap into `target` (kept across a failure of the later steps: it is the slow part),
    trim it, add dom0's modules and index them."""
    bootstrapped = target / ".debootstrap-done"
    if not bootstrapped.exists():
        shutil.rmtree(target, ignore_errors=True)
        try:
            _run(
                [
                    "debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",
                    SUITE, str(target), debian_mirror(),
                ]
            )  # fmt: skip
        finally:
            _unmount_under(target)  # debootstrap leaves /proc mounted in the tree when it fails
        bootstrapped.touch()
    for trimmed in TRIMMED_DIRS:
        shutil.rmtree(target / trimmed, ignore_errors=True)
        (target / trimmed).mkdir(parents=True, exist_ok=True)
    # No service may start inside the tree (and none is started by the lab's init either).
    policy = target / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    modules_root = kernel_tree / "lib/modules" / kernel_version
    destination = target / "lib/modules" / kernel_version
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    for index in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (modules_root / index).exists():
            shutil.copy2(modules_root / index, destination / index)
    for module in module_load_order(modules_root, DOM0_MODULES):
        relative = module.relative_to(modules_root)
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, destination / relative)
    _run(["chroot", str(target), "depmod", kernel_version], timeout=120)
    for directory in ("xenlab", "ctl"):
        (target / directory).mkdir(exist_ok=True)


# ---- initramfs images ----------------------------------------------------------------------


def _write_initramfs(path: Path, init: bytes, modules: list[Path], extra: dict[str, bytes]) -> None:
    cpio = CpioNewcWriter()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "newroot", "lib", "lib/modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("init", init, executable=True)
    cpio.file("bin/busybox", _find_busybox().read_bytes(), executable=True)
    for name, data in extra.items():
        cpio.file(name, data, executable=True)
    for module in modules:
        cpio.file(f"lib/modules/{module.name}", module.read_bytes())
    cpio.file("lib/modules/load-order", "".join(f"{m.name}\n" for m in modules).encode())
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    temp.rename(path)


def _download(package: str, version: str, directory: Path) -> Path:
    _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=directory)
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if not debs:
        raise LabBuildError(f"apt-get download {package}={version} produced no .deb")
    return debs[0]


def _script_hashes() -> str:
    return ",".join(_sha256(KIT_DIR / name) for name in ("initramfs-init.sh", "domu-init.sh"))


def _read_manifest(entry: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in (entry / "complete").read_text().splitlines() if "=" in line
    )


def _lab_files(lab_dir: Path, rootfs: Path, workload: Path) -> LabFiles:
    manifest = _read_manifest(lab_dir)
    return LabFiles(
        hypervisor=lab_dir / "xen",
        dom0_kernel=lab_dir / "vmlinuz",
        dom0_initramfs=lab_dir / "dom0-initrd.gz",
        rootfs=rootfs,
        domu_kernel=lab_dir / "domu-vmlinux",
        domu_initramfs=lab_dir / "domu-initrd.gz",
        workload_tool=workload,
        kernel_version=manifest["kernel_version"],
        kernel_package_version=manifest["kernel_package_version"],
        xen_version=manifest["xen_version"],
        cache_dir=lab_dir,
    )


def ensure_lab(root: Path | None = None) -> LabFiles:
    """Return the cached lab, building whatever part is missing or out of date (needs root)."""
    root = lab_cache_root() if root is None else root
    guest = ensure_guest_boot_files()  # the domU kernel and the workload binary
    with _locked(root):
        # The guest kit resolved the kernel package apt offers (or fell back to its cache when
        # offline): the lab uses the same kernel, so it needs no apt query of its own.
        package, package_version = guest.kernel_package, guest.kernel_version
        kernel_version = package.removeprefix("linux-image-")
        rootfs_key = _key(BUILDER_VERSION, SUITE, package, package_version, *ROOTFS_PACKAGES,
                          *DOM0_MODULES)  # fmt: skip
        lab_key = _key(rootfs_key, _script_hashes(), _sha256(guest.workload_tool),
                       *DOM0_INITRAMFS_MODULES, *DOMU_MODULES)  # fmt: skip
        rootfs = root / f"rootfs-{rootfs_key}"
        lab_dir = root / f"lab-{lab_key}"
        if (rootfs / "complete").exists() and (lab_dir / "complete").exists():
            return _lab_files(lab_dir, rootfs, guest.workload_tool)
        if os.geteuid() != 0:
            raise LabBuildError("building the Xen lab needs root (debootstrap, chroot)")
        with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as scratch_name:
            scratch = Path(scratch_name)
            os.chmod(scratch, 0o755)
            kernel_deb = _download(package, package_version, scratch)
            kernel_tree = scratch / "kernel"
            _run(["dpkg", "-x", str(kernel_deb), str(kernel_tree)])
            modules_root = kernel_tree / "lib/modules" / kernel_version
            if not (rootfs / "complete").exists():
                shutil.rmtree(rootfs, ignore_errors=True)
                for wanted in (DOM0_MODULES, DOM0_INITRAMFS_MODULES, DOMU_MODULES):
                    module_load_order(modules_root, wanted)  # fail before the slow part
                building = root / f".rootfs-{rootfs_key}"
                _build_rootfs(building, kernel_tree, kernel_version)
                xen_version = installed_version(building, XEN_UTILS_PACKAGE)
                (building / "complete").write_text(
                    f"xen_version={xen_version}\nkernel={package}={package_version}\n"
                )
                building.rename(rootfs)
            xen_version = _read_manifest(rootfs)["xen_version"]
            shutil.rmtree(lab_dir, ignore_errors=True)
            lab_build = scratch / "lab"
            lab_build.mkdir()
            xen_deb = _download(XEN_HYPERVISOR_PACKAGE, xen_version, scratch)
            xen_tree = scratch / "xen"
            _run(["dpkg", "-x", str(xen_deb), str(xen_tree)])
            compressed = xen_tree / "boot" / f"xen-{XEN_BRANCH}-amd64.gz"
            if not compressed.exists():
                raise LabBuildError(f"{xen_deb.name} holds no boot/{compressed.name}")
            (lab_build / "xen").write_bytes(gzip.decompress(compressed.read_bytes()))
            shutil.copy2(kernel_tree / "boot" / f"vmlinuz-{kernel_version}", lab_build / "vmlinuz")
            _write_initramfs(
                lab_build / "dom0-initrd.gz",
                (KIT_DIR / "initramfs-init.sh").read_bytes(),
                module_load_order(modules_root, DOM0_INITRAMFS_MODULES),
                {},
            )
            _write_initramfs(
                lab_build / "domu-initrd.gz",
                (KIT_DIR / "domu-init.sh").read_bytes(),
                module_load_order(modules_root, DOMU_MODULES),
                {"bin/workload": guest.workload_tool.read_bytes()},
            )
            shutil.copy2(guest.kernel, lab_build / "domu-vmlinux")
            (lab_build / "complete").write_text(
                f"kernel_version={kernel_version}\nkernel_package_version={package_version}\n"
                f"xen_version={xen_version}\nrootfs={rootfs}\n"
            )
            lab_build.rename(lab_dir)
        return _lab_files(lab_dir, rootfs, guest.workload_tool)


if __name__ == "__main__":
    lab = ensure_lab()
    print(f"xen        {lab.hypervisor} ({lab.xen_version})")
    print(f"dom0       {lab.dom0_kernel} {lab.dom0_initramfs} ({lab.kernel_version})")
    print(f"rootfs     {lab.rootfs}")
    print(f"domU       {lab.domu_kernel} {lab.domu_initramfs}")
    print(f"cache size {lab.size_bytes() / (1 << 20):.0f} MiB")
