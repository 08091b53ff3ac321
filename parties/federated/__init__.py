"""Federated protocols: every party holds a full model copy; a coordinator aggregates.

* :mod:`.rounds` -- the shared round structure (sampling, weighted mean, evaluation);
* :mod:`.fedavg`, :mod:`.fedsgd` -- what a party sends and how the average is applied;
* :mod:`.dp` -- DP-SGD through Opacus for whatever a party trains (split learning uses it).

May import: contracts, :mod:`testbed.engine`, ``parties`` helpers.
"""
