"""Every attention kernel variant compiles for Hopper (sm_90) without a GPU; the custom ops work
under torch.compile(fullgraph=True).
"""

from __future__ import annotations


import pytest
import torch


def _sig(kernel, types: dict[str, str]) -> dict[str, str]:
    """Triton signature: pointers from ``types``, the rest i32 / fp32 / constexpr by name."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in types:
            sig[p.name] = types[p.name]
        elif p.name in ("sm_scale", "soft_cap"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


_DIV16 = ("stride_", "off_")  # runtime ints launches specialise as multiples of 16 (and every pointer)


def _compile(kernel, sig, consts, **options):
    """compile_for_hopper with the divisibility-by-16 hints a real launch gives pointers and strides:
    they turn on 16-byte loads and cp.async pipelining, the variants that run on the GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if not p.is_constexpr and (sig[p.name].startswith("*") or p.name.startswith(_DIV16))}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def _compile_all_for_hopper() -> int:
    """Compile the kernel variants the wrappers launch for sm_90; returns how many. No TRITON_INTERPRET."""
    from moecomm.attention import _triton_decode as dk
    from moecomm.attention import _triton_misc as mk
    from moecomm.attention import _triton_prefill as pk
    from moecomm.attention.decode import DECODE_CONFIGS
    from moecomm.attention.prefill import PREFILL_CONFIGS
    from moecomm.testing import compile_for_hopper

    count = 0
    # the plain check (no hints) of the team's helper, once, then the hinted variants
    consts = dict(GROUP=4, PAGE=16, HEAD_DIM=128, BLOCK_G=16, BLOCK_N=64, DIRECT=True, WRITE_LSE=False, SOFT_CAP=False,
                  DOT_PRECISION="tf32", HEADS_FIRST=False)
    compile_for_hopper(dk.decode_kernel, _sig(dk.decode_kernel, {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
                       "out_ptr": "*bf16", "lse_ptr": "*fp32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
                       "meta_ptr": "*i32", "kv_indices_ptr": "*i32"}), consts, num_warps=4)
    count += 1
    for dt in ("bf16", "fp16"):
        ptrs = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "out_ptr": f"*{dt}", "lse_ptr": "*fp32",
                "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "meta_ptr": "*i32", "kv_indices_ptr": "*i32"}
        for head_dim, group, page, direct, soft in ((128, 4, 16, True, False), (128, 8, 16, False, False),
                                                     (64, 1, 1, False, True), (256, 3, 128, True, False), (128, 4, 5, False, False)):
            block_n, warps, stages = DECODE_CONFIGS[head_dim]
            consts = dict(GROUP=group, PAGE=page, HEAD_DIM=head_dim, BLOCK_G=max(16, 1 << (group - 1).bit_length()),
                          BLOCK_N=block_n, DIRECT=direct, WRITE_LSE=True, SOFT_CAP=soft,
                          DOT_PRECISION="tf32", HEADS_FIRST=True)
            k = _compile(dk.decode_kernel, _sig(dk.decode_kernel, ptrs), consts, num_warps=warps, num_stages=stages)
            ptx = k.asm["ptx"]
            assert ".target sm_90" in ptx and "mma" in ptx
            assert stages == 1 or "cp.async" in ptx, "K / V loads are no longer pipelined"
            count += 1
        if dt == "bf16":  # an fp8 cache with bf16 queries
            f8 = dict(ptrs, k_ptr="*fp8e4nv", v_ptr="*fp8e4nv")
            consts = dict(GROUP=4, PAGE=16, HEAD_DIM=128, BLOCK_G=16, BLOCK_N=64, DIRECT=False, WRITE_LSE=True,
                          SOFT_CAP=False, DOT_PRECISION="tf32", HEADS_FIRST=True)
            _compile(dk.decode_kernel, _sig(dk.decode_kernel, f8), consts, num_warps=4, num_stages=3)
            count += 1
        if dt == "bf16":  # fp32 inputs: IEEE dots (no TF32)
            f32 = {n: ("*fp32" if t.startswith("*") and t != "*i32" else t) for n, t in ptrs.items()}
            consts = dict(GROUP=4, PAGE=16, HEAD_DIM=128, BLOCK_G=16, BLOCK_N=64, DIRECT=True, WRITE_LSE=True,
                          SOFT_CAP=False, DOT_PRECISION="ieee", HEADS_FIRST=True)
            _compile(dk.decode_kernel, _sig(dk.decode_kernel, f32), consts, num_warps=4, num_stages=3)
            count += 1
        k = _compile(dk.merge_partials_kernel, _sig(dk.merge_partials_kernel, ptrs), dict(HEAD_DIM=128, WRITE_LSE=True),
                               num_warps=4)
        count += 1
        pptrs = dict(ptrs, mask_ptr="*u8")
        for head_dim, causal, window, custom, page in ((128, True, False, False, 16), (64, False, True, True, 1),
                                                       (256, True, True, False, 128)):
            bm, bn, warps, stages = PREFILL_CONFIGS[head_dim]
            consts = dict(GROUP=4, PAGE=page, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, WINDOW=window,
                          SOFT_CAP=False, CUSTOM=custom, WRITE_LSE=True, DOT_PRECISION="tf32")
            k = _compile(pk.prefill_kernel, _sig(pk.prefill_kernel, pptrs), consts, num_warps=warps, num_stages=stages)
            assert "wgmma" in k.asm["ptx"] and "cp.async" in k.asm["ptx"]
            count += 1
        k = _compile(mk.append_kv_kernel, _sig(mk.append_kv_kernel, {
            "key_ptr": f"*{dt}", "value_ptr": f"*{dt}", "batch_ptr": "*i32", "pos_ptr": "*i32", "k_ptr": f"*{dt}",
            "v_ptr": f"*{dt}", "kv_indices_ptr": "*i32", "kv_indptr_ptr": "*i32", "last_ptr": "*i32"}),
            dict(NUM_HEADS=8, HEAD_DIM=128, PAGE=16, BLOCK_H=8), num_warps=4)
        count += 1
        k = _compile(mk.merge_states_kernel, _sig(mk.merge_states_kernel, {
            "v_ptr": f"*{dt}", "s_ptr": "*fp32", "out_ptr": f"*{dt}", "out_s_ptr": "*fp32", "mask_ptr": "*i8"}),
            dict(HEAD_DIM=128, BLOCK_D=128, HAS_MASK=True), num_warps=1)
        count += 1
        k = _compile(mk.rope_kernel, _sig(mk.rope_kernel, {
            "x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "pos_ptr": "*i32", "inv_freq_ptr": "*fp32"}),
            dict(HEAD_DIM=128, HALF=32, BLOCK_HALF=32, BLOCK_H=8, INTERLEAVE=False, COPY_REST=True, BLOCK_REST=64), num_warps=4)
        count += 1
    return count


def test_kernels_compile_for_hopper():
    """In a fresh process without TRITON_INTERPRET (with it, tl's own @jit helpers are interpreter
    functions and a cold-cache compile fails inside them)."""
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_compile_all_for_hopper") == "27"


def test_torch_compile_fullgraph():
    """Decode and prefill run() and the helpers trace into one graph (the custom ops are opaque nodes)."""
    from attn_helpers import PagedKV, workspace

    import moecomm.attention as A

    cache = PagedKV([5, 20], 2, 64, 8, dtype=torch.float32)
    dec = A.BatchDecodeWithPagedKVCacheWrapper(workspace())
    dec.plan(cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 8, q_data_type=torch.float32, kv_chunk_size=8)
    pre = A.BatchPrefillWithPagedKVCacheWrapper(workspace("cpu", 1))
    qo_indptr = torch.tensor([0, 2, 5], dtype=torch.int32)
    pre.plan(qo_indptr, cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 8, causal=True, q_data_type=torch.float32)

    def step(q, qp):
        o, s = dec.run(q, (cache.k, cache.v), return_lse=True)
        op, _ = pre.run(qp, (cache.k, cache.v), return_lse=True)
        m, _ = A.merge_state(o, s, o, s)
        return m * 2, op.sum()

    q = torch.randn(2, 4, 64)
    qp = torch.randn(5, 4, 64)
    eager = step(q, qp)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(q, qp)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
