"""Tensor throughput through the container transport vs a raw socket, on loopback.

    python bench/transport.py [--mib 4] [--messages 32] [--repeat 3]

Both paths move the same tensor messages over 127.0.0.1 in one process (sender and
receiver threads) and do the same codec work: the sender encodes each message
(:func:`testbed.engine.codec.encode`), the receiver decodes it.  The transport path adds what
the container engine pays per frame: mutual TLS 1.3 (a per-run CA and one certificate per
node, made once before timing; AES-GCM on every byte, both ends), the outbox thread, the
size and src checks.  The raw path writes a
4-byte length and the encoded bytes with ``sendall`` and reads them back with
``recv_into``; the bare-TLS path does the same over an ``ssl`` socket.  Printed: MiB/s of
each (best of ``--repeat``), transport/raw (goal: >= 0.8) and transport/bare TLS.  The numbers depend on the machine's load; run it on a quiet one.
"""
import argparse
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ssl  # noqa: E402
import tempfile  # noqa: E402

from testbed.engine import codec  # noqa: E402
from testbed.net.identity import Identity, make_credentials  # noqa: E402
from testbed.net.transport import Node  # noqa: E402

PKI = make_credentials(tempfile.mkdtemp(prefix="bench-pki-"), ["a", "b"])


def messages(mib, count):
    t = torch.randn(mib * (1 << 20) // 4)
    return [codec.Message(kind="act", step=i, meta={"layer": 0}, tensors={"hidden": t}) for i in range(count)]


def raw(msgs, tls=False):
    """Seconds to send ``msgs`` over a plain TCP socket (length prefix + codec bytes); with
    ``tls``, over a bare mutual-TLS socket of the same credentials (what any transport on
    Python's ``ssl`` pays, without the Node's threads and checks)."""
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def receive():
        conn, _ = server.accept()
        if tls:
            conn = Identity.from_dir(PKI, "b").server_context().wrap_socket(conn, server_side=True)
        head = bytearray(4)
        for _ in msgs:
            _read(conn, memoryview(head))
            buf = bytearray(struct.unpack(">I", head)[0])
            _read(conn, memoryview(buf))
            codec.decode(buf)
        conn.close()
        done.set()
    threading.Thread(target=receive, daemon=True).start()
    sock = socket.create_connection(server.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        sock = Identity.from_dir(PKI, "a").client_context().wrap_socket(sock, server_hostname="b")
    t0 = time.perf_counter()
    for m in msgs:
        data = codec.encode(m)
        sock.sendall(struct.pack(">I", len(data)))
        sock.sendall(data)
    done.wait()
    dt = time.perf_counter() - t0
    sock.close()
    server.close()
    return dt


def _read(conn, view):
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise EOFError("peer closed")
        got += n


def transport(msgs):
    """Seconds to send ``msgs`` from one Node to another (mutual TLS, frames, outbox thread)."""
    left, done = [len(msgs)], threading.Event()

    def on_message(msg, address, nbytes):
        left[0] -= 1
        if left[0] == 0:
            done.set()
    b = Node(Identity.from_dir(PKI, "b"), host="127.0.0.1", on_message=on_message)
    a = Node(Identity.from_dir(PKI, "a"), host="127.0.0.1")
    a.add_peer("b", ("127.0.0.1", b.port))
    t0 = time.perf_counter()
    for m in msgs:
        a.send_message("b", codec.Message(kind=m.kind, step=m.step, meta=m.meta, tensors=m.tensors))
    done.wait()
    dt = time.perf_counter() - t0
    a.close()
    b.close()
    return dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=4, help="tensor size per message (MiB)")
    p.add_argument("--messages", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    msgs = messages(args.mib, args.messages)
    total = sum(len(codec.encode(m)) for m in msgs[:1]) * len(msgs)
    best = {"raw socket": float("inf"), "tls socket": float("inf"), "transport": float("inf")}
    for _ in range(args.repeat):   # interleaved, so a burst of load hits all alike
        best["raw socket"] = min(best["raw socket"], raw(msgs))
        best["tls socket"] = min(best["tls socket"], raw(msgs, tls=True))
        best["transport"] = min(best["transport"], transport(msgs))
    print(f"{args.messages} messages of {args.mib} MiB ({total / 2**20:.0f} MiB), best of {args.repeat}:")
    for name, dt in best.items():
        print(f"  {name:<11} {total / 2**20 / dt:9.1f} MiB/s  ({dt:.3f} s)")
    ratio = best["raw socket"] / best["transport"]
    print(f"  transport / raw = {ratio:.2f}  (goal >= 0.8)")
    print(f"  transport / bare TLS socket = {best['tls socket'] / best['transport']:.2f}  "
          "(the ceiling of a transport on Python's ssl here)")
    print(f"  TLS: {ssl.OPENSSL_VERSION}")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)   # daemon transport threads need no orderly interpreter shutdown
