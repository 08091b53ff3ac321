"""What a protocol role runs on: effects, the wire codec, the SimPy engine, links, devices
and memory accounting.

* :mod:`.effects` -- ``Send``, ``Recv``, ``Compute``, ``Log``: what a role yields;
* :mod:`.codec` -- the wire format every message goes through (compact binary header + raw tensors);
* :mod:`.sim` -- the embedded engine: roles as SimPy processes on a simulated clock;
* :mod:`.links`, :mod:`.devices` -- link and device profiles and their time models;
* :mod:`.memory` -- per-role accelerator memory (parameters, gradients, optimizer,
  activations) and budgets.

May import: :mod:`testbed.errors`, :mod:`testbed.units` and third-party packages only --
never ``parties``, ``attacks`` or any other part of ``testbed``.
"""
