"""A tiny base for value objects on the per-connection path.

Why not dataclasses: ``import dataclasses`` pulls in ``inspect`` and costs about
15 ms here, more than the whole start-up budget of the wrapper (a bare
interpreter starts in about 10 ms); generating ``__init__`` with ``exec`` as
dataclasses does still cost 0.3 ms a class at every start. So a class that
derives from :class:`Value` lists its fields in ``__slots__``, writes its own
plain ``__init__`` (fast in the simulator's hot loop too), and gets from here
what a dataclass would add: equality, hashing and a readable repr.
The simulator and admin commands, which start once, use real dataclasses.
"""

from __future__ import annotations


class Value:
    """Fields are the ``__slots__`` of the subclass; instances compare by value."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self.__slots__))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({inner})"
