"""Testbed for privacy-preserving collaborative training of LLMs.

Run a scenario:  python -m testbed run scenarios/quickstart.yaml

The house, lowest layer first (a lower layer never imports a higher one;
``tests/test_layering.py`` keeps it so):

* contracts every layer may read: :mod:`testbed.errors`, :mod:`testbed.units`,
  :mod:`testbed.scenario` (the scenario schema) and :mod:`testbed.rundir` (the run
  directory's files);
* :mod:`testbed.engine` -- what a protocol role runs on: effects, wire codec, the SimPy
  engine, links, devices, memory accounting;
* ``parties/`` (protocols) and ``attacks/`` (reconstruction attacks) build on those;
* :mod:`testbed.net` -- the TCP transport and the engine that runs roles over it;
* :mod:`testbed.costs` -- analytic models for real shapes (memory projection, serving);
* :mod:`testbed.report` -- reads run directories only;
* :mod:`testbed.run` -- the composition root: scenario + protocols + engine + capture
  (+ attacks) -> a run directory; sweeps;
* :mod:`testbed.container` -- coordinator and party processes, compose rendering;
* :mod:`testbed.cli` and :mod:`testbed.regress` -- the commands.
"""

__version__ = "0.1.0"
