"""Testbed for privacy-preserving collaborative training of LLMs.

Run a scenario:  python -m testbed run scenarios/quickstart.yaml
"""

__version__ = "0.1.0"
