"""Functions run on every rank by tests/distributed/test_symmetric.py (module level, so spawn can pickle them)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist


class _Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def eligibility_decisions(scenario):
    """The eligibility decision over a gloo group with the facts and the probe mocked (no GPU here):
    cached after the first call (the probe runs once), a refusal logged once."""
    from moecomm.distributed import symmetric as S

    rank = dist.get_rank()
    calls = {"probe": 0}
    S.torch.cuda.is_available = lambda: True  # this child process only
    hosts = {"ok": "node0", "probe_fails": "node0", "hosts_differ": f"node{rank}", "shared_gpu": "node0"}
    uuid = "GPU-0" if scenario == "shared_gpu" else f"GPU-{rank}"
    S._local_facts = lambda group, device: (hosts[scenario], uuid)
    S._peer_access = lambda device, uuids: tuple(True for _ in uuids)

    def probe(group, device):
        calls["probe"] += 1
        return "rank 1 read wrong bytes from rank 0's buffer" if scenario == "probe_fails" else None

    S.probe = probe
    handler = _Count()
    logging.getLogger("moecomm").addHandler(handler)
    dev = torch.device("cuda", 0)
    first = S.eligibility(None, device=dev)
    second = S.eligibility(None, device=dev)
    return dict(ok=first.ok, reason=first.reason, same=first is second, probes=calls["probe"],
                warnings=[m for m in handler.messages if "IPC buffers are not used" in m])


def exchange_on_one_gpu(rounds):
    """Two processes on ONE GPU: open a symmetric buffer, write a rank pattern, read the peer's through
    its IPC mapping (no spin-waits: a host barrier orders the writes and the reads); then open and
    close ``rounds`` times and report the device's free memory before and after."""
    from moecomm.distributed import open_symmetric

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    rank, world = dist.get_rank(), dist.get_world_size()
    nbytes = (1 << 20) + 3
    got = {}
    with open_symmetric(nbytes, device=dev) as buf:
        assert buf.rank == rank and buf.world_size == world and buf.local.numel() == nbytes
        assert buf.local.data_ptr() % 128 == 0 and buf.ptrs[rank] == buf.local.data_ptr()
        zero = bool((buf.local == 0).all())
        i = torch.arange(nbytes, device=dev)
        buf.local.copy_((i * 3 + 11 * (rank + 1)) % 256)
        torch.cuda.synchronize()
        dist.barrier()
        for r in range(world):
            want = ((i * 3 + 11 * (r + 1)) % 256).to(torch.uint8)
            got[r] = bool(torch.equal(buf.peer_view(r), want))
        torch.cuda.synchronize()
        dist.barrier()
    closed_raises = False
    try:
        buf.local
    except Exception:
        closed_raises = True
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info(dev)[0]
    for _ in range(rounds):
        b = open_symmetric(8 << 20, device=dev)
        b.close()
        b.close()  # idempotent
    torch.cuda.synchronize()
    free1 = torch.cuda.mem_get_info(dev)[0]
    return dict(zero=zero, got=got, closed_raises=closed_raises, free_before=free0, free_after=free1)


def real_eligibility_on_one_gpu():
    """Two processes on one GPU: the real facts refuse IPC kernels (a shared GPU would deadlock them),
    while the real probe (no spin-waits) succeeds: handles open and bytes read back."""
    from moecomm.distributed import symmetric as S

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    e = S.eligibility(None, device=dev)
    return dict(ok=e.ok, reason=e.reason, probe=S.probe(None, dev))


def custom_allreduce_fallback_cpu():
    """CustomAllReduce on CPU tensors over gloo: not eligible (no CUDA), every call is torch.distributed's."""
    from moecomm.allreduce import Algo, CustomAllReduce

    rank = dist.get_rank()
    ar = CustomAllReduce(device="cpu", max_size=1 << 16)
    x = torch.arange(6, dtype=torch.float32).view(2, 3) * (rank + 1)
    y = ar.all_reduce(x)
    out = torch.full_like(x, float("nan"))
    y2 = ar.all_reduce(x, out=out)
    res = torch.ones(2, 3)
    w = torch.full((3,), 2.0)
    o, r = ar.all_reduce_residual_rmsnorm(x, res, w, 1e-6)
    errors = []
    for bad in (lambda: ar.all_reduce(x.int()), lambda: ar.all_reduce(x, out=torch.zeros(3)),
                lambda: ar.all_reduce_residual_rmsnorm(x, res, torch.ones(4), 1e-6)):
        try:
            bad()
        except Exception as exc:
            errors.append(str(exc))
    ar.check()
    ar.close()
    return dict(ipc=ar.ipc, path=ar.path_for(64) is Algo.NCCL, reason=ar.eligibility.reason, y=y.tolist(),
                same_out=y2 is out, out=out.tolist(), o=o.tolist(), r=r.tolist(), errors=errors)
