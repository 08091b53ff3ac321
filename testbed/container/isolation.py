"""Keep a party container to the run: routes to the run's processes only.

A compose ``internal: true`` network has no way out, but the host is on it: Docker gives
the bridge an address (the network's gateway), so a container can still open connections
to any service the host listens on.  :func:`restrict_routes` -- run by a party while it
still has ``NET_ADMIN``, before it drops to an unprivileged user who cannot undo it --
replaces the on-link route of its network by one host route per process of the run
(the coordinator and the other parties), and removes the default route Docker gives even
an internal network (via that same host address).  Everything else on the network, the host's
bridge address included, is then unreachable (``connect`` fails with "Network is
unreachable").  Docker's DNS (127.0.0.11, on ``lo``) is unaffected.
"""
import ipaddress
import logging
import socket
import subprocess

log = logging.getLogger(__name__)


def _ip(*args):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def restrict_routes(hosts, dev="eth0"):
    """Route ``dev`` to ``hosts`` (names or addresses) only. Returns what was done, one line."""
    try:
        addresses = sorted({socket.gethostbyname(h) for h in hosts})
        links = [line.split() for line in _ip("-o", "-4", "route", "show", "dev", dev, "scope", "link").splitlines()]
        own = _ip("-o", "-4", "addr", "show", "dev", dev).split()[3].split("/")[0]
        subnets = [fields[0] for fields in links if "/" in fields[0]]
        for a in addresses:
            if a != own and any(ipaddress.ip_address(a) in ipaddress.ip_network(s) for s in subnets):
                _ip("route", "replace", f"{a}/32", "dev", dev, "src", own)
        # Docker gives even an internal network a default route via the host's bridge address
        for fields in (line.split() for line in _ip("-o", "-4", "route", "show", "dev", dev).splitlines()):
            if fields[0] == "default":
                _ip("route", "del", "default", "dev", dev)
        for s in subnets:
            _ip("route", "del", s, "dev", dev)
    except (OSError, IndexError) as exc:
        log.warning("could not restrict the routes of %s: %s", dev, exc)
        return f"routes not restricted ({exc})"
    return f"routes only to {', '.join(addresses)}"
