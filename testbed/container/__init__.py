"""Container mode: one container per party plus a coordinator, real TCP between them.

    python -m testbed up scenarios/<name>.yaml                 # everything, see testbed/cli/up.py
    SCENARIO=scenarios/<name>.yaml docker compose up           # the committed compose.yaml

Entry points (``python -m testbed.container prepare|coordinator|party``, configured by
environment variables, :mod:`testbed.container.settings`):

* :mod:`~testbed.container.prepare`: split the data into per-party shards;
* :mod:`~testbed.container.coordinator`: registration, the server-side roles, the run directory;
* :mod:`~testbed.container.party`: one party's role;

built on :mod:`testbed.net.transport` (frames) and :mod:`testbed.net.engine` (effects),
with :mod:`~testbed.container.shaping` (tc), :mod:`~testbed.container.merge` (parts ->
one run directory) and :mod:`~testbed.container.render` (per-party compose services).
"""
