"""Device profiles: how fast a party's accelerator is, for the simulated clock.

``measured`` compute mode scales the wall time a role spent on this host by
``HOST.flops / device.flops`` (so a role on an ``a100`` profile runs faster in
simulated time than on the CPU that did the work).  ``flops`` mode counts the FLOPs
with :class:`testbed.engine.flops.FlopCount` (torch's flop formulas) and models time as
``max(flops / flops_peak, bytes / mem_bw)``.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops: float          # peak dense FLOP/s at the training dtype
    mem_bw: float         # bytes/s
    memory: float         # bytes of accelerator memory
    note: str = ""


PROFILES = {
    # The machine running the embedded engine: 2 CPU cores, fp32.  Measured wall time is
    # taken at face value for this profile.
    "host": DeviceProfile("host", 100e9, 20e9, 24 * 2**30, "this CPU; measured time unscaled"),
    "a100": DeviceProfile("a100", 312e12, 1935e9, 80 * 2**30, "A100 80GB, bf16 dense"),
    "h100": DeviceProfile("h100", 989e12, 3350e9, 80 * 2**30, "H100 SXM, bf16 dense"),
    "rtx4090": DeviceProfile("rtx4090", 165e12, 1008e9, 24 * 2**30, "RTX 4090, bf16 dense"),
    "phone": DeviceProfile("phone", 4e12, 42.7e9, 12 * 2**30,
                           "phone-class SoC (LPDDR5X 42.7 GB/s), ~4 TFLOP/s fp16 NPU/GPU"),
    "laptop": DeviceProfile("laptop", 20e12, 100e9, 16 * 2**30, "laptop GPU / Apple-M class"),
}


def resolve_device(name):
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown device profile {name!r}; valid: {', '.join(PROFILES)}") from None


def scale_measured(seconds, device):
    """Wall seconds measured on the host -> simulated seconds on ``device``."""
    return seconds * PROFILES["host"].flops / device.flops


def modelled_seconds(flops, nbytes, device):
    """Roofline time for ``flops`` and ``nbytes`` of memory traffic on ``device``."""
    return max(flops / device.flops, nbytes / device.mem_bw)
