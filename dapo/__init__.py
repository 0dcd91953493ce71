"""The DAPO system's libraries and its command line, by floor (see ARCHITECTURE.md):

- ``dapo.transport``, ``dapo.weights``, ``dapo.algorithm``, ``dapo.reward`` (floor 2):
  the bus, the weight sync, the DAPO maths, the rule-based verifiers;
- ``dapo.engines``, ``dapo.data`` (floor 2, above those): inference engines, datasets,
  prompt rendering and the embedded default task;
- ``dapo.runtime`` (floor 3): settings, the service shell, health, the run store;
- ``dapo.cli`` (floor 5, above ``services/``): the ``dapo`` command, the local stack,
  evaluation, scoring, plots and the API client.

Kept free of heavy imports so ``dapo --help`` answers at once.
"""

__version__ = "0.1.0"
