"""NBD over TLS (issue 7): `postcopy serve --tls=...` against libnbd (nbdinfo, nbdcopy) and
qemu-img, our client against nbdkit --tls=require, refusals (plaintext under require, client
certificates from another CA or none when peers are verified), and the core's STARTTLS rules.

The session's throwaway PKI is made with trustme: one CA that signs the server's certificate
(localhost, 127.0.0.1) and Host B's client certificate, and a rogue CA that signs a client
certificate the server must refuse.  The PEM files are laid out in directories the way each peer
wants them: nbdkit `--tls-certificates DIR` reads ca-cert.pem, server-cert.pem, server-key.pem;
qemu `tls-creds-x509,dir=DIR,endpoint=client` and libnbd `tls-certificates=DIR` read ca-cert.pem
and (when present) client-cert.pem, client-key.pem.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypedDict

import nbd
import pytest
import trio
import trustme

import nbdsrv
from nbdsrv import constants as k
from nbdsrv import server_core as core
from nbdsrv import wire
from nbdsrv.backend import FileBackend
from nbdsrv.server import Export, Server, serve_nbd
from nbdsrv.tls import server_ssl_context
from tests.peers import (
    RunningServe,
    files_identical,
    recv_exact,
    running_nbdkit,
    running_receive_command,
    running_serve,
    serve_command,
    sparse_test_image,
)

TOOL_TIMEOUT = 60
IMAGE_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class PKI:
    server_dir: Path  # ca-cert.pem, server-cert.pem, server-key.pem (nbdkit's layout)
    client_dir: Path  # ca-cert.pem, client-cert.pem, client-key.pem (Host B, trusted)
    rogue_client_dir: Path  # a client certificate signed by another CA (ca-cert.pem: both CAs)
    no_cert_dir: Path  # ca-cert.pem only: trusts the server, has no certificate of its own
    untrusting_dir: Path  # the rogue CA only: does not trust our server

    def server_args(self, mode: str = "require", *, verify_peer: bool = True) -> list[str]:
        args = [
            f"--tls={mode}",
            "--tls-cert", str(self.server_dir / "server-cert.pem"),
            "--tls-key", str(self.server_dir / "server-key.pem"),
            "--tls-ca", str(self.server_dir / "ca-cert.pem"),
        ]
        return [*args, "--tls-verify-peer"] if verify_peer else args


def _write_client_dir(
    path: Path, cas: list[trustme.CA], client: trustme.LeafCert | None
) -> Path:
    path.mkdir()
    (path / "ca-cert.pem").write_bytes(b"".join(ca.cert_pem.bytes() for ca in cas))
    if client is not None:
        client.cert_chain_pems[0].write_to_path(str(path / "client-cert.pem"))
        client.private_key_pem.write_to_path(str(path / "client-key.pem"))
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    base = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server_dir = base / "server"
    server_dir.mkdir()
    ca.cert_pem.write_to_path(str(server_dir / "ca-cert.pem"))
    server.cert_chain_pems[0].write_to_path(str(server_dir / "server-cert.pem"))
    server.private_key_pem.write_to_path(str(server_dir / "server-key.pem"))
    for pem in server_dir.iterdir():
        pem.chmod(0o600)
    return PKI(
        server_dir=server_dir,
        client_dir=_write_client_dir(base / "client", [ca], ca.issue_cert("host-b.example")),
        # trusts both CAs (qemu checks its own certificate against them before connecting)
        rogue_client_dir=_write_client_dir(
            base / "rogue", [ca, rogue_ca], rogue_ca.issue_cert("host-b.example")
        ),
        no_cert_dir=_write_client_dir(base / "nocert", [ca], None),
        untrusting_dir=_write_client_dir(base / "untrusting", [rogue_ca], None),
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    sparse_test_image(path, IMAGE_SIZE, seed=7, min_run=64 * 1024, max_run=1024 * 1024)
    return path


def tls_uri(socket_path: str | None, cert_dir: Path, export: str = "") -> str:
    return f"nbds+unix:///{export}?socket={socket_path}&tls-certificates={cert_dir}"


def qemu_tls_args(socket_path: str | None, cert_dir: Path) -> list[str]:
    """qemu-img arguments opening our Unix socket export "" over TLS with the PEM files in
    `cert_dir` (qemu checks the server's certificate against the host name given here)."""
    return [
        "--object", f"tls-creds-x509,id=tls0,dir={cert_dir},endpoint=client",
        "--image-opts",
        f"driver=nbd,server.type=unix,server.path={socket_path},export=,tls-creds=tls0,"
        "tls-hostname=localhost",
    ]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def served_requests(log: str) -> int:
    """The request count from `postcopy serve`'s closing summary line."""
    line = next(line for line in log.splitlines() if "served " in line and " requests" in line)
    return int(line.split("connections, ")[1].split(" requests")[0])


# -- the sans-IO core's STARTTLS rules ----------------------------------------------------------

CLIENT_FLAGS = int(k.ClientFlag.FIXED_NEWSTYLE | k.ClientFlag.NO_ZEROES)
EXPORTS = {"": core.ExportSpec("", size=1 << 20)}


def core_events(conn: core.ServerConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    events: list[object] = []
    for _ in range(100):
        event = conn.next_event()
        if event is core.NEED_DATA:
            break
        events.append(event)
        if isinstance(event, core.TLSRequested | core.ExportOpened | core.HandshakeEnded):
            break
    return events


def reply_types(data: bytes) -> list[int]:
    types = []
    while data:
        header = wire.parse_option_reply_header(data[: wire.OPTION_REPLY_HEADER_SIZE])
        types.append(header.reply_type)
        data = data[wire.OPTION_REPLY_HEADER_SIZE + header.length :]
    return types


def go_option(name: str = "") -> bytes:
    return wire.build_option(k.Option.GO, wire.build_info_request(wire.InfoRequest(name)))


@pytest.mark.parametrize("mode", [core.TLSMode.OPTIONAL, core.TLSMode.REQUIRED])
def test_options_negotiated_before_starttls_are_forgotten(mode: core.TLSMode) -> None:
    conn = core.ServerConnection(EXPORTS, tls=mode)
    conn.data_to_send()
    meta = wire.build_meta_context_request(wire.MetaContextRequest("", (k.BASE_ALLOCATION,)))
    plaintext = (
        wire.build_client_flags(CLIENT_FLAGS)
        + wire.build_option(k.Option.STRUCTURED_REPLY)
        + wire.build_option(k.Option.SET_META_CONTEXT, meta)
    )
    core_events(conn, plaintext)
    core_events(conn, wire.build_option(k.Option.STARTTLS))
    conn.data_to_send()
    conn.tls_established()
    assert conn.tls_active
    events = core_events(conn, go_option())
    opened = events[-1]
    assert isinstance(opened, core.ExportOpened)
    assert not opened.structured_replies and not opened.block_status


def test_second_starttls_is_err_invalid_and_haggling_goes_on() -> None:
    conn = core.ServerConnection(EXPORTS, tls=core.TLSMode.REQUIRED)
    conn.data_to_send()
    core_events(conn, wire.build_client_flags(CLIENT_FLAGS) + wire.build_option(k.Option.STARTTLS))
    assert reply_types(conn.data_to_send()) == [k.OptionReply.ACK]
    conn.tls_established()
    core_events(conn, wire.build_option(k.Option.STARTTLS))
    assert reply_types(conn.data_to_send()) == [k.OptionReply.ERR_INVALID]
    assert isinstance(core_events(conn, go_option())[-1], core.ExportOpened)


def test_required_tls_closes_on_export_name_and_answers_abort() -> None:
    conn = core.ServerConnection(EXPORTS, tls=core.TLSMode.REQUIRED)
    conn.data_to_send()
    events = core_events(
        conn, wire.build_client_flags(CLIENT_FLAGS) + wire.build_option(k.Option.EXPORT_NAME)
    )
    ended = events[-1]
    assert isinstance(ended, core.HandshakeEnded) and ended.refused
    assert conn.data_to_send() == b""  # no export size, no flags: nothing about the disk
    aborting = core.ServerConnection(EXPORTS, tls=core.TLSMode.REQUIRED)
    aborting.data_to_send()
    events = core_events(
        aborting, wire.build_client_flags(CLIENT_FLAGS) + wire.build_option(k.Option.ABORT)
    )
    assert isinstance(events[-1], core.HandshakeEnded)
    assert reply_types(aborting.data_to_send()) == [k.OptionReply.ACK]


def test_optional_tls_serves_plaintext_options() -> None:
    conn = core.ServerConnection(EXPORTS, tls=core.TLSMode.OPTIONAL)
    conn.data_to_send()
    events = core_events(conn, wire.build_client_flags(CLIENT_FLAGS) + go_option())
    assert isinstance(events[-1], core.ExportOpened)
    assert not conn.tls_active


# -- postcopy serve against real TLS clients ----------------------------------------------------


def plaintext_probe(socket_path: str) -> tuple[list[int], bytes]:
    """Speak plaintext NBD to a server: LIST, STRUCTURED_REPLY, INFO and GO, then EXPORT_NAME.
    Returns the option reply types and every byte received after EXPORT_NAME (until EOF)."""
    replies = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        wire.parse_server_greeting(recv_exact(sock, wire.SERVER_GREETING_SIZE))
        sock.sendall(wire.build_client_flags(CLIENT_FLAGS))
        info = wire.build_info_request(wire.InfoRequest(""))
        options = [
            (k.Option.LIST, b""),
            (k.Option.STRUCTURED_REPLY, b""),
            (k.Option.INFO, info),
            (k.Option.GO, info),
        ]
        for option, data in options:
            sock.sendall(wire.build_option(option, data))
            header = wire.parse_option_reply_header(
                recv_exact(sock, wire.OPTION_REPLY_HEADER_SIZE)
            )
            assert header.option == option
            recv_exact(sock, header.length)
            replies.append(header.reply_type)
        sock.sendall(wire.build_option(k.Option.EXPORT_NAME, b""))
        after = b""
        for _ in range(100):
            chunk = sock.recv(65536)
            if not chunk:
                break
            after += chunk
    return replies, after


def test_nbdinfo_and_nbdcopy_read_our_tls_server_with_a_client_certificate(
    pki: PKI, image: Path, tmp_path: Path
) -> None:
    with running_serve(image, extra_args=pki.server_args(), verbose=True) as serve:
        assert serve.uri.startswith("nbds+unix://")
        info = run_tool("nbdinfo", tls_uri(serve.socket_path, pki.client_dir))
        assert info.returncode == 0, info.stderr
        assert "with TLS" in info.stdout
        assert f"export-size: {IMAGE_SIZE}" in info.stdout
        copy = tmp_path / "copy.img"
        result = run_tool("nbdcopy", tls_uri(serve.socket_path, pki.client_dir), str(copy))
        assert result.returncode == 0, result.stderr
        assert files_identical(image, copy)
        handle = nbd.NBD()
        handle.set_tls(nbd.TLS_REQUIRE)
        handle.set_tls_certificates(str(pki.client_dir))
        handle.connect_uri(f"nbds+unix:///?socket={serve.socket_path}")
        assert handle.get_tls_negotiated()
        assert handle.is_read_only()
        data = image.read_bytes()
        spans = [(0, 4096), (65536 * 3 + 512, 300_032), (IMAGE_SIZE - (2 << 20), 2 << 20)]
        for offset, length in spans:
            assert handle.pread(length, offset) == data[offset : offset + length]
        handle.shutdown()
        assert "TLS established" in serve.log()


def test_qemu_img_reads_our_tls_server_with_tls_creds_x509(
    pki: PKI, image: Path, tmp_path: Path
) -> None:
    with running_serve(image, extra_args=pki.server_args()) as serve:
        tls_args = qemu_tls_args(serve.socket_path, pki.client_dir)
        info = run_tool("qemu-img", "info", *tls_args)
        assert info.returncode == 0, info.stderr
        assert f"({IMAGE_SIZE} bytes)" in info.stdout
        copy = tmp_path / "copy.img"
        convert = run_tool("qemu-img", "convert", *tls_args, "-O", "raw", str(copy))
        assert convert.returncode == 0, convert.stderr
        assert files_identical(image, copy)


def test_plaintext_clients_are_refused_under_require_and_get_no_data(
    pki: PKI, image: Path
) -> None:
    with running_serve(image, extra_args=pki.server_args(), verbose=True) as serve:
        assert serve.socket_path is not None
        replies, after_export_name = plaintext_probe(serve.socket_path)
        assert replies == [k.OptionReply.ERR_TLS_REQD] * 4
        assert after_export_name == b""  # closed: no size, no flags, no data
        plain_uri = f"nbd+unix:///?socket={serve.socket_path}"
        info = run_tool("nbdinfo", plain_uri)
        assert info.returncode != 0
        assert "export-size" not in info.stdout
        handle = nbd.NBD()
        with pytest.raises(nbd.Error):
            handle.connect_uri(plain_uri)
        serve.process.terminate()
        assert serve.process.wait(10) == 0
        log = serve.log()
    assert "ERR_TLS_REQD" in log
    assert served_requests(log) == 0


def test_optional_tls_serves_plaintext_and_tls_clients(pki: PKI, image: Path) -> None:
    with running_serve(image, extra_args=pki.server_args("on", verify_peer=False)) as serve:
        assert serve.uri.startswith("nbd+unix://")  # TLS is offered, not required
        plain = run_tool("nbdinfo", serve.uri)
        assert plain.returncode == 0, plain.stderr
        assert "without TLS" in plain.stdout
        secure = run_tool("nbdinfo", tls_uri(serve.socket_path, pki.no_cert_dir))
        assert secure.returncode == 0, secure.stderr
        assert "with TLS" in secure.stdout
        assert "without --tls-verify-peer" in serve.log()  # the operator is warned
    with running_serve(image, extra_args=pki.server_args("on", verify_peer=True)) as serve:
        plain = run_tool("nbdinfo", serve.uri)
        assert plain.returncode == 0, plain.stderr  # optional TLS: plaintext still reads...
        assert "use --tls=require" in serve.log()  # ...so the operator is told


@pytest.mark.parametrize("client", ["rogue_client_dir", "no_cert_dir"])
def test_client_without_a_certificate_from_our_ca_fails_the_tls_handshake(
    pki: PKI, image: Path, client: str
) -> None:
    with running_serve(image, extra_args=pki.server_args()) as serve:
        info = run_tool("nbdinfo", tls_uri(serve.socket_path, getattr(pki, client)))
        assert info.returncode != 0
        assert "export-size" not in info.stdout
        qemu = run_tool("qemu-img", "info", *qemu_tls_args(serve.socket_path, getattr(pki, client)))
        assert qemu.returncode != 0, qemu.stdout
        # the trusted client still gets in: the refusals are about the certificates
        ok = run_tool("nbdinfo", tls_uri(serve.socket_path, pki.client_dir))
        assert ok.returncode == 0, ok.stderr
        assert serve.log().count("TLS handshake failed") == 2  # nbdinfo's and qemu's
        assert "without --tls-verify-peer" not in serve.log()


def test_qemu_refuses_our_server_when_it_does_not_trust_the_ca(pki: PKI, image: Path) -> None:
    # (libnbd 1.14 does not check the server's certificate on a Unix socket: it has no host
    # name to check, so qemu, told the host name, is the peer that shows the server's side.)
    with running_serve(image, extra_args=pki.server_args(verify_peer=False)) as serve:
        qemu = run_tool("qemu-img", "info", *qemu_tls_args(serve.socket_path, pki.untrusting_dir))
        assert qemu.returncode != 0
        assert "virtual size" not in qemu.stdout
        assert "certificate" in qemu.stderr.lower()
        trusting = run_tool("qemu-img", "info", *qemu_tls_args(serve.socket_path, pki.no_cert_dir))
        assert trusting.returncode == 0, trusting.stderr


def serve_fails(*args: str) -> str:
    result = subprocess.run(
        [*serve_command(), "serve", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_tls_option_mistakes_are_one_line_errors(pki: PKI, image: Path, tmp_path: Path) -> None:
    sock = ["--socket", str(tmp_path / "s.sock")]
    cert = str(pki.server_dir / "server-cert.pem")
    key = str(pki.server_dir / "server-key.pem")
    ca = str(pki.server_dir / "ca-cert.pem")
    assert "--tls-cert" in serve_fails(*sock, "--tls=require", str(image))
    assert "--tls-ca" in serve_fails(
        *sock, "--tls=on", "--tls-cert", cert, "--tls-key", key, "--tls-verify-peer", str(image)
    )
    missing = str(tmp_path / "missing.pem")
    assert "missing.pem" in serve_fails(
        *sock, "--tls=require", "--tls-cert", missing, "--tls-key", key, str(image)
    )
    # a key that is not the certificate's: the CA certificate as the server certificate
    assert "key" in serve_fails(
        *sock, "--tls=require", "--tls-cert", ca, "--tls-key", key, str(image)
    )
    assert "--tls=off" in serve_fails(*sock, "--tls-cert", cert, "--tls-key", key, str(image))
    assert not os.path.exists(tmp_path / "s.sock")


# -- our client over TLS --------------------------------------------------------------------------


class ClientFiles(TypedDict, total=False):
    tls_ca: Path
    tls_cert: Path
    tls_key: Path


def client_files(directory: Path) -> ClientFiles:
    """open_client() TLS arguments for the PEM files in a client directory."""
    files = ClientFiles(tls_ca=directory / "ca-cert.pem")
    if (directory / "client-cert.pem").exists():
        files["tls_cert"] = directory / "client-cert.pem"
        files["tls_key"] = directory / "client-key.pem"
    return files


def nbdkit_tls_args(pki: PKI, mode: str = "require", *, verify_peer: bool = True) -> list[str]:
    args = [f"--tls={mode}", f"--tls-certificates={pki.server_dir}"]
    return [*args, "--tls-verify-peer"] if verify_peer else args


async def read_all(client: nbdsrv.Client, size: int) -> bytes:
    out = bytearray(size)
    step = 1 << 20
    for offset in range(0, size, step):
        await client.pread_into(memoryview(out)[offset : offset + step], offset)
    return bytes(out)


async def test_our_client_reads_nbdkit_tls_require_with_a_client_certificate(
    pki: PKI, image: Path
) -> None:
    with running_nbdkit(["file", str(image)], nbdkit_args=nbdkit_tls_args(pki)) as uri:
        tls_uri_text = uri.replace("nbd+unix://", "nbds+unix://")
        with trio.fail_after(30):
            async with nbdsrv.open_client(
                tls_uri_text, tls_hostname="localhost", connections=2,
                **client_files(pki.client_dir),
            ) as client:
                assert client.size == IMAGE_SIZE
                assert await read_all(client, IMAGE_SIZE) == image.read_bytes()
                assert client.statistics().connections == 2


async def test_our_client_reads_our_tls_server_over_tcp_checking_the_host_name(
    pki: PKI, image: Path
) -> None:
    with running_serve(image, listen="127.0.0.1:0", extra_args=pki.server_args()) as serve:
        assert serve.uri.startswith("nbds://127.0.0.1:")
        with trio.fail_after(30):
            async with nbdsrv.open_client(
                serve.uri, **client_files(pki.client_dir)
            ) as client:
                data = image.read_bytes()
                assert await read_all(client, IMAGE_SIZE) == data
                extents = [e async for e in client.iter_extents(0, IMAGE_SIZE)]
                assert sum(e.length for e in extents) == IMAGE_SIZE
                holes = [e for e in extents if e.flags & k.BlockStatusFlag.ZERO]
                assert holes and all(
                    data[e.offset : e.end] == bytes(e.length) for e in holes
                )


async def test_plaintext_client_gets_err_tls_reqd_and_no_export(pki: PKI, image: Path) -> None:
    with running_nbdkit(["file", str(image)], nbdkit_args=nbdkit_tls_args(pki)) as uri:
        with trio.fail_after(30), pytest.raises(nbdsrv.NegotiationError) as refused:
            async with nbdsrv.open_client(uri):
                pytest.fail("a plaintext client reached transmission")
        assert refused.value.reply_type == k.OptionReply.ERR_TLS_REQD
    with running_serve(image, extra_args=pki.server_args()) as serve:
        plain = f"nbd+unix:///?socket={serve.socket_path}"
        with trio.fail_after(30), pytest.raises(nbdsrv.NegotiationError) as refused:
            async with nbdsrv.open_client(plain, tls="off"):
                pytest.fail("a plaintext client reached transmission")
        assert refused.value.reply_type == k.OptionReply.ERR_TLS_REQD


@pytest.mark.parametrize("peer", ["postcopy serve", "nbdkit"])
async def test_client_requiring_tls_never_falls_back_to_plaintext(
    pki: PKI, image: Path, peer: str
) -> None:
    with contextlib.ExitStack() as stack:
        if peer == "nbdkit":
            nbdkit = running_nbdkit(["file", str(image)], nbdkit_args=["--tls=off"])
            uri = stack.enter_context(nbdkit)
        else:
            uri = stack.enter_context(running_serve(image)).uri
        secure = uri.replace("nbd+unix://", "nbds+unix://")
        with trio.fail_after(30), pytest.raises(nbdsrv.NegotiationError) as refused:
            async with nbdsrv.open_client(secure, **client_files(pki.client_dir)):
                pytest.fail("went on in plaintext")
        assert refused.value.reply_type in (k.OptionReply.ERR_POLICY, k.OptionReply.ERR_UNSUP)
        # tls="on" accepts the refusal and reads in plaintext (the operator's explicit choice)
        with trio.fail_after(30):
            async with nbdsrv.open_client(uri, tls="on", **client_files(pki.client_dir)) as client:
                assert await client.pread(0, 4096) == image.read_bytes()[:4096]


async def test_client_refuses_a_server_certificate_it_does_not_trust(
    pki: PKI, image: Path
) -> None:
    with running_serve(image, extra_args=pki.server_args(verify_peer=False)) as serve:
        with trio.fail_after(30), pytest.raises(nbdsrv.NegotiationError, match="TLS handshake"):
            async with nbdsrv.open_client(
                serve.uri, tls_hostname="localhost", **client_files(pki.untrusting_dir)
            ):
                pytest.fail("trusted a server signed by an unknown CA")
        # right CA, wrong name: the host name is checked
        with trio.fail_after(30), pytest.raises(nbdsrv.NegotiationError, match="TLS handshake"):
            async with nbdsrv.open_client(
                serve.uri, tls_hostname="host-a.elsewhere", **client_files(pki.no_cert_dir)
            ):
                pytest.fail("accepted a certificate for another host")


@pytest.mark.parametrize("client", ["rogue_client_dir", "no_cert_dir"])
async def test_nbdkit_verifying_peers_refuses_our_client_without_a_good_certificate(
    pki: PKI, image: Path, client: str
) -> None:
    with running_nbdkit(["file", str(image)], nbdkit_args=nbdkit_tls_args(pki)) as uri:
        secure = uri.replace("nbd+unix://", "nbds+unix://")
        with trio.fail_after(30), pytest.raises(nbdsrv.NegotiationError):
            async with nbdsrv.open_client(
                secure, tls_hostname="localhost", **client_files(getattr(pki, client))
            ):
                pytest.fail("nbdkit served a client without a certificate from its CA")


# -- the server shell in-process: hostile TLS peers, traffic both ways ----------------------------


@contextlib.asynccontextmanager
async def serving_in_process(
    pki: PKI,
    image: Path,
    socket_path: Path,
    *,
    writable: bool = False,
    mode: core.TLSMode = core.TLSMode.REQUIRED,
) -> AsyncIterator[Server]:
    context = server_ssl_context(
        pki.server_dir / "server-cert.pem", pki.server_dir / "server-key.pem",
        ca_file=pki.server_dir / "ca-cert.pem", verify_peer=True,
    )
    backend = FileBackend(image, writable=writable)
    server = Server(
        [Export("", backend)], handshake_timeout=1.0, tls=mode, ssl_context=context,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve_nbd, [], socket_path=str(socket_path), server=server)
            )
            yield server
            nursery.cancel_scope.cancel()
    finally:
        backend.close()


async def starttls_acknowledged(socket_path: Path) -> trio.SocketStream:
    """A raw connection that has sent STARTTLS and read the server's ACK."""
    stream = await trio.open_unix_socket(str(socket_path))
    greeting = b""
    while len(greeting) < wire.SERVER_GREETING_SIZE:
        greeting += await stream.receive_some(wire.SERVER_GREETING_SIZE - len(greeting))
    await stream.send_all(
        wire.build_client_flags(CLIENT_FLAGS) + wire.build_option(k.Option.STARTTLS)
    )
    reply = b""
    while len(reply) < wire.OPTION_REPLY_HEADER_SIZE:
        reply += await stream.receive_some(wire.OPTION_REPLY_HEADER_SIZE - len(reply))
    assert wire.parse_option_reply_header(reply).reply_type == k.OptionReply.ACK
    return stream


async def receive_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_stalled_or_garbage_tls_handshakes_are_closed_and_the_server_goes_on(
    pki: PKI, image: Path, tmp_path: Path
) -> None:
    socket_path = tmp_path / "s.sock"
    async with serving_in_process(pki, image, socket_path) as server:
        with trio.fail_after(10):
            stalled = await starttls_acknowledged(socket_path)
            started = trio.current_time()
            assert await receive_until_closed(stalled) == b""  # closed, nothing sent
            assert 0.5 < trio.current_time() - started < 5  # by the 1 s handshake timeout
            await stalled.aclose()
            garbage = await starttls_acknowledged(socket_path)
            await garbage.send_all(b"GET / HTTP/1.0\r\n\r\n" + bytes(200))
            received = await receive_until_closed(garbage)
            assert b"NBD" not in received and len(received) < 64  # at most a TLS alert
            await garbage.aclose()
            assert server.statistics().connections_failed == 2
            async with nbdsrv.open_client(
                f"nbds+unix:///?socket={socket_path}", tls_hostname="localhost",
                **client_files(pki.client_dir),
            ) as client:
                assert await client.pread(0, 65536) == image.read_bytes()[:65536]


async def test_concurrent_reads_and_writes_over_tls_keep_their_bytes(
    pki: PKI, image: Path, tmp_path: Path
) -> None:
    socket_path = tmp_path / "s.sock"
    expected = bytearray(image.read_bytes())
    rng = random.Random(3)
    slot = 64 * 1024  # disjoint 64 KiB slots, so concurrent writes have one outcome
    writes = [
        (index * slot, rng.randbytes(rng.choice([4096, 32768, slot])))
        for index in rng.sample(range(IMAGE_SIZE // slot), 24)
    ]
    for offset, data in writes:
        expected[offset : offset + len(data)] = data
    results: dict[int, bytes] = {}
    async with serving_in_process(pki, image, socket_path, writable=True) as server:
        with trio.fail_after(30):
            async with nbdsrv.open_client(
                f"nbds+unix:///?socket={socket_path}", tls_hostname="localhost",
                **client_files(pki.client_dir),
            ) as client:
                async with trio.open_nursery() as nursery:
                    for offset, data in writes:
                        nursery.start_soon(client.pwrite, data, offset)
                await client.flush()

                async def read(offset: int) -> None:
                    results[offset] = await client.pread(offset, 1 << 20)

                async with trio.open_nursery() as nursery:
                    for offset in range(0, IMAGE_SIZE, 1 << 20):
                        nursery.start_soon(read, offset)
        assert server.statistics().requests >= len(writes) + IMAGE_SIZE // (1 << 20)
    assert len(results) == IMAGE_SIZE // (1 << 20)
    for offset, data in results.items():
        assert data == expected[offset : offset + (1 << 20)]
    assert image.read_bytes() == bytes(expected)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        (ssl.TLSVersion.TLSv1_1, False),
        (ssl.TLSVersion.TLSv1_2, True),
        (ssl.TLSVersion.TLSv1_3, True),
    ],
)
async def test_server_accepts_tls_1_2_and_later_only(
    pki: PKI, image: Path, tmp_path: Path, version: ssl.TLSVersion, accepted: bool
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki.client_dir / "ca-cert.pem")
    context.load_cert_chain(pki.client_dir / "client-cert.pem", pki.client_dir / "client-key.pem")
    context.minimum_version = context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer the old version
    socket_path = tmp_path / "s.sock"
    async with serving_in_process(pki, image, socket_path) as server:
        with trio.fail_after(10):
            raw = await starttls_acknowledged(socket_path)
            tls_stream = trio.SSLStream(raw, context, server_hostname="localhost")
            try:
                await tls_stream.do_handshake()
                # TLS 1.3 reports a refused client certificate only on the first read
                await tls_stream.send_all(wire.build_option(k.Option.LIST))
                header = await tls_stream.receive_some(wire.OPTION_REPLY_HEADER_SIZE)
                negotiated = tls_stream.version()
            except trio.BrokenResourceError:
                assert not accepted
                assert server.statistics().connections_failed == 1
            else:
                assert accepted
                assert negotiated == {ssl.TLSVersion.TLSv1_2: "TLSv1.2"}.get(version, "TLSv1.3")
                assert header[:8] == struct.pack(">Q", k.OPTION_REPLY_MAGIC)
            finally:
                await trio.aclose_forcefully(tls_stream)


# -- TLS settings in the URI (libnbd's tls-certificates=DIR), end to end through receive ---------


async def test_uri_tls_certificates_directory_gives_the_client_its_files(
    pki: PKI, image: Path
) -> None:
    with running_nbdkit(["file", str(image)], nbdkit_args=nbdkit_tls_args(pki)) as uri:
        secure = uri.replace("nbd+unix://", "nbds+unix://")
        with trio.fail_after(30):
            async with nbdsrv.open_client(
                f"{secure}&tls-certificates={pki.client_dir}", tls_hostname="localhost"
            ) as client:
                assert await client.pread(IMAGE_SIZE - 4096, 4096) == image.read_bytes()[-4096:]
            # the same directory without a client certificate: nbdkit refuses us
            with pytest.raises(nbdsrv.NegotiationError):
                async with nbdsrv.open_client(f"{secure}&tls-certificates={pki.no_cert_dir}"):
                    pytest.fail("served without a client certificate")


def test_receive_drains_a_tls_source_named_by_an_nbds_uri(
    pki: PKI, tmp_path: Path
) -> None:
    image = tmp_path / "source.img"
    sparse_test_image(image, 32 * 1024 * 1024, seed=9)
    state_dir, dest = tmp_path / "state", tmp_path / "dest.img"
    with running_serve(f"disk={image}", extra_args=pki.server_args()) as serve:
        source = (
            f"nbds+unix:///disk?socket={serve.socket_path}&tls-certificates={pki.client_dir}"
        )
        command = [
            *serve_command(), "receive", "--source", source, "--dest", str(dest),
            "--state-dir", str(state_dir), "--socket", str(tmp_path / "d.sock"),
        ]
        log_path = tmp_path / "receive.log"
        with running_receive_command(command, log_path) as (process, uri):
            deadline = time.monotonic() + 60
            state = ""
            while state != "complete":
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"not complete: {state}"
                with contextlib.suppress(FileNotFoundError, ValueError):
                    state = json.loads((state_dir / "status.json").read_text())["state"]
                time.sleep(0.05)
            handle = nbd.NBD()
            handle.connect_uri(uri)
            assert handle.pread(65536, 0) == image.read_bytes()[:65536]
            handle.shutdown()
        assert served_requests_so_far(serve) > 0
    assert files_identical(image, dest)


def served_requests_so_far(serve: RunningServe) -> int:
    serve.process.terminate()
    assert serve.process.wait(10) == 0
    return served_requests(serve.log())


async def test_plaintext_reads_keep_sendfile_and_tls_reads_go_through_the_ssl_stream(
    pki: PKI, image: Path, tmp_path: Path
) -> None:
    socket_path = tmp_path / "s.sock"
    data = image.read_bytes()  # and the page cache now holds the image: sendfile applies
    async with serving_in_process(pki, image, socket_path, mode=core.TLSMode.OPTIONAL) as server:
        stats = server.statistics()
        with trio.fail_after(30):
            async with nbdsrv.open_client(f"nbd+unix:///?socket={socket_path}") as plain:
                assert await read_all(plain, IMAGE_SIZE) == data
            plaintext_sendfile = stats.sendfile_bytes
            assert plaintext_sendfile > 0  # the fast path still serves plaintext clients
            assert stats.tls_connections == 0
            async with nbdsrv.open_client(
                f"nbds+unix:///?socket={socket_path}", tls_hostname="localhost",
                **client_files(pki.client_dir),
            ) as secure:
                assert await read_all(secure, IMAGE_SIZE) == data
            assert stats.tls_connections == 1
            assert stats.sendfile_bytes == plaintext_sendfile  # nothing bypassed TLS


async def test_structured_replies_negotiated_in_plaintext_are_forgotten_after_starttls(
    pki: PKI, image: Path, tmp_path: Path
) -> None:
    socket_path = tmp_path / "s.sock"
    context = ssl.create_default_context(cafile=pki.client_dir / "ca-cert.pem")
    context.load_cert_chain(pki.client_dir / "client-cert.pem", pki.client_dir / "client-key.pem")
    async with serving_in_process(pki, image, socket_path, mode=core.TLSMode.OPTIONAL):
        with trio.fail_after(10):
            raw = await trio.open_unix_socket(str(socket_path))
            received = bytearray()

            async def take(stream: trio.abc.Stream, count: int) -> bytes:
                while len(received) < count:
                    chunk = await stream.receive_some(65536)
                    assert chunk, "server closed"
                    received.extend(chunk)
                out = bytes(received[:count])
                del received[:count]
                return out

            await take(raw, wire.SERVER_GREETING_SIZE)
            await raw.send_all(
                wire.build_client_flags(CLIENT_FLAGS)
                + wire.build_option(k.Option.STRUCTURED_REPLY)
            )
            header = wire.parse_option_reply_header(await take(raw, wire.OPTION_REPLY_HEADER_SIZE))
            assert header.reply_type == k.OptionReply.ACK  # structured replies, in plaintext
            await raw.send_all(wire.build_option(k.Option.STARTTLS))
            header = wire.parse_option_reply_header(await take(raw, wire.OPTION_REPLY_HEADER_SIZE))
            assert header.reply_type == k.OptionReply.ACK and not received
            tls_stream = trio.SSLStream(raw, context, server_hostname="localhost")
            await tls_stream.send_all(go_option())  # no STRUCTURED_REPLY over TLS
            while True:
                header = wire.parse_option_reply_header(
                    await take(tls_stream, wire.OPTION_REPLY_HEADER_SIZE)
                )
                await take(tls_stream, header.length)
                if header.reply_type == k.OptionReply.ACK:
                    break
            request = wire.Request(0, k.Command.READ, 42, 0, 4096)
            await tls_stream.send_all(wire.build_request_header(request))
            reply = wire.parse_simple_reply(await take(tls_stream, wire.SIMPLE_REPLY_SIZE))
            assert (reply.cookie, reply.error) == (42, 0)  # a simple reply: not structured
            assert await take(tls_stream, 4096) == image.read_bytes()[:4096]
            await trio.aclose_forcefully(tls_stream)
