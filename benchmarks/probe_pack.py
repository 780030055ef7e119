"""pack_send's and gather_sum's device time against a copy of the same bytes, per launch
configuration (one GPU).

    python -m benchmarks.probe_pack            # T 8192, H 4096, top-8 of 64, W 1 and 8, bf16

# T = tokens, H = hidden, k = top_k, E = experts, W = ranks the plan is made for, S = rows sent

The throughput mode's pack reads T rows of x and writes S rows of width H + 2k (tokens and their
metadata); the baseline copies the same S * width elements (device copy, same dtype). Graph replay,
20 calls a replay; a control row times the default configuration twice.
"""

from __future__ import annotations

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_pack times GPU kernels: it needs a CUDA GPU (none is visible here)")
        return 2
    from moecomm.ep.nccl import _triton as K  # Triton: only where the kernels run
    from moecomm.ep.nccl.plan import RowLayout, pack_send, plan_send
    from moecomm.ep.placement import ExpertPlacement
    from moecomm.testing import graph_bench
    dev = torch.device("cuda")
    T, H, E, k = 8192, 4096, 64, 8
    g = torch.Generator().manual_seed(0)
    w, ids = torch.rand(T, E, generator=g).softmax(-1).topk(k, dim=1)
    ids, w = ids.to(torch.int32).to(dev), w.float().to(dev)
    x = torch.randn(T, H, device=dev).to(torch.bfloat16)
    for W in (1, 8):
        pl = ExpertPlacement(E, W)
        e2r, e2l = pl.expert_to_rank_tensor(dev), pl.expert_to_local_tensor(dev)
        plan = plan_send(ids, e2r, e2l, W)
        S = int(plan.rank_offsets[-1])
        lay = RowLayout.of(H, k, x.dtype)
        out = torch.empty(S, lay.width, dtype=x.dtype, device=dev)
        home = torch.empty(T, k, dtype=torch.int32, device=dev)
        src = torch.empty_like(out)
        copy = graph_bench(lambda: out.copy_(src), [()], replays=30).median_ms * 1e3
        print(f"W{W}: S {S} rows of {lay.width}; copy of the same bytes {copy:.1f} us")
        configs = [(None, None), (1024, 4), (2048, 4), (4096, 8), (None, None)]
        for bh, nw in configs:
            K.PACK_BLOCK_H, K.PACK_NUM_WARPS = bh, nw
            t = graph_bench(lambda: pack_send(x, w, plan, lay, out, home), [()], replays=30).median_ms * 1e3
            print(f"  pack BLOCK_H {bh or 'default'} warps {nw or 'default'}: {t:.1f} us ({copy / t:.0%} of copy)")
        K.PACK_BLOCK_H = K.PACK_NUM_WARPS = None
    # the receiver's sum over its local experts (combine, C = k): reads N rows, writes R
    R, N = 4096, 4096 * k
    src = torch.randn(N, H, device=dev).to(torch.bfloat16)
    idx = torch.randperm(N, device=dev).to(torch.int32).view(R, k)
    out = torch.empty(R, H, dtype=src.dtype, device=dev)
    nbytes = (N + R) * H * 2
    a = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    copy = graph_bench(lambda: b.copy_(a), [()], replays=30).median_ms * 1e3
    print(f"gather_sum C{k}: R {R} rows from N {N}; copy of the same bytes {copy:.1f} us")
    for bh, nw in [(None, 4), (1024, 4), (2048, 4), (2048, 8), (4096, 8), (512, 4), (None, 4)]:
        t = graph_bench(lambda: K.gather_sum_triton(src, idx, out, block_h=bh, num_warps=nw), [()],
                        replays=30).median_ms * 1e3
        print(f"  gather_sum BLOCK_H {bh or 'default'} warps {nw}: {t:.1f} us ({copy / t:.0%} of copy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
