"""Fused routing kernels: one launch per call, one block of tokens per program.

# T = num_tokens, E = num_experts, k = top_k, G = n_group, S = E // G (experts per group)
# BLOCK_T tokens per program; BLOCK_E = next_pow2(E); BLOCK_G = next_pow2(G); BLOCK_S = next_pow2(S)

Why fused: the torch path is softmax -> topk -> sum -> div (and for DeepSeek a dozen more ops), each
a launch that re-reads [T, E]. Routing is tiny work (T * E scores), so launches dominate; here each
program loads its BLOCK_T rows once, keeps the whole row of scores in registers, and writes only
ids and weights: the minimum traffic is T*E*2 bytes in (bf16) plus T*k*8 bytes out.

Top-k is k rounds of "argmax over what is still available": max, then the lowest index holding
that max (the rule of reference.py: ties to the lowest expert index), then mark it taken. A row
whose max matches nothing (NaN, which compares unequal to everything) takes its lowest available
index instead, so ids stay in range and distinct whatever the input; weights there are NaN.

Loads are upcast to fp32 before any arithmetic (the interpreter computes bf16 wrongly, and the
routers of transformers compute in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..jit.launch import cdiv, launch, next_pow2
from .reference import empty_route_outputs

# Scores held per program: BLOCK_T * BLOCK_E fp32 values over 4 warps (128 threads) = 16 registers
# per thread at 2048, leaving room for the taken mask and the compare/select temporaries.
_ELEMS_PER_PROGRAM = 2048
_MAX_BLOCK_T = 64
_NUM_WARPS = 4


@triton.jit
def route_softmax_topk_kernel(
    logits_ptr, ids_ptr, weights_ptr,
    num_tokens, num_experts,
    stride_lt, stride_le, stride_it, stride_wt,
    routed_scaling_factor,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    rows64 = rows.to(tl.int64)  # T * stride can pass 2**31
    cols = tl.arange(0, BLOCK_E)  # [BE]
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    x = tl.load(
        logits_ptr + rows64[:, None] * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)  # [BT, BE]
    x = tl.where(col_ok[None, :], x, float("-inf"))  # padding experts: probability exactly 0
    row_max = tl.max(x, axis=1)  # [BT]
    e = tl.exp(x - row_max[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]  # [BT, BE], as torch.softmax in fp32

    kcols = tl.arange(0, BLOCK_K)
    out_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    out_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    avail = col_ok[None, :] & (rows >= 0)[:, None]  # [BT, BE]
    for k in range(TOP_K):
        cand = tl.where(avail, probs, float("-inf"))
        best = tl.max(cand, axis=1)  # [BT]
        idx = tl.min(tl.where(avail & (cand == best[:, None]), cols[None, :], BLOCK_E), axis=1)
        first_free = tl.min(tl.where(avail, cols[None, :], BLOCK_E), axis=1)
        idx = tl.where(idx < BLOCK_E, idx, first_free)  # NaN rows: no value equals the max
        sel = cols[None, :] == idx[:, None]  # [BT, BE] one-hot
        w = tl.sum(tl.where(sel, probs, 0.0), axis=1)  # [BT]
        avail = avail & (sel == 0)
        out_ids = tl.where(kcols[None, :] == k, idx[:, None], out_ids)
        out_w = tl.where(kcols[None, :] == k, w[:, None], out_w)

    if RENORMALIZE:
        out_w = out_w / tl.sum(out_w, axis=1)[:, None]  # padded k columns hold 0
    out_w = out_w * routed_scaling_factor
    kmask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(ids_ptr + rows64[:, None] * stride_it + kcols[None, :], out_ids, mask=kmask)
    tl.store(weights_ptr + rows64[:, None] * stride_wt + kcols[None, :], out_w, mask=kmask)


@triton.jit
def route_grouped_topk_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr,
    num_tokens,
    stride_lt, stride_le, stride_b, stride_it, stride_wt,
    routed_scaling_factor, renorm_eps,
    NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Scores live as [BT, BG, BS] so that per-group reductions are plain axis-2 reductions, for any
    # G and S (E = 60 in 4 groups of 15 is padded to 4 x 16, not to 64 flat columns).
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    rows64 = rows.to(tl.int64)
    row_ok = rows < num_tokens
    g = tl.arange(0, BLOCK_G)  # [BG]
    s = tl.arange(0, BLOCK_S)  # [BS]
    col = g[:, None] * GROUP_SIZE + s[None, :]  # [BG, BS] expert index
    col_ok = (g[:, None] < NUM_GROUPS) & (s[None, :] < GROUP_SIZE)  # [BG, BS]
    col3 = col[None, :, :]
    ok3 = col_ok[None, :, :] & (rows >= 0)[:, None, None]  # [BT, BG, BS]
    x = tl.load(
        logits_ptr + rows64[:, None, None] * stride_lt + col3 * stride_le,
        mask=row_ok[:, None, None] & col_ok[None, :, :], other=0.0,
    ).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-x))  # sigmoid, fp32 [BT, BG, BS]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col * stride_b, mask=col_ok, other=0.0).to(tl.float32)  # [BG, BS]
        choice = scores + bias[None, :, :]
    else:
        choice = scores
    choice = tl.where(ok3, choice, float("-inf"))

    # group score = sum of the group's top-2 biased scores (top-1 for one-expert groups)
    m1 = tl.max(choice, axis=2)  # [BT, BG]
    if GROUP_SIZE > 1:
        i1 = tl.min(tl.where(choice == m1[:, :, None], s[None, None, :], BLOCK_S), axis=2)
        m2 = tl.max(tl.where(s[None, None, :] == i1[:, :, None], float("-inf"), choice), axis=2)
        group_scores = m1 + m2
    else:
        group_scores = m1

    # keep the TOPK_GROUP best groups (ties to the lowest group index)
    g_avail = (g < NUM_GROUPS)[None, :] & (rows >= 0)[:, None]  # [BT, BG]
    kept = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int32)
    for _ in range(TOPK_GROUP):
        cand = tl.where(g_avail, group_scores, float("-inf"))
        best = tl.max(cand, axis=1)
        gi = tl.min(tl.where(g_avail & (cand == best[:, None]), g[None, :], BLOCK_G), axis=1)
        first_free = tl.min(tl.where(g_avail, g[None, :], BLOCK_G), axis=1)
        gi = tl.where(gi < BLOCK_G, gi, first_free)
        gsel = g[None, :] == gi[:, None]
        kept = tl.where(gsel, 1, kept)
        g_avail = g_avail & (gsel == 0)

    # top-k over the experts of kept groups, by biased score; weight = unbiased score
    BIG: tl.constexpr = BLOCK_G * BLOCK_S
    kcols = tl.arange(0, BLOCK_K)
    out_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    out_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    avail = ok3 & (kept[:, :, None] != 0)
    for k in range(TOP_K):
        cand = tl.where(avail, choice, float("-inf"))
        best = tl.max(tl.max(cand, axis=2), axis=1)  # [BT]
        hit = avail & (cand == best[:, None, None])
        idx = tl.min(tl.min(tl.where(hit, col3, BIG), axis=2), axis=1)
        first_free = tl.min(tl.min(tl.where(avail, col3, BIG), axis=2), axis=1)
        idx = tl.where(idx < BIG, idx, first_free)
        # ok3: a padding slot can carry the same flat index as a real expert of the next group
        sel = ok3 & (col3 == idx[:, None, None])
        w = tl.sum(tl.sum(tl.where(sel, scores, 0.0), axis=2), axis=1)
        avail = avail & (sel == 0)
        out_ids = tl.where(kcols[None, :] == k, idx[:, None], out_ids)
        out_w = tl.where(kcols[None, :] == k, w[:, None], out_w)

    if RENORMALIZE:
        out_w = out_w / (tl.sum(out_w, axis=1)[:, None] + renorm_eps)
    out_w = out_w * routed_scaling_factor
    kmask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(ids_ptr + rows64[:, None] * stride_it + kcols[None, :], out_ids, mask=kmask)
    tl.store(weights_ptr + rows64[:, None] * stride_wt + kcols[None, :], out_w, mask=kmask)


def block_tokens(padded_row: int) -> int:
    """Tokens per program so that one program holds about _ELEMS_PER_PROGRAM scores."""
    return max(1, min(_MAX_BLOCK_T, _ELEMS_PER_PROGRAM // padded_row))


def softmax_topk_launch_config(num_experts: int, top_k: int) -> dict[str, int]:
    """The constexprs of route_softmax_topk_kernel for this problem (also used by the sm_90 compile test)."""
    block_e = next_pow2(num_experts)
    return {"BLOCK_T": block_tokens(block_e), "BLOCK_E": block_e, "BLOCK_K": next_pow2(top_k)}


def grouped_topk_launch_config(num_experts: int, n_group: int, top_k: int) -> dict[str, int]:
    """The constexprs of route_grouped_topk_kernel that depend on the shape."""
    block_g = next_pow2(n_group)
    block_s = next_pow2(num_experts // n_group)
    return {
        "BLOCK_T": block_tokens(block_g * block_s), "BLOCK_G": block_g, "BLOCK_S": block_s,
        "BLOCK_K": next_pow2(top_k),
    }


def route_softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, routed_scaling_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch route_softmax_topk_kernel; arguments already validated by api.route."""
    num_tokens, num_experts = router_logits.shape
    ids, weights = empty_route_outputs(router_logits, top_k)
    if num_tokens == 0:
        return ids, weights
    cfg = softmax_topk_launch_config(num_experts, top_k)
    grid = (cdiv(num_tokens, cfg["BLOCK_T"]),)
    launch(route_softmax_topk_kernel, grid, (
        router_logits, ids, weights, num_tokens, num_experts,
        router_logits.stride(0), router_logits.stride(1), ids.stride(0), weights.stride(0),
        float(routed_scaling_factor),
    ), {"TOP_K": top_k, "RENORMALIZE": bool(renormalize), **cfg}, _NUM_WARPS)
    return ids, weights


def route_grouped_topk(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
    renorm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch route_grouped_topk_kernel; arguments already validated by api.route."""
    num_tokens, num_experts = router_logits.shape
    ids, weights = empty_route_outputs(router_logits, top_k)
    if num_tokens == 0:
        return ids, weights
    cfg = grouped_topk_launch_config(num_experts, n_group, top_k)
    has_bias = e_score_correction_bias is not None
    bias = e_score_correction_bias if has_bias else router_logits  # never read when HAS_BIAS is False
    grid = (cdiv(num_tokens, cfg["BLOCK_T"]),)
    launch(route_grouped_topk_kernel, grid, (
        router_logits, bias, ids, weights, num_tokens,
        router_logits.stride(0), router_logits.stride(1), bias.stride(0) if has_bias else 0,
        ids.stride(0), weights.stride(0),
        float(routed_scaling_factor), float(renorm_eps),
    ), {"NUM_GROUPS": n_group, "GROUP_SIZE": num_experts // n_group, "TOP_K": top_k, "TOPK_GROUP": topk_group,
        "HAS_BIAS": has_bias, "RENORMALIZE": bool(renormalize), **cfg}, _NUM_WARPS)
    return ids, weights
