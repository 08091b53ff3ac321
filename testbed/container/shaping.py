"""Link shaping inside a container: ``tc`` for bandwidth, the transport for the rest.

A container's link is its scenario ``LinkCfg`` (``up_mbps``, ``down_mbps``,
``latency_ms``, ``jitter_ms``, ``loss``), shaped like this (needs ``NET_ADMIN``):

* uplink: a ``tbf`` qdisc at ``up_mbps`` on the egress of ``eth0``;
* downlink: ingress traffic of ``eth0`` is redirected (``mirred``) to an ``ifb``
  device whose egress has a ``tbf`` at ``down_mbps``, so what arrives is shaped too,
  not policed (this kernel has no ``act_police``, but has ``ifb`` and ``mirred``);
* latency, jitter, loss: ``netem`` under the ``tbf`` when the kernel has it (detected
  by adding it); otherwise -- the usual case, and this kernel's -- the sender's
  transport holds each frame back (:class:`testbed.net.transport.Emulation`).

Without ``tc`` (no ``NET_ADMIN``, no iproute2, or ``SHAPING=sender``) the transport
also paces each outgoing connection at ``min(own up, peer down)``: an approximation
that does not share a direction's bandwidth between peers.  ``SHAPING=off`` shapes
nothing (loopback tests).
"""
import logging
import shutil
import subprocess

from testbed.net.transport import Emulation

log = logging.getLogger(__name__)

IFB = "ifb-testbed"
MODES = ("auto", "tc", "sender", "off")


def _tc(*args):
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"{' '.join(args)}: {(r.stderr or r.stdout).strip()}")


def _burst_bytes(mbps):
    # at least 4 ms of traffic (the kernel needs rate/HZ) and a few full-size packets
    return max(16 << 10, int(mbps * 1e6 / 8 * 0.004))


def _tbf(dev, mbps, parent="root"):
    where = ["root"] if parent == "root" else ["parent", parent]
    _tc("tc", "qdisc", "replace", "dev", dev, *where, "handle", "10:", "tbf",
        "rate", f"{mbps}mbit", "burst", str(_burst_bytes(mbps)), "latency", "200ms")


def _netem(dev, link):
    args = ["delay", f"{link.latency_ms}ms"]
    if link.jitter_ms:
        args += [f"{link.jitter_ms}ms"]
    if link.loss:
        args += ["loss", f"{link.loss * 100}%"]
    _tc("tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem", *args)


def apply_shaping(link, dev="eth0", mode="auto"):
    """Shape this container's ``dev`` for ``link``. Returns what was done:
    ``{"tc": bool, "netem": bool, "pacing": bool, "detail": str}``."""
    if mode not in MODES:
        raise ValueError(f"SHAPING: must be one of {', '.join(MODES)} (got {mode!r})")
    done = {"tc": False, "netem": False, "pacing": mode == "sender", "detail": mode}
    if mode in ("off", "sender"):
        return done
    try:
        if shutil.which("tc") is None:
            raise OSError("no tc binary (iproute2)")
        try:
            _netem(dev, link)
            done["netem"] = True
            _tbf(dev, link.up_mbps, parent="1:")
        except OSError as exc:
            if "netem" not in str(exc) and "unknown" not in str(exc).lower():
                raise
            _tbf(dev, link.up_mbps)
        _tc("ip", "link", "add", IFB, "type", "ifb")
        _tc("ip", "link", "set", IFB, "up")
        _tc("tc", "qdisc", "replace", "dev", dev, "handle", "ffff:", "ingress")
        _tc("tc", "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", IFB)
        _tbf(IFB, link.down_mbps)
        done["tc"] = True
        done["detail"] = (f"{dev}: tbf {link.up_mbps} Mbit/s up, ifb tbf {link.down_mbps} Mbit/s down; "
                          + ("netem" if done["netem"] else "no netem: latency/jitter/loss in the transport"))
    except OSError as exc:
        if mode == "tc":
            raise
        done["pacing"] = True
        done["detail"] = f"tc unavailable ({exc}); the transport paces and delays frames"
    log.info("link shaping: %s", done["detail"])
    return done


def emulation_for(own, peer, shaping):
    """What this process's transport adds on its way to ``peer`` (both ``LinkCfg``):
    the peer's side always (its latency is on the path but not on our egress), our own
    side unless ``netem`` already adds it, and pacing when ``tc`` could not shape."""
    mine = not shaping.get("netem")
    latency = peer.latency_ms + (own.latency_ms if mine else 0.0)
    jitter = peer.jitter_ms + (own.jitter_ms if mine else 0.0)
    loss = 1 - (1 - peer.loss) * (1 - (own.loss if mine else 0.0))
    path_bps = min(own.up_mbps, peer.down_mbps) * 1e6
    return Emulation(latency_s=latency / 1e3, jitter_s=jitter / 1e3, loss=loss,
                     pace_bps=path_bps if shaping.get("pacing") else 0.0, path_bps=path_bps)
