"""A party container reaches the run's processes and nothing else -- not the host.

On an ``internal: true`` network the host is still there, at the network's gateway
address.  Here a container of the project image, on such a network, connects to a listener
the test opens on the host: it gets through before :func:`restrict_routes` (what a party runs
once its link is shaped) and is refused after it ("Network is unreachable").

Needs a Docker daemon and the image (``TESTBED_IMAGE``); skipped without one, except under CI=true.
"""
import json
import secrets
import socket
import subprocess
import threading

import pytest

pytestmark = pytest.mark.docker


PROBE = """
import socket, sys
from testbed.container.isolation import restrict_routes
def attempt():
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()
        return "connected"
    except OSError as exc:
        return f"refused: {exc}"
print("before:", attempt())
print("isolation:", restrict_routes([socket.gethostname()]))
print("after:", attempt())
"""


def test_a_party_cannot_reach_the_host_once_its_routes_are_restricted(image):
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: [server.accept()[0].close() for _ in iter(int, 1)], daemon=True).start()
    net = f"testbed-isolation-{secrets.token_hex(3)}"
    subprocess.run(["docker", "network", "create", "--internal", net], capture_output=True, check=True)
    try:
        gateway = json.loads(subprocess.run(["docker", "network", "inspect", net], capture_output=True,
                                            text=True).stdout)[0]["IPAM"]["Config"][0]["Gateway"]
        r = subprocess.run(["docker", "run", "--rm", "--network", net, "--cap-add", "NET_ADMIN", "--entrypoint",
                            "python", image, "-c", PROBE, gateway, str(port)],
                           capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["docker", "network", "rm", net], capture_output=True)
        server.close()
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert lines["before"] == "connected", r.stdout       # the host is reachable on an internal network...
    assert lines["isolation"].startswith("routes only to"), r.stdout
    assert lines["after"].startswith("refused") and "unreachable" in lines["after"], r.stdout   # ...and then not
