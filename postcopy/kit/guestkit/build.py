"""Build (or find in the cache) the tiny test guest: Debian's kernel and an initramfs of our own.

How it works:
1. The kernel: `apt-cache depends linux-image-amd64` names the current versioned kernel package
   (its name changes with every ABI bump); `apt-get download` fetches that .deb, and
   `dpkg-deb --fsys-tarfile` streams its file tree, from which only `vmlinuz` and the virtio
   modules are kept.  The ELF kernel inside the bzImage is unpacked to `vmlinux`, which QEMU
   boots through its PVH entry without the decompression that costs half the boot under TCG.
   Debian builds virtio, virtio_pci and virtio_blk as modules; their dependencies are read from
   each module's `.modinfo` ELF section (`depends=`), so a module that moves or gains a
   dependency in a later kernel is still found, and the load order is derived.
2. The workload (`workload.c`) is compiled with `gcc -static`; the same binary fills the host's
   image with the seeded pre-boot pattern (`workload fill ...`).
3. The initramfs is a gzip'd cpio "newc" archive written here in Python: `/init` (init.sh),
   busybox-static, the modules and the workload, plus a `/dev/console` node (so the kernel gives
   init a console without needing root on the host to create device files).

Everything lands in the cache (`cache_root`): `<checkout>/.cache/guest/` when the package runs
from a source checkout, else `$XDG_CACHE_HOME/postcopy/guest` (`~/.cache/postcopy/guest`);
`$POSTCOPY_GUEST_CACHE` overrides both.  Entries are keyed by the kernel package's version and
content hashes of the other inputs, so later runs build nothing.  A file lock serialises
concurrent builders.  Run `python -m postcopy.kit.guestkit.build` to build by hand.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent  # init.sh and workload.c ship next to this module
CHECKOUT_ROOT = GUEST_DIR.parents[2]  # the source tree's top, when the package runs from one
BUILDER_VERSION = "1"  # bump to invalidate every cached initramfs
# The modules the guest needs; their dependencies are found from .modinfo.
WANTED_MODULES = ("virtio_pci", "virtio_blk")
KERNEL_META_PACKAGE = "linux-image-amd64"
XEN_ELFNOTE_PHYS32_ENTRY = 18


class GuestBuildError(RuntimeError):
    """The guest could not be built (missing tool, no apt lists, broken package)."""


@dataclass(frozen=True)
class GuestBootFiles:
    """What a QEMU process needs to boot the test guest, and the host-side workload tool."""

    kernel: Path
    initramfs: Path
    workload_tool: Path
    kernel_package: str
    kernel_version: str


def cache_root() -> Path:
    """Where the built guest is kept (see the module docs for the order of choices)."""
    override = os.environ.get("POSTCOPY_GUEST_CACHE")
    if override:
        return Path(override)
    if (CHECKOUT_ROOT / "pyproject.toml").is_file() and (CHECKOUT_ROOT / "postcopy").is_dir():
        return CHECKOUT_ROOT / ".cache" / "guest"
    user_cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(user_cache) / "postcopy" / "guest"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, check=True, capture_output=True, text=True, timeout=300
        )
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise GuestBuildError(f"{' '.join(argv)} failed: {exc.stderr.strip()[-500:]}") from exc
    return done.stdout


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# ---- kernel ------------------------------------------------------------------------------


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel that linux-image-amd64 currently depends on."""
    try:
        depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    except GuestBuildError:
        if os.geteuid() != 0:
            raise
        # A machine whose apt lists were never fetched (or were cleaned): fetch them once.
        _run(["apt-get", "update", "-qq"])
        depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    package = None
    for line in depends.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and line.split()[-1].startswith("linux-image-"):
            package = line.split()[-1]
            break
    if package is None:
        raise GuestBuildError(
            f"apt-cache does not know {KERNEL_META_PACKAGE}; run `apt-get update` first"
        )
    shown = _run(["apt-cache", "show", "--no-all-versions", package])
    for line in shown.splitlines():
        if line.startswith("Version:"):
            return package, line.split(":", 1)[1].strip()
    raise GuestBuildError(f"apt-cache show {package} gives no version")


