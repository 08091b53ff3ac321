"""Size-bounded frames: what one message looks like inside a mutual-TLS connection.

One frame in the TLS stream::

    u32 big-endian payload length | payload

The payload is one message in the wire codec (:mod:`testbed.engine.codec`).  There is
no MAC of our own: the connection is TLS 1.3 with a certificate on both ends
(:mod:`testbed.net.identity`), which authenticates the peer before any frame is read,
and protects every byte against tampering, replay and reordering (record sequence
numbers under AEAD), and keeps it confidential.  A length is checked against the
receiver's limit before anything is allocated for the body.
"""
import struct
import time

from testbed.errors import TransportError

PREFIX = struct.Struct(">I")
FRAME_OVERHEAD = PREFIX.size
DEFAULT_MAX_FRAME = 1 << 30
# a frame this large gives a bandwidth figure not dominated by the shaper's burst
MEASURE_MIN_BYTES = 256 << 10
CONTROL_PREFIX = "_"  # message kinds the engine reserves for itself (never a protocol's)


class FrameRejected(TransportError):
    """An incoming frame was refused; the message says why."""


def frame_header(payload):
    """The bytes that precede ``payload`` in the stream: its length."""
    return PREFIX.pack(len(payload))


def _recv_into(sock, view, what, total):
    """Fill ``view`` from ``sock``."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise FrameRejected(f"truncated frame: connection closed after {got} of {total} bytes "
                                f"of the {what}")
        got += n


def read_frame(sock, max_frame):
    """Read one frame. Returns (payload, t_first, t_last) or None at a clean end of stream.

    ``t_first`` is when the first bytes arrived, ``t_last`` when the last did
    (``time.perf_counter``).  Raises :class:`FrameRejected` naming the reason."""
    head = bytearray(PREFIX.size)
    view = memoryview(head)
    n = sock.recv_into(view)
    if n == 0:
        return None
    t_first = time.perf_counter()
    if n < PREFIX.size:
        _recv_into(sock, view[n:], "length prefix", PREFIX.size)
    (length,) = PREFIX.unpack_from(head)
    if length > max_frame:
        raise FrameRejected(f"frame of {length} bytes exceeds the limit of {max_frame} bytes")
    payload = bytearray(length)
    _recv_into(sock, memoryview(payload), "payload", length)
    return payload, t_first, time.perf_counter()
