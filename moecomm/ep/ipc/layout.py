"""Where the low-latency path puts things in each rank's symmetric buffer, and a pure-torch model of it.

# T = num_tokens (a rank's), H = hidden, k = top_k, E = num_experts, W = ep_size, C = capacity
# (rows a rank sends one peer per call), e = bytes per token element

Every rank's buffer (offsets in bytes; kernels/ep/ll.cu's struct Ctrl is the same table):

    CTRL   0 .. 512       disp_flag[32] @0, disp_cnt[32] @128, comb_flag[32] @256: slot s written by
                          rank s (its epoch, the rows it sent us); this rank's own words: disp_epoch
                          @384, comb_epoch @388, disp_ticket @392, comb_ticket @396, error_mask @400,
                          error_phase @404 (1 dispatch, 2 combine), overflow @408
    RECV   512 ..         [W][C] rows of row_bytes: row (s, slot) is the slot-th token rank s sent us
                          (token order), in the NCCL path's RowLayout: H elements padded to 4 bytes,
                          then k int32 local expert ids (-1: a slot of another rank) and k fp32 weights
    BACK   (16-aligned)   [W][C] rows of H elements: row (r, slot) is rank r's sum, over its local
                          experts, of the expert outputs of the slot-th row we sent it

Napkin math at T 128, H 7168, top-8 of 256, W 8, bf16, C = max_tokens = 128 (never overflows):
row_bytes = 7168 * 2 + 2 * 8 * 4 = 14400; RECV = 8 * 128 * 14400 = 14.7 MB, BACK = 8 * 128 * 14336
= 14.7 MB: ~29.4 MB a rank, one set shared by every MoE layer (they run one after another). A call
moves less: each token reaches ~5.3 of 8 ranks (a rank holds 32 of its 256 experts; 8 * (1 - (7/8)^8)),
so each rank's dispatch writes ~128 * 5.3 * 14.4 KB = 9.8 MB (~1.2 MB per peer; 78 MB over the node)
and its combine about as much back; a rank receives ~8 * 128 * 0.66 = 676 of its 1024 RECV rows.
A smaller C (capacity_per_peer) shrinks the buffer, not the traffic.

The model (send_reference / receive_reference / combine_send_reference / combine_wait_reference) writes, with torch ops on
plain uint8 tensors standing for the W buffers, exactly the bytes the kernels write: the CPU tests
run it for W virtual ranks and compare with moecomm.ep.reference and the NCCL static mode, so the
layout logic is checked without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nccl.plan import RowLayout

CTRL_BYTES = 512
MAX_PEERS = 32  # the CTRL arrays' length
DISP_FLAG, DISP_CNT, COMB_FLAG = 0, 128, 256
DISP_EPOCH, COMB_EPOCH, DISP_TICKET, COMB_TICKET = 384, 388, 392, 396
ERROR_MASK, ERROR_PHASE, OVERFLOW = 400, 404, 408
MAX_WORLD_SIZE = 8  # one node of NVLink; the kernels' masks would take 32
MAX_TOKENS = 1024  # LL_MAX_T in ll.cu: the plan of a call lives in one block's shared memory
FP8_GROUP = 128  # columns per fp32 scale of the fp8 payload (DeepEP's and DeepSeek-V3's block)
FP8_MAX = 448.0  # the largest finite e4m3 (float8_e4m3fn)
FP8_MAX_HIDDEN = 16384  # LL_FP8_MAX_H in ll.cu: a token's quantised row is staged in shared memory


def quantize_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, H] float8_e4m3fn, scales [T, H / 128] fp32) as ll_dispatch's fp8 payload computes them.

    Per token and 128 columns: amax of |x| (fp32), scale = amax / 448 (1 where amax is 0), q = the
    round-to-nearest-even e4m3 of x / scale, saturated to +-448 (the kernel's cvt.rn.satfinite; the
    clamp keeps torch's cast from turning a value that rounds past 448 into NaN). fp32 division, as
    the kernel's IEEE ``/`` (no fast-math): bit for bit the kernel's bytes.
    """
    T, H = x.shape
    g = x.float().reshape(T, H // FP8_GROUP, FP8_GROUP)
    amax = g.abs().amax(dim=2)
    # a tensor divisor, not a Python scalar: torch's CUDA division by a scalar multiplies by its
    # reciprocal (not IEEE-exact), the kernel's a / 448.0f is a true division
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    q = (g / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(T, H)
    return q, scale


def dequantize_fp8_reference(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, H] of ``dtype`` = q * scale (fp32, rounded once to dtype): what dispatch_finish hands the experts."""
    R, H = q.shape
    v = q.float().reshape(R, H // FP8_GROUP, FP8_GROUP) * scales.float()[:, :, None]
    return v.reshape(R, H).to(dtype)


def fp8_wire_row(x: torch.Tensor) -> torch.Tensor:
    """[T, H + H / 32] uint8: the token part of fp8 RECV rows (e4m3 bytes, then the fp32 scales' bytes)."""
    q, s = quantize_fp8_reference(x)
    return torch.cat([q.view(torch.uint8), s.contiguous().view(torch.uint8)], dim=1)


def split_fp8_rows(recv: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [R, H] float8_e4m3fn, scales [R, H / 128] fp32) views of fp8 RECV rows [R, width] uint8."""
    G = hidden // FP8_GROUP
    q = recv[:, :hidden].view(torch.float8_e4m3fn)
    return q, recv[:, hidden:hidden + 4 * G].view(torch.float32)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class LLLayout:
    """The byte layout of one rank's buffer (module docstring).

    Attributes:
        world_size, capacity, hidden, top_k, dtype: W, C, H, k and the token dtype.
        rows: RowLayout of a RECV row (the NCCL path's).
        row_bytes: bytes of a RECV row; token_bytes: its token part (H * e; fp8: H + H / 32);
            meta_off: the ids' byte offset in a row; payload: "native" or "fp8".
        recv_off, back_off: where RECV and BACK start; nbytes: the whole buffer.
    """

    world_size: int
    capacity: int
    hidden: int
    top_k: int
    dtype: torch.dtype
    rows: RowLayout
    row_bytes: int
    token_bytes: int
    meta_off: int
    recv_off: int
    back_off: int
    nbytes: int
    payload: str = "native"

    @staticmethod
    def of(world_size: int, capacity: int, hidden: int, top_k: int, dtype: torch.dtype,
           payload: str = "native") -> LLLayout:
        """payload "native": RECV rows carry the tokens in ``dtype``; "fp8": H e4m3 bytes, then H / 128
        fp32 scales (one per 128 columns, H % 128 == 0), as one uint8 "token" of H + H / 32 bytes
        (RowLayout over uint8: the ids start at the same place the expansion looks for them)."""
        es = dtype.itemsize
        if payload == "fp8":
            rows = RowLayout.of(hidden + hidden // FP8_GROUP * 4, top_k, torch.uint8)
            row_bytes, token_bytes = rows.width, rows.token_cols
        else:
            rows = RowLayout.of(hidden, top_k, dtype)
            row_bytes, token_bytes = rows.width * es, hidden * es
        recv_off = CTRL_BYTES
        back_off = _align(recv_off + world_size * capacity * row_bytes, 16)
        nbytes = _align(back_off + world_size * capacity * hidden * es, 16)
        return LLLayout(world_size, capacity, hidden, top_k, dtype, rows, row_bytes, token_bytes, rows.meta_col * 4,
                        recv_off, back_off, nbytes, payload)

    @property
    def wire_dtype(self) -> torch.dtype:
        """The dtype of RECV's rows: the token dtype, or uint8 for the fp8 payload."""
        return torch.uint8 if self.payload == "fp8" else self.dtype

    def recv(self, buf: torch.Tensor) -> torch.Tensor:
        """[W * C, width] view (wire dtype) of RECV in ``buf`` (a rank's uint8 buffer)."""
        n = self.world_size * self.capacity
        return buf[self.recv_off:self.recv_off + n * self.row_bytes].view(self.wire_dtype).view(n, self.rows.width)

    def back(self, buf: torch.Tensor) -> torch.Tensor:
        """[W * C, H] view of BACK in ``buf``."""
        n = self.world_size * self.capacity
        return buf[self.back_off:self.back_off + n * self.back_row_bytes].view(self.dtype).view(n, self.hidden)

    @property
    def back_row_bytes(self) -> int:
        """Bytes of a BACK row: H elements of the token dtype, whatever the dispatch payload."""
        return self.hidden * self.dtype.itemsize

    @staticmethod
    def word(buf: torch.Tensor, offset: int, count: int = 1) -> torch.Tensor:
        """[count] int32 view of CTRL words at byte ``offset`` of ``buf``."""
        return buf[offset:offset + 4 * count].view(torch.int32)


# ----------------------------------------------------------------------------- the model of the kernels


def plan_reference(topk_ids: torch.Tensor, expert_to_rank: torch.Tensor, world_size: int, capacity: int):
    """(dest [T, W] bool, slot [T, W] int64, home [T, k] int32, wanted [W] int64) as ll_dispatch computes them.

    dest[t, d]: token t goes to rank d (the dedup: once, whatever the number of its experts there);
    slot[t, d]: its place among this rank's tokens to d, token order; home[t, j] = d * C + slot for
    the first slot j of the token on each rank d when slot < C, else -1; wanted[d]: rows for d.
    """
    T, k = topk_ids.shape
    E = expert_to_rank.shape[0]
    rank = expert_to_rank[topk_ids.long().clamp(0, E - 1)].long()  # [T, k]
    dest = torch.zeros(T, world_size, dtype=torch.bool, device=topk_ids.device)
    dest.scatter_(1, rank, True)
    slot = torch.cumsum(dest.long(), 0) - dest.long()  # [T, W] exclusive
    earlier = torch.triu(torch.ones(k, k, dtype=torch.bool, device=topk_ids.device), diagonal=1)
    owner = ~((rank[:, :, None] == rank[:, None, :]) & earlier[None]).any(dim=1)  # [T, k]
    s = slot.gather(1, rank)  # [T, k]
    home = torch.where(owner & (s < capacity), rank * capacity + s, -1).to(torch.int32)
    return dest, slot, home, dest.long().sum(0)


def send_reference(bufs: list[torch.Tensor], lay: LLLayout, rank: int, x: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, expert_to_rank: torch.Tensor, expert_to_local: torch.Tensor,
                   home: torch.Tensor, epoch: int) -> None:
    """Rank ``rank``'s dispatch stores (ll_dispatch steps 1-3) into the W buffers ``bufs`` (uint8).

    Writes each sent row into bufs[d]'s RECV row (rank, slot), disp_cnt[rank] and disp_flag[rank]
    of every peer, home [T, k] and this rank's overflow word.
    """
    W, C, k = lay.world_size, lay.capacity, lay.top_k
    E = expert_to_rank.shape[0]
    dest, slot, h, wanted = plan_reference(topk_ids, expert_to_rank, W, C)
    home.copy_(h)
    if bool((wanted > C).any()):
        lay.word(bufs[rank], OVERFLOW).fill_(1)
    ids = topk_ids.long().clamp(0, E - 1)
    rank_of = expert_to_rank[ids].long()  # [T, k]
    local = expert_to_local[ids].to(torch.int32)
    wbits = topk_weights.float().contiguous().view(torch.int32)
    wire = fp8_wire_row(x) if lay.payload == "fp8" else None
    for d in range(W):
        recv = lay.recv(bufs[d])
        meta = recv.view(torch.int32)
        for t in torch.nonzero(dest[:, d] & (slot[:, d] < C)).flatten().tolist():
            row = rank * C + int(slot[t, d])
            if lay.payload == "fp8":
                recv[row, :lay.token_bytes] = wire[t]
            else:
                recv[row, :lay.hidden] = x[t]
            mine = rank_of[t] == d
            meta[row, lay.rows.meta_col:lay.rows.meta_col + k] = torch.where(mine, local[t], -1)
            meta[row, lay.rows.meta_col + k:lay.rows.meta_col + 2 * k] = torch.where(mine, wbits[t], 0)
        lay.word(bufs[d], DISP_CNT + 4 * rank).fill_(min(int(wanted[d]), C))
        lay.word(bufs[d], DISP_FLAG + 4 * rank).fill_(epoch)


def receive_reference(buf: torch.Tensor, lay: LLLayout, epoch: int) -> None:
    """ll_dispatch step 4 on one rank's buffer: peers whose flag is behind ``epoch`` are recorded in
    error_mask (phase 1) and count as empty; rows past each peer's count get ids -1."""
    W, C, k = lay.world_size, lay.capacity, lay.top_k
    flags = lay.word(buf, DISP_FLAG, W)
    cnt = lay.word(buf, DISP_CNT, W).clone()
    late = (flags - epoch) < 0
    if bool(late.any()):
        mask = int(sum(1 << s for s in range(W) if late[s]))
        lay.word(buf, ERROR_MASK).bitwise_or_(mask)
        lay.word(buf, ERROR_PHASE).fill_(1)
        cnt[late] = 0
        lay.word(buf, DISP_CNT, W)[late] = 0  # combine's count of a late peer: 0 as well
    cnt = cnt.clamp(0, C)
    meta = lay.recv(buf).view(torch.int32)[:, lay.rows.meta_col:lay.rows.meta_col + k]  # [W * C, k]
    slot = torch.arange(W * C, device=buf.device) % C
    src = torch.arange(W * C, device=buf.device) // C
    meta[slot >= cnt.long()[src]] = -1
    lay.word(buf, DISP_EPOCH).fill_(epoch)


def combine_send_reference(bufs: list[torch.Tensor], lay: LLLayout, rank: int, expert_out: torch.Tensor,
                           slot_pos: torch.Tensor, epoch: int) -> None:
    """Rank ``rank``'s combine stores: for each row (s, slot) received in the matching dispatch, the
    sum over its slots j of expert_out[slot_pos[row, j]] (fp32, j order, rounded once) into bufs[s]'s
    BACK row (rank, slot); then comb_flag[rank] of every peer."""
    W, C = lay.world_size, lay.capacity
    N = expert_out.shape[0]
    cnt = lay.word(bufs[rank], DISP_CNT, W).tolist()
    sp = slot_pos.long()
    for s in range(W):
        back = lay.back(bufs[s])
        for slot in range(min(cnt[s], C)):
            row = s * C + slot
            acc = torch.zeros(lay.hidden, dtype=torch.float32, device=expert_out.device)
            for j in range(sp.shape[1]):
                p = int(sp[row, j])
                if 0 <= p < N:
                    acc += expert_out[p].float()
            back[rank * C + slot] = acc.to(lay.dtype)
        lay.word(bufs[s], COMB_FLAG + 4 * rank).fill_(epoch)


def combine_wait_reference(buf: torch.Tensor, lay: LLLayout, epoch: int) -> None:
    """ll_combine's wait on one rank's buffer: peers whose comb_flag is behind ``epoch`` are recorded in
    error_mask (phase 2) and contribute 0: their C rows of this rank's BACK are zeroed (not left
    from an earlier call); then comb_epoch = epoch."""
    W, C = lay.world_size, lay.capacity
    late = (lay.word(buf, COMB_FLAG, W) - epoch) < 0
    if bool(late.any()):
        lay.word(buf, ERROR_MASK).bitwise_or_(int(sum(1 << s for s in range(W) if late[s])))
        lay.word(buf, ERROR_PHASE).fill_(2)
        back = lay.back(buf)
        for s in range(W):
            if late[s]:
                back[s * C:(s + 1) * C] = 0
    lay.word(buf, COMB_EPOCH).fill_(epoch)
