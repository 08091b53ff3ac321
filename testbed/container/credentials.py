"""The run's credentials for plain ``docker compose up``: made once, when absent.

    SCENARIO=scenarios/pcmoe-tiny.yaml CREDENTIALS_DIR=/credentials python -m testbed.container credentials

compose.yaml's one-shot ``credentials`` service runs this into the ``credentials``
volume before anything else starts: a fresh per-run CA and one certificate per process
(:func:`testbed.net.identity.make_credentials`), so there is no public default to forge
frames with.  ``python -m testbed up`` makes its own on the host instead and gives each
container only its own key as compose ``secrets:`` (:mod:`testbed.container.render`).
"""
from parties.base import party_name
from testbed.net.identity import has_credentials, make_credentials

from .process import COORDINATOR


def process_names(n_parties):
    """Every process of a run with ``n_parties`` party containers."""
    return [COORDINATOR, *(party_name(i) for i in range(n_parties))]


def ensure_credentials(directory, n_parties):
    """Make the run's credentials in ``directory`` unless all of them are there; returns a line
    saying which."""
    names = process_names(n_parties)
    if has_credentials(directory, names):
        return f"credentials for {len(names)} processes present in {directory}"
    make_credentials(directory, names)
    return f"made a CA and credentials for {len(names)} processes in {directory}"
