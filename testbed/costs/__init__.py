"""Analytic cost models for real model shapes, nothing allocated or trained.

* :mod:`.projection` -- per-party training memory (meta device);
* :mod:`.throughput` -- PrivateLoRA serving throughput over a network;
* :mod:`.serving` -- the same under the PrivateLoRA paper's accounting, break-even RTT, rank sweeps;
* :mod:`.steptime` -- PC-MoE training step time over a network, next to centralized, FedAvg, split.

May import: contracts, :mod:`testbed.engine` (device and link profiles) and the
``parties`` modules that define shapes and wire plans.  Never ``testbed.run``,
``attacks`` or the commands.
"""
