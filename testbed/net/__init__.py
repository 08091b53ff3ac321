"""Roles over real sockets: the framed TCP transport and the engine that drives roles on it.

* :mod:`.frames` -- one authenticated, size-bounded frame;
* :mod:`.transport` -- a process's endpoint (``Node``): listener, reader threads, one
  outbox per peer, link emulation;
* :mod:`.engine` -- the container engine: the same role generators the SimPy engine
  runs, driven by real message arrival.

May import: :mod:`testbed.errors`, :mod:`testbed.units`, :mod:`testbed.engine`.  Knows
nothing of protocols, attacks or containers.
"""
