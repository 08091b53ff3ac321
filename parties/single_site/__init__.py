"""Single-site baselines: nothing crosses a wire.

* :mod:`.centralized` -- one site holds every party's data (the quality upper bound);
* :mod:`.local` -- each party trains alone on its own shard (the lower bound).

May import: contracts, ``parties`` helpers.
"""
