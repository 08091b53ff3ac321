"""The composition root: scenario + protocol roles + engine + capture (+ attacks) -> a run
directory.

* :mod:`.runner` -- ``run_scenario`` and the pieces the container processes reuse
  (roles, endpoints, budgets);
* :mod:`.capture` -- writes what crossed the wire (index + safetensors);
* :mod:`.summary` -- the summary printed at the end of a run;
* :mod:`.sweep` -- several scenarios, each in its own process.

May import: everything below it (contracts, ``testbed.engine``, ``parties``, ``attacks``).
Nothing below imports it; the container processes and the commands above do.
"""
