"""NBD protocol constants, named as in the NBD spec (NetworkBlockDevice/nbd, doc/proto.md).

Each enum cites the section of the spec it comes from.  Values are what goes on the wire; all wire
integers are big-endian.
"""

from __future__ import annotations

import enum

# "Newstyle negotiation": the server's greeting and the option magic.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", server greeting and the prefix of every client option
OPTION_REPLY_MAGIC = 0x0003E889045565A9  # "Option haggling": prefix of every option reply
# "Transmission phase": request and reply magics.
REQUEST_MAGIC = 0x25609513  # "Request message"
SIMPLE_REPLY_MAGIC = 0x67446698  # "Simple reply message"
STRUCTURED_REPLY_MAGIC = 0x668E33EF  # "Structured reply chunk message"

EXPORT_NAME_PADDING = 124  # "NBD_OPT_EXPORT_NAME": zero bytes after size+flags unless NO_ZEROES
MAX_OPTION_LENGTH = 64 * 1024  # our limit on a client option's payload (spec: server may reject)
MAX_STRING_LENGTH = 4096  # "Strings": servers need not accept names or queries longer than 4096
MAX_PAYLOAD = 32 * 1024 * 1024  # "Block size constraints": default maximum payload, 32 MiB
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
BASE_ALLOCATION = "base:allocation"  # "Metadata querying": the allocation context


class HandshakeFlag(enum.IntFlag):
    """"Newstyle negotiation": handshake flags the server sends (16 bits)."""

    FIXED_NEWSTYLE = 1 << 0  # NBD_FLAG_FIXED_NEWSTYLE
    NO_ZEROES = 1 << 1  # NBD_FLAG_NO_ZEROES


class ClientFlag(enum.IntFlag):
    """"Newstyle negotiation": client flags (32 bits), echoing the handshake flags."""

    FIXED_NEWSTYLE = 1 << 0  # NBD_FLAG_C_FIXED_NEWSTYLE
    NO_ZEROES = 1 << 1  # NBD_FLAG_C_NO_ZEROES


class TransmissionFlag(enum.IntFlag):
    """"Transmission flags" (16 bits), sent with the export's size."""

    HAS_FLAGS = 1 << 0  # NBD_FLAG_HAS_FLAGS
    READ_ONLY = 1 << 1  # NBD_FLAG_READ_ONLY
    SEND_FLUSH = 1 << 2  # NBD_FLAG_SEND_FLUSH
    SEND_FUA = 1 << 3  # NBD_FLAG_SEND_FUA
    ROTATIONAL = 1 << 4  # NBD_FLAG_ROTATIONAL
    SEND_TRIM = 1 << 5  # NBD_FLAG_SEND_TRIM
    SEND_WRITE_ZEROES = 1 << 6  # NBD_FLAG_SEND_WRITE_ZEROES
    SEND_DF = 1 << 7  # NBD_FLAG_SEND_DF
    CAN_MULTI_CONN = 1 << 8  # NBD_FLAG_CAN_MULTI_CONN
    SEND_RESIZE = 1 << 9  # NBD_FLAG_SEND_RESIZE
    SEND_CACHE = 1 << 10  # NBD_FLAG_SEND_CACHE
    SEND_FAST_ZERO = 1 << 11  # NBD_FLAG_SEND_FAST_ZERO
    BLOCK_STAT_PAYLOAD = 1 << 12  # NBD_FLAG_BLOCK_STAT_PAYLOAD


class Option(enum.IntEnum):
    """"Option types" the client sends during option haggling."""

    EXPORT_NAME = 1  # NBD_OPT_EXPORT_NAME
    ABORT = 2  # NBD_OPT_ABORT
    LIST = 3  # NBD_OPT_LIST
    PEEK_EXPORT = 4  # NBD_OPT_PEEK_EXPORT (withdrawn)
    STARTTLS = 5  # NBD_OPT_STARTTLS
    INFO = 6  # NBD_OPT_INFO
    GO = 7  # NBD_OPT_GO
    STRUCTURED_REPLY = 8  # NBD_OPT_STRUCTURED_REPLY
    LIST_META_CONTEXT = 9  # NBD_OPT_LIST_META_CONTEXT
    SET_META_CONTEXT = 10  # NBD_OPT_SET_META_CONTEXT
    EXTENDED_HEADERS = 11  # NBD_OPT_EXTENDED_HEADERS


_ERR = 1 << 31


class OptionReply(enum.IntEnum):
    """"Option reply types"; the error replies have bit 31 set."""

    ACK = 1  # NBD_REP_ACK
    SERVER = 2  # NBD_REP_SERVER: one export, in answer to LIST
    INFO = 3  # NBD_REP_INFO: one NBD_INFO_* item, in answer to INFO or GO
    META_CONTEXT = 4  # NBD_REP_META_CONTEXT: one context id and name
    ERR_UNSUP = _ERR | 1  # NBD_REP_ERR_UNSUP: option unknown to the server
    ERR_POLICY = _ERR | 2  # NBD_REP_ERR_POLICY: forbidden by server policy
    ERR_INVALID = _ERR | 3  # NBD_REP_ERR_INVALID: syntactically or semantically invalid
    ERR_PLATFORM = _ERR | 4  # NBD_REP_ERR_PLATFORM: not supported on this platform
    ERR_TLS_REQD = _ERR | 5  # NBD_REP_ERR_TLS_REQD: STARTTLS must come first
    ERR_UNKNOWN = _ERR | 6  # NBD_REP_ERR_UNKNOWN: no such export
    ERR_SHUTDOWN = _ERR | 7  # NBD_REP_ERR_SHUTDOWN: the server is shutting down
    ERR_BLOCK_SIZE_REQD = _ERR | 8  # NBD_REP_ERR_BLOCK_SIZE_REQD
    ERR_TOO_BIG = _ERR | 9  # NBD_REP_ERR_TOO_BIG: request or reply too large
    ERR_EXT_HEADER_REQD = _ERR | 10  # NBD_REP_ERR_EXT_HEADER_REQD

    @property
    def is_error(self) -> bool:
        return bool(self.value & _ERR)


