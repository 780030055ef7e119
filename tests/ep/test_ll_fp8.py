"""The fp8 (e4m3) dispatch payload of the low-latency path (IPCDispatcher(payload="fp8")).

# T = num_tokens (a rank's), H = hidden, k = top_k, E = num_experts, W = ep_size, C = capacity, G = H / 128

CPU: the reference quantisation (moecomm.ep.ipc.layout.quantize_fp8_reference) against its
definition; the layout; the kernel entry compiles, uses the saturating e4m3 conversion and takes the
arguments the wrapper passes; IPCDispatcher's own code over the layout model: the experts get
exactly dequantise(quantise(x)), and y equals, bit for bit, the NCCL static mode run on those
dequantised tokens (combine is bf16 either way). GPU (`gpu`): the kernel's bytes and scales equal
the reference quantisation exactly, and the same comparison with the NCCL static mode.
"""

from __future__ import annotations

import ctypes
import re

import pytest
import torch

from moecomm.ep.ipc import IPCDispatcher
from moecomm.ep.ipc import layout as LY
from moecomm.ep.nccl.virtual import virtual_ep_forward
from moecomm.ep.placement import ExpertPlacement
from moecomm.errors import MoeCommTypeError, MoeCommValueError

from test_dispatch import routing, vectorised_expert
from test_ll_dispatch import _kernel_params, _threaded_ipc_run


def _normal(T, H, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g) * torch.logspace(-3, 2, H // 128).repeat_interleave(128)  # groups of very different range
    return x.to(dtype)


def test_reference_quantisation_is_what_its_docstring_says():
    x = _normal(6, 512, 0)
    x[2, 128:256] = 0  # an all-zero group: scale 1, q 0
    x[3, 5] = -1e4  # one outlier: its group's max maps to -448 exactly
    q, s = LY.quantize_fp8_reference(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (6, 512) and s.shape == (6, 4) and s.dtype == torch.float32
    g = x.float().view(6, 4, 128)
    amax = g.abs().amax(2)
    assert torch.equal(s, torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)))
    assert float(s[2, 1]) == 1.0 and (q[2, 128:256].float() == 0).all()
    assert float(q[3, 5].float()) == -448.0
    qf = q.float().view(6, 4, 128)
    assert (qf.abs().amax(2)[amax > 0] == 448.0).all()  # every group's largest element saturates to +-448
    dq = LY.dequantize_fp8_reference(q, s, torch.float32).view(6, 4, 128)
    err = (dq - g).abs()
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normals; subnormals (|q| < 2^-6) 2^-10 * scale absolute
    assert (err <= torch.maximum(g.abs() * 2.0 ** -4, s[:, :, None] * 2.0 ** -9)).all()
    wire = LY.fp8_wire_row(x)
    assert wire.dtype == torch.uint8 and wire.shape == (6, 512 + 16)
    q2, s2 = LY.split_fp8_rows(torch.cat([wire, torch.zeros(6, 16, dtype=torch.uint8)], 1), 512)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)


def test_fp8_layout_napkin_math():
    """T 128, H 7168, top-8, W 8: a row is 7168 e4m3 bytes + 56 scales + 8 ids + 8 weights = 7456 bytes,
    0.52 of bf16's 14400; BACK stays bf16."""
    lay = LY.LLLayout.of(8, 128, 7168, 8, torch.bfloat16, "fp8")
    native = LY.LLLayout.of(8, 128, 7168, 8, torch.bfloat16)
    assert lay.token_bytes == 7168 + 56 * 4 and lay.row_bytes == 7456 and lay.meta_off == 7392
    assert lay.rows.meta_col * 4 == lay.meta_off and lay.wire_dtype == torch.uint8
    assert lay.back_off == 512 + 8 * 128 * 7456 and lay.nbytes == lay.back_off + 8 * 128 * 7168 * 2
    assert lay.nbytes < native.nbytes
    assert IPCDispatcher.buffer_bytes(8, 128, 7168, 8, torch.bfloat16, "fp8") == lay.nbytes


