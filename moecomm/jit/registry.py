"""Integer handles for stateful objects that a custom op must find: what an op schema can carry.

A custom op's schema takes tensors and scalars, not Python objects, so an op that runs on a
stateful object (an all-reduce's IPC buffers, a dispatcher's static buffers) takes an ``int``
handle and looks the object up here, as vLLM's custom all-reduce finds its communicator by group
name. Under torch.compile the handle is a constant of the graph (dynamo guards on it).

    REG = Registry("moecomm.allreduce")
    self._handle = REG.add(self)              # at construction
    obj = REG.get(handle, "ipc_all_reduce")    # inside the op
    REG.remove(self._handle)                   # at close()

Entries are weak references: a graph that outlives its object raises a clear error instead of
keeping the object's GPU memory alive.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

from ..errors import MoeCommValueError

__all__ = ["Registry"]


class Registry:
    """A map from int handles to live objects (weakly held).

    Args:
        what: the objects' kind, named in errors (e.g. "CustomAllReduce").
    """

    def __init__(self, what: str):
        self.what = what
        self._objs: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._next = itertools.count(1)

    def add(self, obj: Any) -> int:
        """Register ``obj``; returns its handle (an int > 0, never reused in this process)."""
        h = next(self._next)
        self._objs[h] = obj
        return h

    def remove(self, handle: int) -> None:
        """Forget ``handle`` (idempotent)."""
        self._objs.pop(handle, None)

    def get(self, handle: int, op: str) -> Any:
        """The object of ``handle``; raises MoeCommValueError naming ``op`` when it is gone."""
        obj = self._objs.get(handle)
        if obj is None:
            raise MoeCommValueError(f"{op}: handle must name a live {self.what}, got {handle} (closed or garbage-"
                                    "collected: a compiled graph must not outlive the object it was traced with)")
        return obj