def is_option_error(reply_type: int) -> bool:
    """True for any error reply type, including ones this module does not name."""
    return bool(reply_type & _ERR)


class Info(enum.IntEnum):
    """"NBD_REP_INFO" item types."""

    EXPORT = 0  # NBD_INFO_EXPORT: size (64 bits) and transmission flags (16 bits)
    NAME = 1  # NBD_INFO_NAME: the export's canonical name
    DESCRIPTION = 2  # NBD_INFO_DESCRIPTION: free text
    BLOCK_SIZE = 3  # NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum (32 bits each)


class Command(enum.IntEnum):
    """"Request types" of the transmission phase."""

    READ = 0  # NBD_CMD_READ
    WRITE = 1  # NBD_CMD_WRITE
    DISC = 2  # NBD_CMD_DISC
    FLUSH = 3  # NBD_CMD_FLUSH
    TRIM = 4  # NBD_CMD_TRIM
    CACHE = 5  # NBD_CMD_CACHE
    WRITE_ZEROES = 6  # NBD_CMD_WRITE_ZEROES
    BLOCK_STATUS = 7  # NBD_CMD_BLOCK_STATUS
    RESIZE = 8  # NBD_CMD_RESIZE


class CommandFlag(enum.IntFlag):
    """"Command flags" (16 bits) of a request."""

    FUA = 1 << 0  # NBD_CMD_FLAG_FUA
    NO_HOLE = 1 << 1  # NBD_CMD_FLAG_NO_HOLE
    DF = 1 << 2  # NBD_CMD_FLAG_DF
    REQ_ONE = 1 << 3  # NBD_CMD_FLAG_REQ_ONE
    FAST_ZERO = 1 << 4  # NBD_CMD_FLAG_FAST_ZERO
    PAYLOAD_LEN = 1 << 5  # NBD_CMD_FLAG_PAYLOAD_LEN


class ReplyFlag(enum.IntFlag):
    """"Structured reply chunk message": chunk flags."""

    DONE = 1 << 0  # NBD_REPLY_FLAG_DONE


class ReplyType(enum.IntEnum):
    """"Structured reply types"; error types have bit 15 set."""

    NONE = 0  # NBD_REPLY_TYPE_NONE
    OFFSET_DATA = 1  # NBD_REPLY_TYPE_OFFSET_DATA
    OFFSET_HOLE = 2  # NBD_REPLY_TYPE_OFFSET_HOLE
    BLOCK_STATUS = 5  # NBD_REPLY_TYPE_BLOCK_STATUS
    BLOCK_STATUS_EXT = 6  # NBD_REPLY_TYPE_BLOCK_STATUS_EXT (extended headers only)
    ERROR = (1 << 15) | 1  # NBD_REPLY_TYPE_ERROR
    ERROR_OFFSET = (1 << 15) | 2  # NBD_REPLY_TYPE_ERROR_OFFSET


def is_reply_error(reply_type: int) -> bool:
    """"Structured reply types": any type with bit 15 set is an error chunk."""
    return bool(reply_type & (1 << 15))


class Errno(enum.IntEnum):
    """"Error values": the errno numbers the protocol carries (fixed, not the host's)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class BlockStatusFlag(enum.IntFlag):
    """"base:allocation metadata context": extent flags."""

    HOLE = 1 << 0  # NBD_STATE_HOLE: not allocated
    ZERO = 1 << 1  # NBD_STATE_ZERO: reads as zeroes


_WIRE_ERRNOS = frozenset(int(e) for e in Errno)
# Host errnos that the spec's list cannot carry, mapped to the nearest one it has.
_HOST_TO_WIRE = {
    30: Errno.EPERM,  # EROFS
    13: Errno.EPERM,  # EACCES
    27: Errno.ENOSPC,  # EFBIG
    122: Errno.ENOSPC,  # EDQUOT
    34: Errno.EOVERFLOW,  # ERANGE
}


def errno_to_wire(host_errno: int) -> Errno:
    """"Error values": map a host errno to one the protocol defines (EIO when there is none)."""
    if host_errno in _WIRE_ERRNOS:
        return Errno(host_errno)
    return _HOST_TO_WIRE.get(host_errno, Errno.EIO)


def errno_from_wire(wire_errno: int) -> int:
    """"Error values": a client treats a value it does not know as EINVAL.  On Linux the spec's
    numbers are the host's, so known values pass through unchanged."""
    return wire_errno if wire_errno in _WIRE_ERRNOS else int(Errno.EINVAL)
