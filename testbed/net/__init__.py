"""Roles over real sockets: the framed TCP transport and the engine that drives roles on it.

* :mod:`.identity` -- the per-run CA, one certificate per process, mutual-TLS contexts;
* :mod:`.frames` -- one size-bounded frame inside a TLS connection;
* :mod:`.outbox` -- one peer's outgoing connection and its link emulation;
* :mod:`.transport` -- a process's endpoint (``Node``): listener, authentication, caps
  and deadlines, reader threads, one outbox per peer;
* :mod:`.engine` -- the container engine: the same role generators the SimPy engine
  runs, driven by real message arrival.

May import: :mod:`testbed.errors`, :mod:`testbed.units`, :mod:`testbed.engine`.  Knows
nothing of protocols, attacks or containers.
"""