def modinfo_depends(module_bytes: bytes) -> list[str]:
    """The `depends=` list of a kernel module, read from its ELF64 `.modinfo` section."""
    if module_bytes[:4] != b"\x7fELF" or module_bytes[4] != 2 or module_bytes[5] != 1:
        raise GuestBuildError("module is not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", module_bytes, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", module_bytes, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", module_bytes, base)
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name_index, offset, size = section(index)
        name_end = module_bytes.index(b"\0", names_offset + name_index)
        if module_bytes[names_offset + name_index : name_end] != b".modinfo":
            continue
        for entry in module_bytes[offset : offset + size].split(b"\0"):
            if entry.startswith(b"depends="):
                value = entry[len(b"depends=") :].decode()
                return [name for name in value.split(",") if name]
        return []
    return []


def _module_name(member_name: str) -> str:
    return os.path.basename(member_name).removesuffix(".ko").replace("-", "_")


def _extract_from_deb(deb: Path, want: set[str], out: Path, modules: dict[str, bytes]) -> None:
    """Stream the .deb's file tree once, keeping vmlinuz and the modules named in `want`."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if member.name.startswith("./boot/vmlinuz-"):
                    data = tar.extractfile(member)
                    assert data is not None
                    (out / "vmlinuz").write_bytes(data.read())
                elif base.endswith(".ko") and _module_name(base) in want:
                    data = tar.extractfile(member)
                    assert data is not None
                    modules[_module_name(base)] = data.read()
        if proc.wait() != 0:
            raise GuestBuildError(f"dpkg-deb --fsys-tarfile {deb} failed")


def _ensure_kernel(root: Path, package: str, version: str) -> Path:
    """The cache folder holding vmlinuz, modules/*.ko and modules/load-order for this kernel."""
    kernel_dir = root / f"{package}_{version}"
    if (kernel_dir / "complete").exists():
        return kernel_dir
    shutil.rmtree(kernel_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch_name:
        scratch = Path(scratch_name)
        os.chmod(scratch, 0o755)
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=scratch)
        debs = sorted(scratch.glob("*.deb"))
        if not debs:
            raise GuestBuildError(f"apt-get download {package} produced no .deb")
        build = scratch / "kernel"
        build.mkdir()
        modules: dict[str, bytes] = {}
        want = set(WANTED_MODULES)
        for _round in range(5):  # dependencies of dependencies: bounded
            _extract_from_deb(debs[0], want, build, modules)
            missing_names = want - modules.keys()
            if missing_names:
                raise GuestBuildError(f"modules not in {package}: {sorted(missing_names)}")
            needed = {dep for data in modules.values() for dep in modinfo_depends(data)}
            if needed <= modules.keys():
                break
            want |= needed
        else:
            raise GuestBuildError("module dependencies did not converge")
        if not (build / "vmlinuz").exists():
            raise GuestBuildError(f"no vmlinuz in {package}")
        order: list[str] = []

        def visit(name: str, depth: int = 0) -> None:
            if name in order:
                return
            if depth > 20:
                raise GuestBuildError("module dependency cycle")
            for dep in modinfo_depends(modules[name]):
                visit(dep, depth + 1)
            order.append(name)

        for name in sorted(modules):
            visit(name)
        (build / "modules").mkdir()
        for name, data in modules.items():
            (build / "modules" / f"{name}.ko").write_bytes(data)
        (build / "modules" / "load-order").write_text("".join(f"{n}\n" for n in order))
        (build / "complete").write_text(f"{package} {version}\n")
        build.rename(kernel_dir)
    return kernel_dir


def _has_pvh_entry(elf: bytes) -> bool:
    """True when an ELF64 kernel carries the Xen PVH entry note QEMU needs to boot it directly."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        position, end = offset, offset + filesz
        while position + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, position)
            name = elf[position + 12 : position + 12 + namesz]
            if name == b"Xen\0" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            position += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _ensure_uncompressed_kernel(kernel_dir: Path) -> Path:
    """vmlinux (booted by QEMU through its PVH entry) when it can be had, else vmlinuz.

    Under TCG, decompressing the bzImage costs about half of the guest's boot time; QEMU boots
    an uncompressed ELF kernel with a PVH note directly.  xz and gzip payloads are handled."""
    vmlinux = kernel_dir / "vmlinux"
    no_pvh = kernel_dir / "no-pvh"
    if vmlinux.exists():
        return vmlinux
    if no_pvh.exists():
        return kernel_dir / "vmlinuz"
    bzimage = (kernel_dir / "vmlinuz").read_bytes()
    elf = b""
    for magic, decompress in (
        (b"\xfd7zXZ\x00", lambda data: lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)),
        (b"\x1f\x8b\x08", lambda data: zlib.decompressobj(31).decompress(data)),
    ):
        start = bzimage.find(magic)
        if start < 0:
            continue
        try:
            elf = decompress(bzimage[start:])
        except (lzma.LZMAError, zlib.error):
            continue
        break
    if not _has_pvh_entry(elf):
        no_pvh.write_text("vmlinuz holds no ELF kernel with a PVH entry; booting the bzImage\n")
        return kernel_dir / "vmlinuz"
    temp = kernel_dir / f".vmlinux.{os.getpid()}"
    temp.write_bytes(elf)
    temp.rename(vmlinux)
    return vmlinux


# ---- workload and initramfs ---------------------------------------------------------------


def _ensure_workload(root: Path) -> Path:
    source = GUEST_DIR / "workload.c"
    gcc_version = _run(["gcc", "-dumpfullversion"]).strip()
    key = hashlib.sha256(source.read_bytes() + gcc_version.encode()).hexdigest()[:16]
    binary = root / f"workload-{key}"
    if binary.exists():
        return binary
    temp = root / f".workload-{key}.{os.getpid()}"
    _run(["gcc", "-O2", "-static", "-Wall", "-o", str(temp), str(source)])
    temp.rename(binary)
    return binary


class CpioNewcWriter:
    """Writes a cpio archive in the "newc" format the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inode = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0
        )
        self._inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, 0o100755 if executable else 0o100644, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def _ensure_initramfs(root: Path, kernel_dir: Path, workload: Path, busybox: Path) -> Path:
    init_script = GUEST_DIR / "init.sh"
    key_material = "\n".join(
        [
            BUILDER_VERSION,
            kernel_dir.name,
            _sha256_file(workload),
            _sha256_file(busybox),
            _sha256_file(init_script),
        ]
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    initramfs = root / f"initramfs-{key}.cpio.gz"
    if initramfs.exists():
        return initramfs
    cpio = CpioNewcWriter()
    for directory in ("bin", "dev", "proc", "sys", "lib", "lib/modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("init", init_script.read_bytes(), executable=True)
    cpio.file("bin/busybox", busybox.read_bytes(), executable=True)
    cpio.file("bin/workload", workload.read_bytes(), executable=True)
    for module in sorted((kernel_dir / "modules").iterdir()):
        cpio.file(f"lib/modules/{module.name}", module.read_bytes())
    temp = root / f".initramfs-{key}.{os.getpid()}"
    temp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    temp.rename(initramfs)
    return initramfs


def _find_busybox() -> Path:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists():
            if b"ld-linux" in candidate.read_bytes()[:65536]:
                raise GuestBuildError(f"{candidate} is dynamically linked: install busybox-static")
            return candidate
    raise GuestBuildError("busybox is missing: install busybox-static")


def _newest_cached_kernel(root: Path) -> Path | None:
    complete = sorted(root.glob("linux-image-*/complete"), key=lambda p: p.stat().st_mtime)
    return complete[-1].parent if complete else None


