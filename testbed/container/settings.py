"""What a container process reads from its environment (compose sets these).

=================  ==========================================================  ==================
variable           meaning                                                     default
=================  ==========================================================  ==================
SCENARIO           scenario YAML (a path inside the container)                 required
CREDENTIALS_DIR    ca.crt, <process>.crt, <process>.key (mutual TLS; files:     /run/secrets
                   compose ``secrets:``, never variables)
RUN_NAME           run directory name (coordinator)                            <scenario>-<time>
DATA_DIR           prepared data: public/, truth/, party-<i>/                  /data
RESULTS_DIR        where the coordinator writes the run directory              /results
PARTS_DIR          where each process writes its part (<dir>/<process>/)       RESULTS_DIR/.parts/<run>
BASE_DIR           what ``data.path`` is relative to (prepare)                 .
COORDINATOR        the coordinator's host:port (parties)                       coordinator:7070
PORT               port this process listens on (0: any free one)              7070
PARTY              this party's index (empty: from the compose replica number)  -
ADVERTISE_HOST     address peers should use (default: as the coordinator sees)  -
RECV_TIMEOUT       seconds a role may wait in one Recv                         600
REGISTER_TIMEOUT   seconds to wait for registrations / the address table       300
MAX_FRAME          largest frame accepted (bytes or e.g. 512MiB)               1GiB
SHAPING            auto | tc | sender | off (see testbed/container/shaping.py)  auto
LINK_DEV           the interface to shape                                      eth0
LINK_PROBE_BYTES   size of a bandwidth probe per link at startup (0: none)     0
TESTBED_THREADS    torch threads (``up``: the container's CPU limit)           1
TESTBED_GPU_MEMORY_FRACTION / TESTBED_GPU_MEMORY_BUDGET  CUDA memory cap (fraction / bytes)
RUN_AS             uid:gid to switch to once links are shaped                  stay as is
=================  ==========================================================  ==================
"""
import os
from dataclasses import dataclass
from typing import Optional

from testbed.errors import ConfigError
from testbed.units import parse_size

DEFAULT_PORT = 7070
ABORTED = 10   # exit code of a party the coordinator told to stop (another process failed)


@dataclass
class Settings:
    scenario: str
    credentials_dir: str = "/run/secrets"
    run_name: Optional[str] = None
    data_dir: str = "/data"
    results_dir: str = "/results"
    parts_dir: Optional[str] = None
    base_dir: str = "."
    coordinator: tuple = ("coordinator", DEFAULT_PORT)
    port: int = DEFAULT_PORT
    party: Optional[int] = None
    advertise_host: Optional[str] = None
    recv_timeout: float = 600.0
    register_timeout: float = 300.0
    max_frame: int = 1 << 30
    shaping: str = "auto"
    link_dev: str = "eth0"
    probe_bytes: int = 0

    def parts_root(self, run_name):
        return os.path.join(self.parts_dir or os.path.join(self.results_dir, ".parts", run_name))


def _address(value, key):
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError("environment", [f"{key}: expected host:port (got {value!r})"])
    return host, int(port)


def from_env(env=None):
    """Settings from ``env`` (default ``os.environ``); every problem reported at once."""
    env = os.environ if env is None else env
    problems = []

    def number(key, default, cast=float):
        raw = env.get(key, "")
        if raw == "":
            return default
        try:
            value = cast(raw)
        except ValueError:
            problems.append(f"{key}: expected a number (got {raw!r})")
            return default
        if value < 0:
            problems.append(f"{key}: must be >= 0 (got {raw!r})")
        return value

    def size(key, default):
        raw = env.get(key, "")
        try:
            return parse_size(raw) if raw else default
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
            return default

    if not env.get("SCENARIO"):
        problems.append("SCENARIO: required (path of the scenario YAML inside the container)")
    if env.get("RUN_SECRET"):
        problems.append("RUN_SECRET: no longer used, and a secret must not be a variable: the run's "
                        "credentials are files in CREDENTIALS_DIR (unset RUN_SECRET)")
    coordinator = ("coordinator", DEFAULT_PORT)
    if env.get("COORDINATOR"):
        try:
            coordinator = _address(env["COORDINATOR"], "COORDINATOR")
        except ConfigError as exc:
            problems += exc.problems
    shaping = env.get("SHAPING") or "auto"
    if shaping not in ("auto", "tc", "sender", "off"):
        problems.append(f"SHAPING: must be one of auto, tc, sender, off (got {shaping!r})")
    s = Settings(
        scenario=env.get("SCENARIO", ""), credentials_dir=env.get("CREDENTIALS_DIR") or "/run/secrets",
        run_name=env.get("RUN_NAME") or None, data_dir=env.get("DATA_DIR") or "/data",
        results_dir=env.get("RESULTS_DIR") or "/results", parts_dir=env.get("PARTS_DIR") or None,
        base_dir=env.get("BASE_DIR") or ".", coordinator=coordinator,
        port=number("PORT", DEFAULT_PORT, int), party=number("PARTY", None, int),
        advertise_host=env.get("ADVERTISE_HOST") or None,
        recv_timeout=number("RECV_TIMEOUT", 600.0), register_timeout=number("REGISTER_TIMEOUT", 300.0),
        max_frame=size("MAX_FRAME", 1 << 30), shaping=shaping, link_dev=env.get("LINK_DEV") or "eth0",
        probe_bytes=size("LINK_PROBE_BYTES", 0))
    if problems:
        raise ConfigError("environment", problems)
    return s
