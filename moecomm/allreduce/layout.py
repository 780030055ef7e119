"""The symmetric buffer's layout and the algorithm thresholds of the IPC all-reduce (pure, CPU-testable).

Layout of every rank's buffer (kernels/allreduce/sync.cuh holds the same numbers; a CPU test reads
them from the header and compares):

    [0, 4 * MAX_BLOCKS)                          uint32 epoch[block]: calls completed (no reset needed)
    [FLAGS_OFFSET, + 4 * 3 * MAX_BLOCKS * MAX_PEERS)  uint32 flag[phase][block][src rank]
    [INV_OFFSET, + 4 * MAX_NORM_ROWS)            fp32 1/rms of this rank's rows (two-shot fused RMSNorm)
    [HEADER_BYTES, + max_size)                   staging: this rank's input, copied in by the kernel itself
                                                 (or by the host when the input is not 16-byte aligned)

Thresholds (bytes of one rank's input; W = world_size):
    nbytes <= oneshot_max  -> one-shot (every rank reads all W inputs: 1 kernel, 2 barriers)
    nbytes <= max_size     -> two-shot (reduce-scatter + all-gather: 3 barriers, (W-1)/W * 2 n over NVLink)
    above                  -> NCCL (torch.distributed.all_reduce)
Default oneshot_max: vLLM's measured crossover on 8x H100/H200 NVLink, 512 KB at 2-4 ranks and
256 KB at 8 (at 8 ranks one-shot reads 7 n over NVLink against 1.75 n: it loses earlier). The
multi-GPU issue re-measures them; on one H200 with 8 virtual ranks (benchmarks/RESULTS.md,
2026-12-01) one-shot beat two-shot at 256 KB (8.3 vs 10.6 us) and lost at 1 MB (19.3 vs 11.2):
consistent with 256 KB at 8, so nothing argues for moving them. Until then they are vLLM's,
overridable per instance (CustomAllReduce(oneshot_max_bytes=...)) or for the process
(MOECOMM_ALLREDUCE_ONESHOT_BYTES).
"""

from __future__ import annotations

import enum

from .. import _env

MAX_PEERS = 32
MAX_BLOCKS = 256
COUNTERS_OFFSET = 0
FLAGS_OFFSET = 4096
HEADER_BYTES = 131072
INV_OFFSET = 102400
MAX_NORM_ROWS = 7168  # rows of one rank's shard in the two-shot fused RMSNorm (the inv slots)
NUM_PHASES = 3
PHASES = ("start", "mid", "end")
ERR_WORDS = 4
THREADS = 512
ALIGN = 128
DEFAULT_MAX_SIZE = 8 << 20  # bytes per rank: 8 MB, vLLM's default buffer

ONESHOT_MAX_BY_WORLD = {1: 512 << 10, 2: 512 << 10, 4: 512 << 10, 8: 256 << 10}


class Algo(enum.Enum):
    """Which path one all-reduce call takes."""

    ONESHOT = "oneshot"
    TWOSHOT = "twoshot"
    NCCL = "nccl"


def buffer_bytes(max_size: int) -> int:
    """Bytes of one rank's symmetric buffer for inputs up to ``max_size`` bytes (header + staging)."""
    return HEADER_BYTES + -(-max_size // ALIGN) * ALIGN


def default_oneshot_max(world_size: int) -> int:
    """The one-shot threshold in bytes at ``world_size`` ranks: MOECOMM_ALLREDUCE_ONESHOT_BYTES when
    set, else vLLM's (512 KB up to 4 ranks, 256 KB above; 3 ranks as 4, 5-7 as 8)."""
    env = _env.allreduce_oneshot_bytes()
    if env is not None:
        return env
    if world_size <= 4:
        return ONESHOT_MAX_BY_WORLD[4]
    return ONESHOT_MAX_BY_WORLD[8]


def choose_algo(nbytes: int, oneshot_max: int, max_size: int) -> Algo:
    """The path of a call moving ``nbytes`` per rank (see the module docstring)."""
    if nbytes <= oneshot_max and nbytes <= max_size:
        return Algo.ONESHOT
    if nbytes <= max_size:
        return Algo.TWOSHOT
    return Algo.NCCL


def pack_elems(element_size: int) -> int:
    """Elements per 16-byte pack (8 bf16/fp16, 4 fp32)."""
    return 16 // element_size


def grid_blocks(algo: Algo, n: int, element_size: int, world_size: int, max_blocks: int, *, rows: int = 0) -> int:
    """Blocks per rank of a launch (the same on every rank: it depends only on the call's sizes).

    one-shot: one thread per 16-byte pack of the whole input; two-shot: of one shard; rmsnorm
    (rows > 0): one block per row, of all rows (ONESHOT) or of one shard of ceil(rows / W) rows
    (TWOSHOT); each capped at ``max_blocks``.
    """
    pack = pack_elems(element_size)
    if rows:
        work_blocks = rows if algo is Algo.ONESHOT else -(-rows // world_size)
    else:
        packs = -(-n // pack)
        if algo is Algo.TWOSHOT:
            packs = -(-(n // pack) // world_size) or 1
        work_blocks = -(-packs // THREADS)
    return max(1, min(work_blocks, max_blocks, MAX_BLOCKS))
