"""Shared infrastructure of the DAPO system: bus, settings, embedded Redis,
health and metrics helpers, weight sync, the local launcher and the ``dapo`` CLI.

Kept free of heavy imports so ``dapo --help`` answers at once.
"""

__version__ = "0.1.0"
