"""Effects that protocol roles yield; engines interpret them (the sans-IO pattern).

A role is a generator.  It never touches a socket or a clock: it yields

* ``Send(dst, message)``      -- hand a message to the network (returns immediately),
* ``Recv(src=None, kind=None)`` -- block until a matching message arrives; the
  engine sends the decoded :class:`~testbed.engine.codec.Message` back into the generator,
* ``Compute(flops=..., bytes=..., seconds=...)`` -- modelled compute on top of the
  measured time the role spent running,
* ``Log(record)``             -- a metrics record (loss, eval loss, ...).

The SimPy engine turns these into simulated time on modelled links; the container
engine turns them into real network I/O.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

from .codec import Message


@dataclass
class Send:
    dst: str
    message: Message


@dataclass
class Recv:
    src: Optional[str] = None
    kind: Optional[str] = None


@dataclass
class Compute:
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class Log:
    record: dict = field(default_factory=dict)


Effect = Any  # one of Send, Recv, Compute, Log
