"""Network links: named profiles and the SimPy link object of the embedded engine.

A link belongs to one endpoint (a party or the coordinator) and has an ``up`` and a
``down`` direction.  A message from A to B occupies A's uplink and B's downlink for
``bytes * 8 / min(up_A, down_B)`` seconds (transfers on a direction queue FIFO, so
concurrent transfers share its bandwidth), then arrives after both one-way latencies
plus jitter.  A lost transmission is sent again (one more serialization time plus an
RTO of 2x the path latency).  Senders never compute delays: they hand the message to
the link.
"""
import simpy
from pydantic import BaseModel, ConfigDict, Field


class LinkCfg(BaseModel):
    """One link: per-direction bandwidth, latency, jitter and loss (a scenario's ``link``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    up_mbps: float = Field(1000.0, gt=0)
    down_mbps: float = Field(1000.0, gt=0)
    latency_ms: float = Field(0.5, ge=0)
    jitter_ms: float = Field(0.0, ge=0)
    loss: float = Field(0.0, ge=0, lt=1)


# Bandwidth in Mbit/s per direction (device's view: up = device -> network), latency one way.
PROFILES = {
    "ideal": LinkCfg(up_mbps=1e9, down_mbps=1e9, latency_ms=0.0),
    "lan": LinkCfg(up_mbps=1000, down_mbps=1000, latency_ms=0.25),
    "datacenter": LinkCfg(up_mbps=100_000, down_mbps=100_000, latency_ms=0.01),
    "wifi": LinkCfg(up_mbps=200, down_mbps=300, latency_ms=3.0, jitter_ms=1.0),
    "wan": LinkCfg(up_mbps=100, down_mbps=100, latency_ms=20.0, jitter_ms=2.0),
    "5g": LinkCfg(up_mbps=60, down_mbps=100, latency_ms=10.0, jitter_ms=2.0),
    "4g": LinkCfg(up_mbps=10, down_mbps=30, latency_ms=30.0, jitter_ms=5.0),
}


def resolve_link(spec):
    """A profile name or a LinkCfg -> LinkCfg."""
    if isinstance(spec, LinkCfg):
        return spec
    if isinstance(spec, dict):
        return LinkCfg(**spec)
    try:
        return PROFILES[spec]
    except KeyError:
        raise ValueError(f"unknown link profile {spec!r}; valid: {', '.join(PROFILES)}") from None


class SimLink:
    """One endpoint's link in a SimPy environment: a FIFO resource per direction."""

    def __init__(self, env, name, cfg):
        self.env, self.name, self.cfg = env, name, cfg
        self.up = simpy.Resource(env, capacity=1)
        self.down = simpy.Resource(env, capacity=1)
        self.bytes_up = 0
        self.bytes_down = 0


def transfer(env, src, dst, nbytes, rng):
    """SimPy process: move ``nbytes`` from ``src``'s uplink to ``dst``'s downlink."""
    bw_bps = min(src.cfg.up_mbps, dst.cfg.down_mbps) * 1e6
    latency = (src.cfg.latency_ms + dst.cfg.latency_ms) / 1e3
    loss = 1 - (1 - src.cfg.loss) * (1 - dst.cfg.loss)
    with src.up.request() as u:
        yield u
        with dst.down.request() as d:
            yield d
            serialize = nbytes * 8 / bw_bps
            attempts = 1
            while loss > 0 and rng.random() < loss:
                attempts += 1
            yield env.timeout(serialize * attempts + (attempts - 1) * 2 * latency)
    src.bytes_up += nbytes
    dst.bytes_down += nbytes
    jitter_ms = src.cfg.jitter_ms + dst.cfg.jitter_ms
    jitter = abs(rng.gauss(0.0, jitter_ms / 1e3)) if jitter_ms else 0.0
    yield env.timeout(latency + jitter)