def test_fp8_kernel_compiles_and_saturates(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from moecomm.jit import cuda

    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    if not shutil.which(nvcc):
        pytest.skip("nvcc not found")
    ptx = tmp_path / "ll.ptx"
    subprocess.run([nvcc, "-ptx", "-arch=sm_90a", "-O3", "-std=c++17", "-o", str(ptx), str(cuda.source_path("ep/ll.cu"))],
                   check=True, capture_output=True, timeout=300)
    text = ptx.read_text()
    assert ".entry moecomm_ll_dispatch_fp8" in text and "cvt.rn.satfinite.e4m3x2.f32" in text
    body = text[text.index(".entry moecomm_ll_dispatch_fp8"):]
    body = body[:body.index(".entry", 10)] if ".entry" in body[10:] else body
    assert "div.rn.f32" in body  # IEEE division (not div.approx): the reference's x / scale, bit for bit


def test_fp8_launch_arguments_match_the_kernel_signature(monkeypatch):
    from moecomm.ep.ipc import _cuda
    from moecomm.jit import cuda

    src = cuda.source_path("ep/ll.cu").read_text()
    seen = []
    monkeypatch.setattr(_cuda, "kernel", lambda name, device: lambda grid, block, args: seen.append((name, args)))
    monkeypatch.setattr(_cuda, "_sms", lambda device: 132)
    lay = LY.LLLayout.of(4, 8, 256, 2, torch.bfloat16, "fp8")
    t = torch.zeros
    _cuda.dispatch_cuda(t(5, 256, dtype=torch.bfloat16), t(5, 2, dtype=torch.int32), t(5, 2), t(8, dtype=torch.int32),
                        t(8, dtype=torch.int32), t(4, dtype=torch.int64), t(5, 2, dtype=torch.int32), lay, 1, 10**9, 4)
    (name, args), = seen
    assert name == "moecomm_ll_dispatch_fp8"
    sig = re.search(r"moecomm_ll_dispatch_fp8\((.*?)\)\s*\{", src, re.S).group(1)
    want = ["ptr" if "*" in p else " ".join(p.split()).rsplit(" ", 1)[0] for p in sig.split(",")]
    ctype = {ctypes.c_int: "int", ctypes.c_longlong: "long long"}
    assert ["ptr" if isinstance(a, torch.Tensor) else ctype[type(a)] for a in args] == want
    assert args[13].value == 256 + 8 and args[14].value == lay.row_bytes and args[-1].value == 256  # token_bytes, hidden
    assert _kernel_params(src, "moecomm_ll_dispatch") == want[:-1]  # the native entry: the same less hidden


def test_fp8_argument_errors(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(IPCDispatcher, "_check_hardware", staticmethod(lambda device: None))
    buf = SimpleNamespace(rank=0, world_size=2, nbytes=1 << 22, device=torch.device("cpu"),
                          local=torch.zeros(1 << 22, dtype=torch.uint8), peer_ptrs=torch.zeros(2, dtype=torch.int64),
                          virtual=True)
    with pytest.raises(MoeCommValueError, match="IPCDispatcher: payload must be 'native' or 'fp8', got 'int4'"):
        IPCDispatcher(8, 2, 256, buffer=buf, payload="int4")
    with pytest.raises(MoeCommTypeError, match="payload='fp8' needs dtype bfloat16 .* got torch.float16"):
        IPCDispatcher(8, 2, 256, buffer=buf, dtype=torch.float16, payload="fp8")
    with pytest.raises(MoeCommValueError, match="payload='fp8' needs hidden a multiple of 128 .* got 200"):
        IPCDispatcher(8, 2, 200, buffer=buf, payload="fp8")
    native = IPCDispatcher(8, 2, 256, buffer=buf)
    with pytest.raises(MoeCommValueError, match="IPCDispatcher.received_fp8: payload must be 'fp8', got 'native'"):
        native.received_fp8()


@pytest.mark.parametrize("Ts", [[5, 9], [7, 0, 12, 5]])
def test_fp8_dispatcher_over_the_layout_model(monkeypatch, Ts):
    """IPCDispatcher(payload='fp8') itself, kernels replaced by the model: the experts get exactly the
    dequantised tokens, and y is the NCCL static mode's on those tokens, bit for bit."""
    W, E, k, H = len(Ts), 8, 2, 256
    pl = ExpertPlacement(E, W)
    xs, ids, ws = [], [], []
    for r, T in enumerate(Ts):
        i, w = routing(T, E, k, skew=False, seed=40 + r)
        xs.append(_normal(T, H, seed=r))
        ids.append(i)
        ws.append(w)
    cap = max(Ts)
    out, disps = _threaded_ipc_run(monkeypatch, pl, xs, ids, ws, cap, steps=2, dtype=torch.bfloat16, payload="fp8")
    dq = [LY.dequantize_fp8_reference(*LY.quantize_fp8_reference(x), torch.bfloat16) if x.shape[0] else x for x in xs]
    nccl = virtual_ep_forward(dq, ids, ws, pl, vectorised_expert, capacity=cap)
    for step in range(2):
        for r in range(W):
            got, y = out[(r, step)]
            b = nccl.results[r]
            n = int(b.expert_offsets[-1])
            assert torch.equal(got.gather_idx, b.gather_idx) and torch.equal(got.expert_offsets, b.expert_offsets)
            assert torch.equal(got.tokens[got.gather_idx[:n].long()], b.tokens[b.gather_idx[:n].long()]), (step, r)
            assert torch.equal(y, nccl.y[r]), (step, r)
    q, s = disps[0].received_fp8()
    assert q.shape == (W * cap, H) and s.shape == (W * cap, 2)
    for d in disps:
        d.check_overflow()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [([5, 9], 8, 2, 256), ([64, 3, 1, 128, 0, 77, 128, 9], 256, 8, 7168)])
def test_ll_fp8_virtual_ranks_exact(monkeypatch, shape):
    """W virtual ranks with payload='fp8': every received row's e4m3 bytes and scales equal the CPU
    reference quantisation of the token sent, and y equals the NCCL static mode's on the dequantised tokens."""
    from moecomm.distributed.symmetric import open_virtual
    from moecomm.ep.ipc.virtual import virtual_step

    from test_ll_dispatch import _gpu_expert

    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    Ts, E, k, H = shape
    W, cap = len(Ts), max(Ts)
    pl = ExpertPlacement(E, W)
    xs, ids, ws = [], [], []
    for r, T in enumerate(Ts):
        i, w = routing(T, E, k, skew=True, seed=70 + r)
        xs.append(_normal(T, H, seed=r).cuda())
        ids.append(i.to(torch.int32).cuda())
        ws.append(w.float().cuda())
    bufs = open_virtual(IPCDispatcher.buffer_bytes(W, cap, H, k, torch.bfloat16, "fp8"), W, "cuda")
    disps = [IPCDispatcher(E, k, H, buffer=b, dtype=torch.bfloat16, max_tokens=cap, timeout_s=5.0, payload="fp8")
             for b in bufs]
    streams = [torch.cuda.Stream() for _ in range(W)]
    local = [torch.tensor(pl.local_experts(r) or [0], dtype=torch.long, device="cuda") for r in range(W)]

    def expert(r, d):
        N = d.gather_idx.shape[0]
        e_of_row = local[r][torch.searchsorted(d.expert_offsets[1:].long(), torch.arange(N, device="cuda"),
                                               right=True).clamp(max=max(len(pl.local_experts(r)) - 1, 0))]
        return _gpu_expert(d.tokens[d.gather_idx.long()], e_of_row, d.row_weights)

    try:
        res, ys = virtual_step(disps, streams, xs, ids, ws, expert)
        torch.cuda.synchronize()
        for d in disps:
            d.check_overflow()
        e2r = torch.tensor(pl.expert_to_rank)
        for d in range(W):
            q, s = disps[d].received_fp8()
            for src in range(W):
                toks = [t for t in range(Ts[src]) if (e2r[ids[src][t].long().cpu()] == d).any()]
                if not toks:
                    continue
                rq, rs = LY.quantize_fp8_reference(xs[src].cpu()[toks])
                rows = slice(src * cap, src * cap + len(toks))
                assert torch.equal(q[rows].cpu().view(torch.uint8), rq.view(torch.uint8)), (d, src)
                assert torch.equal(s[rows].cpu(), rs), (d, src)
        dq = [LY.dequantize_fp8_reference(*LY.quantize_fp8_reference(x.cpu()), torch.bfloat16).cuda() for x in xs]
        nccl = virtual_ep_forward(dq, ids, ws, pl, _gpu_expert, capacity=cap)
        for r in range(W):
            assert torch.equal(ys[r], nccl.y[r]), r
    finally:
        for b in bufs:
            b.close()
