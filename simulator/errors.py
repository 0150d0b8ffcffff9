"""The simulator's one user-facing error (its own module, so that ``python -m
simulator.cli`` and ``simulator.replay.cli`` raise and catch the same class)."""


class SimulateError(Exception):
    """A bad option or input; the message says which and why."""