def ensure_guest_boot_files(root: Path | None = None) -> GuestBootFiles:
    """Return the cached guest, building whatever part is missing or out of date."""
    root = cache_root() if root is None else root
    with _locked(root):
        try:
            try:
                package, version = resolve_kernel_package()
                kernel_dir = _ensure_kernel(root, package, version)
            except GuestBuildError:
                if os.geteuid() != 0:
                    raise
                # Stale apt lists name a version the mirror no longer has: refresh, retry once.
                _run(["apt-get", "update", "-qq"])
                package, version = resolve_kernel_package()
                kernel_dir = _ensure_kernel(root, package, version)
        except GuestBuildError:
            # Offline, or apt lists gone: a kernel cached earlier still serves.
            cached = _newest_cached_kernel(root)
            if cached is None:
                raise
            kernel_dir = cached
            package, version = cached.name.split("_", 1)
        workload = _ensure_workload(root)
        initramfs = _ensure_initramfs(root, kernel_dir, workload, _find_busybox())
        kernel = _ensure_uncompressed_kernel(kernel_dir)
    return GuestBootFiles(
        kernel=kernel,
        initramfs=initramfs,
        workload_tool=workload,
        kernel_package=package,
        kernel_version=version,
    )


if __name__ == "__main__":
    files = ensure_guest_boot_files()
    print(f"kernel     {files.kernel} ({files.kernel_package} {files.kernel_version})")
    print(f"initramfs  {files.initramfs}")
    print(f"workload   {files.workload_tool}")
