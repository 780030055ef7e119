"""Low-latency expert-parallel dispatch/combine inside a node, over symmetric (CUDA IPC) buffers.

Its parts: layout.py (the byte layout of a rank's buffer, with its napkin math, and a pure-torch
model of what each kernel writes where), _cuda.py (launch wrappers of kernels/ep/ll.cu),
dispatcher.py (IPCDispatcher: the API, handle and results of EPDispatcher's static mode), choose.py
(which path a step takes), node.py (NodeDispatcher: a layer's dispatcher that takes it per step).
"""

from .choose import PathChoice, choose_ep_path
from .dispatcher import IPCDispatcher
from .node import NodeDispatcher

__all__ = ["IPCDispatcher", "NodeDispatcher", "PathChoice", "choose_ep_path"]
