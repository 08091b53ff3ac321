"""Which replica of the plain compose file's ``party`` service this container is.

Compose names the replicas ``<project>-party-1``, ``<project>-party-2`` ... but tells a
container neither its name nor its number: its hostname is its id.  Docker's embedded DNS
server (127.0.0.11) does know the name of the container's address, so :func:`replica_index`
asks it with one reverse (PTR) query -- the resolver library would answer from
``/etc/hosts``, which has only the id -- and replica ``N`` becomes party index ``N - 1``.
"""
import os
import re
import socket
import struct

from testbed.errors import ConfigError

DOCKER_DNS = ("127.0.0.11", 53)
REPLICA = re.compile(r"[-_]party[-_](\d+)$")


def _name(data, at):
    """A DNS name starting at ``at`` (labels and compression pointers); returns (name, next offset)."""
    labels, end = [], None
    for _ in range(64):
        n = data[at]
        if n & 0xC0 == 0xC0:
            end = at + 2 if end is None else end
            at = struct.unpack_from(">H", data, at)[0] & 0x3FFF
            continue
        if n == 0:
            return ".".join(labels), (at + 1 if end is None else end)
        labels.append(data[at + 1:at + 1 + n].decode("ascii", "replace"))
        at += 1 + n
    raise ValueError("DNS name too long")


def reverse_lookup(address, server=DOCKER_DNS, timeout=5.0):
    """The names a DNS server gives for ``address`` (a PTR query)."""
    txid = int.from_bytes(os.urandom(2), "big")
    qname = b"".join(bytes([len(p)]) + p.encode() for p in [*reversed(address.split(".")), "in-addr", "arpa"])
    query = struct.pack(">HHHHHH", txid, 0x0100, 1, 0, 0, 0) + qname + b"\0" + struct.pack(">HH", 12, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query, server)
        data = s.recv(4096)
    rid, flags, qd, an = struct.unpack_from(">HHHH", data)
    if rid != txid or flags & 0x000F:
        return []
    at = 12
    for _ in range(qd):
        at = _name(data, at)[1] + 4
    names = []
    for _ in range(an):
        at = _name(data, at)[1]
        rtype, _, _, length = struct.unpack_from(">HHIH", data, at)
        at += 10
        if rtype == 12:
            names.append(_name(data, at)[0].rstrip("."))
        at += length
    return names


def replica_index():
    """(party index, container name) of this compose replica."""
    try:
        address = socket.gethostbyname(socket.gethostname())
        names = reverse_lookup(address)
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError("environment", [f"PARTY: not set, and Docker's DNS does not name this container "
                                          f"({exc})"]) from None
    for name in names:
        m = REPLICA.search(name.split(".")[0])
        if m:
            return int(m.group(1)) - 1, name.split(".")[0]
    raise ConfigError("environment", [f"PARTY: not set, and this container ({', '.join(names) or 'no name'}) "
                                      "is not a compose replica <project>-party-<N>"])
