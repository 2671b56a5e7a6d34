"""NBD URI parsing: the forms qemu and libnbd accept, and one-line errors for the rest."""

from __future__ import annotations

import pytest

from nbdsrv.uri import (
    DEFAULT_PORT,
    NBDAddress,
    format_host_port,
    parse_host_port,
    parse_nbd_uri,
)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("nbd://example.com", NBDAddress("tcp", "", host="example.com", port=DEFAULT_PORT)),
        ("nbd://example.com/", NBDAddress("tcp", "", host="example.com")),
        ("nbd://10.0.0.1:1234/disk", NBDAddress("tcp", "disk", host="10.0.0.1", port=1234)),
        ("nbd://[::1]:10810/a%20b%2Fc", NBDAddress("tcp", "a b/c", host="::1", port=10810)),
        ("nbd://[::1]/x", NBDAddress("tcp", "x", host="::1")),
        ("nbds://h/secure", NBDAddress("tcp", "secure", host="h", tls=True)),
        (
            "nbd+unix:///?socket=/run/disk.sock",
            NBDAddress("unix", "", socket_path="/run/disk.sock"),
        ),
        (
            "nbd+unix:///vm%2Bdisk?socket=/tmp/a+b%20c.sock",
            NBDAddress("unix", "vm+disk", socket_path="/tmp/a+b c.sock"),
        ),
        (
            "nbds+unix:///e?socket=/s&tls-certificates=/etc/pki",
            NBDAddress("unix", "e", socket_path="/s", tls=True),
        ),
        ("/tmp/bare.sock", NBDAddress("unix", "", socket_path="/tmp/bare.sock")),
        ("relative.sock", NBDAddress("unix", "", socket_path="relative.sock")),
    ],
)
def test_accepted_forms(uri: str, expected: NBDAddress) -> None:
    assert parse_nbd_uri(uri) == expected


@pytest.mark.parametrize(
    "uri, why",
    [
        ("", "empty"),
        ("http://host/", "unknown scheme"),
        ("nbd+vsock:///", "unknown scheme"),
        ("nbd://host:99999/", "out of range"),
        ("nbd://host:port/", "Port"),
        ("nbd:///export", "no host"),
        ("nbd+unix:///e", "socket="),
        ("nbd+unix:///e?socket=", "socket="),
        ("nbd+unix://host/e?socket=/s", "no host"),
        ("nbd://h/e?socket=/s", "nbd\\+unix"),
        ("nbd://h/e?bogus=1", "unknown query parameter"),
        ("nbd://h/e#frag", "fragment"),
    ],
)
def test_bad_uris_raise_one_line_value_errors(uri: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as raised:
        parse_nbd_uri(uri)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("invalid NBD URI")


@pytest.mark.parametrize(
    "uri",
    [
        "nbd://example.com:10809/disk",
        "nbd://[::1]:7000/a%20b",
        "nbd+unix:///x?socket=/tmp/s.sock",
        "nbds+unix:///?socket=/tmp/s.sock",
    ],
)
def test_uri_round_trips(uri: str) -> None:
    address = parse_nbd_uri(uri)
    assert parse_nbd_uri(address.uri()) == address


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        ("host-b.example:1", ("host-b.example", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("::1:80", ("::1", 80)),
    ],
)
def test_host_port_is_read_and_written_back(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected
    assert parse_host_port(format_host_port(*expected)) == expected


@pytest.mark.parametrize(
    "text", ["nohost", ":", "h:", "h:port", "h:65536", "h:-1", "h:\u00b2", ":80", "[::1]", "h:0"]
)
def test_bad_host_port_is_a_value_error_quoting_it(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_host_port(text)


def test_a_listen_address_may_leave_the_host_and_port_to_the_system() -> None:
    def listen(text: str) -> tuple[str, int]:
        return parse_host_port(text, default_host="0.0.0.0", allow_port_zero=True)

    assert listen(":10809") == ("0.0.0.0", 10809)
    assert listen("[::]:0") == ("::", 0)
    with pytest.raises(ValueError):
        listen("h:65536")
