"""Authenticated, size-bounded frames: what one message looks like on a TCP connection.

One frame on the wire::

    u32 big-endian payload length | 12-byte nonce | 16-byte AES-GMAC tag | payload

The tag authenticates the payload with a key derived from the per-run secret
(HMAC-SHA256(secret, "testbed frame mac") -> AES-256-GCM with the payload as associated
data and a fresh random nonce per frame).  GMAC rather than HMAC-SHA256 because it runs
on the CPU's AES/carry-less-multiply instructions at several GB/s: with HMAC-SHA256
(~0.8 GB/s here) authentication alone held the transport to a third of a raw socket.
The payload is one message in the wire codec (:mod:`testbed.engine.codec`).
"""
import functools
import hashlib
import hmac
import os
import struct
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from testbed.errors import TransportError

NONCE_BYTES, TAG_BYTES = 12, 16
MAC_BYTES = NONCE_BYTES + TAG_BYTES
PREFIX = struct.Struct(">I")
FRAME_OVERHEAD = PREFIX.size + MAC_BYTES
DEFAULT_MAX_FRAME = 1 << 30
# a frame this large gives a bandwidth figure not dominated by the shaper's burst
MEASURE_MIN_BYTES = 256 << 10
CONTROL_PREFIX = "_"  # message kinds the engine reserves for itself (never a protocol's)


class FrameRejected(TransportError):
    """An incoming frame was refused; the message says why."""


@functools.lru_cache(maxsize=8)
def _aead(secret):
    return AESGCM(hmac.new(secret, b"testbed frame mac", hashlib.sha256).digest())


def mac(secret, payload, nonce=None):
    """nonce + AES-GMAC tag of ``payload`` under the run secret (28 bytes)."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    return nonce + _aead(secret).encrypt(nonce, b"", payload)


def verify(secret, tag, payload):
    """True when ``tag`` (nonce + GMAC tag) authenticates ``payload`` under the secret."""
    try:
        _aead(secret).decrypt(bytes(tag[:NONCE_BYTES]), bytes(tag[NONCE_BYTES:]), payload)
        return True
    except InvalidTag:
        return False


def frame_header(secret, payload):
    """The 32 bytes that precede ``payload`` on the wire: length, nonce, tag."""
    return PREFIX.pack(len(payload)) + mac(secret, payload)


def _recv_into(sock, view, what, total):
    """Fill ``view`` from ``sock``."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise FrameRejected(f"truncated frame: connection closed after {got} of {total} bytes "
                                f"of the {what}")
        got += n


def read_frame(sock, secret, max_frame):
    """Read one frame. Returns (payload, t_first, t_last) or None at a clean end of stream.

    ``t_first`` is when the first bytes arrived, ``t_last`` when the last did
    (``time.perf_counter``).  Raises :class:`FrameRejected` naming the reason."""
    head = bytearray(FRAME_OVERHEAD)
    view = memoryview(head)
    n = sock.recv_into(view)
    if n == 0:
        return None
    t_first = time.perf_counter()
    if n < PREFIX.size:
        _recv_into(sock, view[n:PREFIX.size], "length prefix", PREFIX.size)
        n = PREFIX.size
    (length,) = PREFIX.unpack_from(head)
    if length > max_frame:
        raise FrameRejected(f"frame of {length} bytes exceeds the limit of {max_frame} bytes")
    if n < FRAME_OVERHEAD:
        _recv_into(sock, view[n:], "MAC", FRAME_OVERHEAD)
    payload = bytearray(length)
    _recv_into(sock, memoryview(payload), "payload", length)
    t_last = time.perf_counter()
    if not verify(secret, head[PREFIX.size:FRAME_OVERHEAD], payload):
        raise FrameRejected("bad MAC: wrong run secret, or the frame was altered")
    return payload, t_first, t_last
