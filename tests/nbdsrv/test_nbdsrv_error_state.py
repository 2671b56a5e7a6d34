"""The cores' central error transition (nbdsrv.state.ProtocolCore): after a call into a core
raises, the core is in ERROR and refuses every later call that drives it, naming the first
failure; calls refused before they changed anything (a request's bad arguments) leave it usable.
Also: the state tables are complete, and TLSMode reads the command line's spellings."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdsrv import constants as k
from nbdsrv import server_core as core
from nbdsrv import wire
from nbdsrv.client_core import (
    NEED_DATA,
    ClientHandshake,
    ClientTransmission,
    NegotiatedExport,
    RequestFinished,
)
from nbdsrv.client_handshake_core import _HANDLERS
from nbdsrv.errors import (
    ConnectionClosedError,
    LocalProtocolError,
    NBDError,
    NegotiationError,
    RemoteProtocolError,
)
from nbdsrv.state import (
    HANDSHAKE_EDGES,
    SERVER_TRANSITIONS,
    HandshakeState,
    ServerState,
    TLSMode,
)

SIZE = 1 << 20
EXPORTS = {"": core.ExportSpec("", size=SIZE, read_only=False)}
CLIENT_FLAGS = int(k.ClientFlag.FIXED_NEWSTYLE | k.ClientFlag.NO_ZEROES)


def transmitting_server() -> core.ServerConnection:
    conn = core.ServerConnection(EXPORTS)
    conn.data_to_send()
    go = wire.build_option(k.Option.GO, wire.build_info_request(wire.InfoRequest("")))
    conn.receive_data(wire.build_client_flags(CLIENT_FLAGS) + go)
    for _ in range(10):
        if isinstance(conn.next_event(), core.ExportOpened):
            conn.data_to_send()
            return conn
    raise AssertionError("no ExportOpened")


def request(command: int, offset: int = 0, length: int = 512, cookie: int = 1) -> bytes:
    return wire.build_request_header(wire.Request(0, command, cookie, offset, length))


def server_calls(conn: core.ServerConnection) -> dict[str, Callable[[], object]]:
    """Every call that drives the server core."""
    return {
        "receive_data": lambda: conn.receive_data(request(k.Command.READ)),
        "receive_eof": conn.receive_eof,
        "next_event": conn.next_event,
        "data_to_send": conn.data_to_send,
        "tls_established": conn.tls_established,
    }


def assert_refuses_everything(
    calls: dict[str, Callable[[], object]], first_failure: BaseException
) -> None:
    for name, call in calls.items():
        with pytest.raises(LocalProtocolError, match=rf"^{name}\(\) after the connection failed"):
            call()
        try:
            call()
        except LocalProtocolError as refusal:  # the cause is the first failure, every time
            assert refusal.__cause__ is first_failure
            assert str(first_failure) in str(refusal)


# -- the server core ----------------------------------------------------------------------------


def test_server_after_a_protocol_error_refuses_every_call() -> None:
    conn = transmitting_server()
    conn.receive_data(b"\x00" * wire.REQUEST_HEADER_SIZE)  # bad request magic
    with pytest.raises(RemoteProtocolError, match="magic") as raised:
        conn.next_event()
    assert conn.state is ServerState.ERROR
    assert conn.failure is raised.value
    assert_refuses_everything(server_calls(conn), raised.value)
    assert conn.state is ServerState.ERROR  # refusals do not move it anywhere


def test_server_after_the_peer_closed_mid_request_refuses_every_call() -> None:
    conn = transmitting_server()
    conn.receive_data(request(k.Command.WRITE, length=512) + b"abc")
    assert conn.next_event() is core.NEED_DATA
    conn.receive_eof()
    with pytest.raises(RemoteProtocolError, match="mid-frame") as raised:
        conn.next_event()
    assert conn.state is ServerState.ERROR
    assert_refuses_everything(server_calls(conn), raised.value)


def test_server_after_a_clean_close_between_requests_refuses_every_call() -> None:
    conn = transmitting_server()
    conn.receive_eof()
    with pytest.raises(ConnectionClosedError) as raised:
        conn.next_event()
    assert conn.state is ServerState.ERROR
    assert_refuses_everything(server_calls(conn), raised.value)


def test_server_driven_out_of_order_fails_the_same_way() -> None:
    conn = transmitting_server()
    with pytest.raises(LocalProtocolError, match="no transition 'tls_established'") as raised:
        conn.tls_established()  # no STARTTLS was acknowledged
    assert conn.state is ServerState.ERROR
    assert_refuses_everything(server_calls(conn), raised.value)


def test_server_refuses_bytes_after_end_of_input() -> None:
    conn = transmitting_server()
    conn.receive_eof()
    with pytest.raises(LocalProtocolError, match="after receive_eof"):
        conn.receive_data(request(k.Command.READ))
    assert conn.state is ServerState.ERROR
    with pytest.raises(LocalProtocolError, match="after the connection failed"):
        conn.next_event()


def test_server_reply_builders_still_answer_after_an_error() -> None:
    """Handlers still finishing when the reader failed may build replies: pure functions of what
    was negotiated, they are not refused."""
    conn = transmitting_server()
    conn.receive_data(request(k.Command.FLUSH, 0, 0, cookie=7) + b"\xff" * 28)
    event = conn.next_event()
    assert isinstance(event, core.CommandReceived)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert wire.parse_simple_reply(conn.ok_reply(event.request)).cookie == 7
    error = wire.parse_simple_reply(conn.error_reply(event.request, k.Errno.EIO))
    assert (error.cookie, error.error) == (7, k.Errno.EIO)


def test_server_next_event_while_tls_is_owed_refuses_only_itself() -> None:
    conn = core.ServerConnection(EXPORTS, tls=TLSMode.REQUIRED)
    conn.data_to_send()
    conn.receive_data(wire.build_client_flags(CLIENT_FLAGS) + wire.build_option(k.Option.STARTTLS))
    assert isinstance(conn.next_event(), core.TLSRequested)
    with pytest.raises(LocalProtocolError, match="tls_established"):
        conn.next_event()
    assert conn.state is ServerState.TLS_HANDSHAKE and conn.failure is None
    conn.tls_established()
    assert conn.state is ServerState.RECV_OPTION


# -- the client handshake -----------------------------------------------------------------------


def handshake_calls(handshake: ClientHandshake) -> dict[str, Callable[[], object]]:
    return {
        "receive_data": lambda: handshake.receive_data(b"\x00" * 20),
        "receive_eof": handshake.receive_eof,
        "data_to_send": handshake.data_to_send,
        "tls_established": handshake.tls_established,
        "result": lambda: handshake.result,
    }


def greeting() -> bytes:
    flags = int(k.HandshakeFlag.FIXED_NEWSTYLE | k.HandshakeFlag.NO_ZEROES)
    return wire.build_server_greeting(flags)


def test_handshake_after_a_refusal_refuses_every_call() -> None:
    handshake = ClientHandshake("nosuch", structured_replies=False)
    handshake.receive_data(greeting())
    refusal = wire.build_option_reply(k.Option.GO, k.OptionReply.ERR_UNKNOWN, b"no such export")
    with pytest.raises(NegotiationError, match="ERR_UNKNOWN") as raised:
        handshake.receive_data(refusal)
    assert handshake.state is HandshakeState.ERROR
    assert handshake.trace[-1] is HandshakeState.GO_RECV_REPLY  # ERROR is no edge of the table
    assert_refuses_everything(handshake_calls(handshake), raised.value)


def test_handshake_after_a_protocol_error_refuses_every_call() -> None:
    handshake = ClientHandshake("", structured_replies=False)
    handshake.receive_data(greeting())
    wrong = wire.build_option_reply(k.Option.LIST, k.OptionReply.ACK)  # a reply we never asked
    with pytest.raises(RemoteProtocolError, match="while waiting for GO") as raised:
        handshake.receive_data(wrong)
    assert handshake.state is HandshakeState.ERROR
    assert_refuses_everything(handshake_calls(handshake), raised.value)


def test_handshake_after_an_early_close_refuses_every_call() -> None:
    handshake = ClientHandshake("")
    handshake.receive_data(greeting())
    with pytest.raises(NegotiationError, match="during the handshake") as raised:
        handshake.receive_eof()
    assert handshake.state is HandshakeState.ERROR
    assert_refuses_everything(handshake_calls(handshake), raised.value)


# -- the client transmission core ---------------------------------------------------------------


def transmission() -> ClientTransmission:
    flags = (
        k.TransmissionFlag.HAS_FLAGS
        | k.TransmissionFlag.SEND_FLUSH
        | k.TransmissionFlag.SEND_FUA
        | k.TransmissionFlag.SEND_TRIM
        | k.TransmissionFlag.SEND_WRITE_ZEROES
        | k.TransmissionFlag.SEND_CACHE
    )
    export = NegotiatedExport("", SIZE, int(flags), structured_replies=True, meta_context_id=1)
    return ClientTransmission(export)


def transmission_calls(client: ClientTransmission) -> dict[str, Callable[[], object]]:
    return {
        "request_read": lambda: client.request_read(0, memoryview(bytearray(512))),
        "request_write": lambda: client.request_write(0, 512),
        "request_flush": client.request_flush,
        "request_trim": lambda: client.request_trim(0, 512),
        "request_write_zeroes": lambda: client.request_write_zeroes(0, 512),
        "request_cache": lambda: client.request_cache(0, 512),
        "request_block_status": lambda: client.request_block_status(0, 512),
        "request_disconnect": client.request_disconnect,
        "receive_data": lambda: client.receive_data(wire.build_simple_reply(1)),
        "receive_eof": client.receive_eof,
        "next_event": client.next_event,
        "payload_received": lambda: client.payload_received(1),
    }


def test_transmission_after_a_protocol_error_refuses_every_call() -> None:
    client = transmission()
    cookie, _ = client.request_read(0, memoryview(bytearray(512)))
    client.receive_data(wire.build_simple_reply(cookie + 99))  # a cookie nobody sent
    with pytest.raises(RemoteProtocolError, match="unknown cookie") as raised:
        client.next_event()
    assert client.state.name == "ERROR" and client.failure is raised.value
    assert_refuses_everything(transmission_calls(client), raised.value)
    client.abandon(cookie)  # cleanup in except clauses never raises
    client.forget(cookie)
    assert client.in_flight == 0


def test_transmission_after_the_server_closed_refuses_every_call() -> None:
    client = transmission()
    client.request_flush()
    with pytest.raises(ConnectionClosedError, match="1 request") as raised:
        client.receive_eof()
    assert_refuses_everything(transmission_calls(client), raised.value)


def test_a_request_with_bad_arguments_leaves_the_connection_usable() -> None:
    client = transmission()
    with pytest.raises(LocalProtocolError, match="outside the export"):
        client.request_read(SIZE - 10, memoryview(bytearray(512)))
    with pytest.raises(LocalProtocolError, match="does not offer base:allocation|not negotiated"):
        ClientTransmission(NegotiatedExport("", SIZE, 1)).request_block_status(0, 512)
    with pytest.raises(LocalProtocolError, match="write of 0 bytes"):
        client.request_write(0, 0)
    assert client.failure is None and client.state.name == "HEADER"
    cookie, header = client.request_flush()
    assert wire.parse_request_header(header).cookie == cookie
    client.receive_data(wire.build_simple_reply(cookie))
    event = client.next_event()
    assert isinstance(event, RequestFinished) and (event.cookie, event.error) == (cookie, None)
    assert client.next_event() is NEED_DATA


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_any_failure_of_the_transmission_core_is_final(stream: bytes) -> None:
    """Whatever the server sends: once a call raises, every later driving call is refused."""
    client = transmission()
    client.request_read(0, memoryview(bytearray(512)))
    client.request_block_status(0, 4096)
    client.receive_data(struct.pack(">I", k.STRUCTURED_REPLY_MAGIC) + stream)
    try:
        for _ in range(100):
            if client.next_event() is NEED_DATA:
                break
        client.receive_eof()
    except NBDError as exc:
        failure = exc
    else:
        return  # a clean stream and a clean close: nothing failed
    assert client.failure is failure
    assert_refuses_everything(transmission_calls(client), failure)


# -- the tables ---------------------------------------------------------------------------------


def test_every_handshake_state_has_a_handler_and_edges_stay_in_the_table() -> None:
    for state, successors in HANDSHAKE_EDGES.items():
        if state in (HandshakeState.READY, HandshakeState.ERROR):
            assert not successors and state not in _HANDLERS
        else:
            assert state in _HANDLERS
        assert HandshakeState.ERROR not in successors  # only _enter_error goes there
    assert set(HANDSHAKE_EDGES) == set(HandshakeState)


def test_every_server_state_is_in_the_table_and_error_has_no_way_out() -> None:
    assert set(SERVER_TRANSITIONS) == set(ServerState)
    assert SERVER_TRANSITIONS[ServerState.ERROR] == {}
    for edges in SERVER_TRANSITIONS.values():
        assert ServerState.ERROR not in edges.values()


@pytest.mark.parametrize(
    ("spelling", "mode"),
    [
        ("off", TLSMode.OFF),
        ("on", TLSMode.OPTIONAL),
        ("optional", TLSMode.OPTIONAL),
        ("require", TLSMode.REQUIRED),
        ("required", TLSMode.REQUIRED),
        (TLSMode.REQUIRED, TLSMode.REQUIRED),
    ],
)
def test_tls_mode_reads_the_spellings_of_both_sides(spelling: str | TLSMode, mode: TLSMode) -> None:
    assert TLSMode.parse(spelling) is mode
    assert ClientHandshake("", tls=spelling).tls is mode


def test_an_unknown_tls_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="tls must be off, on or require, not 'maybe'"):
        TLSMode.parse("maybe")
    with pytest.raises(ValueError, match="tls must be"):
        core.ServerConnection(EXPORTS, tls="maybe")
