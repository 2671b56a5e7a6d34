from nbdsrv.buffer import ReceiveBuffer


def test_take_waits_for_a_whole_frame() -> None:
    buffer = ReceiveBuffer()
    buffer.feed(b"abc")
    assert buffer.take(4) is None
    assert len(buffer) == 3
    buffer.feed(b"de")
    assert buffer.take(4) == b"abcd"
    assert buffer.take(1) == b"e"
    assert len(buffer) == 0


def test_take_into_and_skip() -> None:
    buffer = ReceiveBuffer()
    buffer.feed(b"0123456789")
    target = bytearray(4)
    assert buffer.take_into(memoryview(target)) == 4
    assert target == b"0123"
    assert buffer.skip(3) == 3
    assert buffer.peek(3) == b"789"
    assert buffer.skip(10) == 3
    assert len(buffer) == 0


def test_large_stream_compacts_without_losing_bytes() -> None:
    buffer = ReceiveBuffer()
    expected = bytes(range(256)) * 1024
    out = bytearray()
    for start in range(0, len(expected), 1000):
        buffer.feed(expected[start : start + 1000])
        while (piece := buffer.take(777)) is not None:
            out += piece
    out += buffer.take(len(buffer)) or b""
    assert bytes(out) == expected
