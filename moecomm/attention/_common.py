"""Host-side pieces shared by the decode and prefill wrappers: page-table checks, the metadata
staging buffer (one H2D copy per plan), KV-cache checks at run().

# B = batch, P = page_size, Hk = num_kv_heads, D = head_dim

plan() is on the host's critical path once per batch (target <= 30 us for B <= 128): everything
here works on numpy arrays of the host copies of indptr / last_page_len, never on device data,
and the device sees the result through one non-blocking copy of one pinned int32 buffer. The checks
here are also the reference (and the messages) of plan()'s compiled C path (_plan_host).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MoeCommTypeError, MoeCommValueError
from .reference import HND, NHD

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "half": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16}
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_DTYPES.update({"float8_e4m3fn": getattr(torch, "float8_e4m3fn", None), "float8_e5m2": getattr(torch, "float8_e5m2", None),
                "e4m3": getattr(torch, "float8_e4m3fn", None), "e5m2": getattr(torch, "float8_e5m2", None)})


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x (m > 0)."""
    return -(-x // m) * m


_ARANGES = {4: np.arange(1 << 12, dtype=np.int32), 8: np.arange(1 << 12, dtype=np.int64)}  # by itemsize
_INT64 = np.dtype(np.int64)


def arange_view(n: int, dtype: np.dtype = _INT64) -> np.ndarray:
    """np.arange(n) in int32 or int64 as a view of a cached one, grown on demand (plan() builds ids
    every call; a fresh np.arange costs ~1 us; an op mixing int32 and int64 ~1 us more than one in
    a single dtype). Callers read it or copy from it, never write it."""
    a = _ARANGES[dtype.itemsize]
    if n > a.shape[0]:
        a = _ARANGES[dtype.itemsize] = np.arange(2 * n, dtype=a.dtype)
    return a[:n]


def parse_dtype(op: str, name: str, value, default: torch.dtype | None = None, fp8: bool = False) -> torch.dtype:
    if value is None:
        if default is None:
            raise MoeCommTypeError(f"{op}: {name} must be a dtype, got None")
        return default
    if isinstance(value, str):
        dt = _DTYPES.get(value.replace("torch.", ""))
        if dt is None or (dt in FP8_DTYPES and not fp8):
            names = sorted(n for n, d in _DTYPES.items() if d is not None and (fp8 or d not in FP8_DTYPES))
            raise MoeCommTypeError(f"{op}: {name} must be one of {names} or a torch.dtype, got {value!r}")
        return dt
    if not isinstance(value, torch.dtype) or (value not in KV_DTYPES and not (fp8 and value in FP8_DTYPES)):
        allowed = "float16, bfloat16, float32" + (", float8_e4m3fn or float8_e5m2" if fp8 else "")
        raise MoeCommTypeError(f"{op}: {name} must be {allowed}, got {value!r}")
    return value


def check_layout(op: str, kv_layout) -> str:
    if kv_layout not in (NHD, HND):
        raise MoeCommValueError(f"{op}: kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    return kv_layout


_INT_DTYPES = (torch.int32, torch.int64)


def host_ints(op: str, name: str, value) -> np.ndarray:
    """A 1-D int32/int64 numpy view (or copy) of an index tensor / array / list (a CUDA tensor is
    copied: a sync). The common case, a CPU int32 tensor, is three attribute reads and .numpy()."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _INT_DTYPES:
            raise MoeCommTypeError(f"{op}: {name} must have dtype int32 or int64, got {str(value.dtype).replace('torch.', '')}")
        if value.ndim != 1:
            raise MoeCommValueError(f"{op}: {name} must have 1 dimension, got shape {tuple(value.shape)}")
        if not value.is_cpu:
            value = value.cpu()
        return value.numpy()  # int32 or int64, no copy: plan() arithmetic stays below 2**31
    arr = np.asarray(value)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise MoeCommTypeError(f"{op}: {name} must be a 1-D integer tensor, got {type(value).__name__} of shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def check_heads(op: str, num_qo_heads, num_kv_heads, head_dim, page_size, head_dims=(64, 128, 256)) -> None:
    for name, v in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("page_size", page_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise MoeCommTypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise MoeCommValueError(f"{op}: {name} must be >= 1, got {v}")
    if num_qo_heads % num_kv_heads:
        raise MoeCommValueError(f"{op}: num_qo_heads must be a multiple of num_kv_heads ({num_kv_heads}), got {num_qo_heads}")
    if head_dim not in head_dims:
        raise MoeCommValueError(f"{op}: head_dim must be one of {list(head_dims)}, got {head_dim}")
    if page_size > 128:
        raise MoeCommValueError(f"{op}: page_size must be <= 128, got {page_size}")


_UNSIGNED = {4: np.uint32, 8: np.uint64}  # itemsize -> the unsigned view of an int32 / int64 array
_CONSTS: dict = {}


def const(value: int, dtype: np.dtype) -> np.ndarray:
    """A cached 0-d array of ``value`` in ``dtype``, for array-scalar arithmetic in plan().

    numpy 2 prices an operand by its kind: array op Python int ~0.55 us (the weak-scalar casting
    rules), array op 0-d array of the array's own dtype ~0.26 us (B <= 128). Read-only."""
    key = (value, dtype)
    c = _CONSTS.get(key)
    if c is None:
        if len(_CONSTS) > 256:  # chunk sizes that drift over a long run: start over rather than grow
            _CONSTS.clear()
        c = _CONSTS[key] = np.array(value, dtype=dtype)
        c.flags.writeable = False
    return c


_NO_LENGTHS = np.zeros(0, dtype=np.int64)
_NO_LENGTHS.flags.writeable = False


def check_page_table(op: str, indptr: np.ndarray, last_page_len: np.ndarray, num_indices: int, page_size: int,
                     indptr_name: str = "indptr") -> tuple[np.ndarray, bool]:
    """Validate the page table's host copies; return (the KV length of each request [B], whether every
    request has a page, i.e. every length is >= 1).

    Few numpy calls on purpose (plan() has ~30 us: a ufunc reduction costs ~0.9 us, an elementwise op
    ~0.26 us with a same-dtype 0-d operand): one reduction and eight elementwise ops on the common
    path, the detailed message only once a check fails."""
    batch = indptr.shape[0] - 1
    if batch < 0:
        raise MoeCommValueError(f"{op}: {indptr_name} must have batch_size + 1 >= 1 entries, got 0")
    if last_page_len.shape[0] != batch:
        raise MoeCommValueError(f"{op}: last_page_len must have {batch} entries (one per request), got {last_page_len.shape[0]}")
    if indptr.item(0) != 0:
        raise MoeCommValueError(f"{op}: {indptr_name}[0] must be 0, got {indptr.item(0)}")
    if batch == 0:
        return _NO_LENGTHS, True
    if indptr.dtype != last_page_len.dtype:  # one dtype below (an in-place op would truncate int64 into int32)
        indptr, last_page_len = indptr.astype(np.int64), last_page_len.astype(np.int64)
    pages = indptr[1:] - indptr[:-1]
    dt = pages.dtype
    pm1 = pages - const(1, dt)  # >= 0 for a request with pages
    lm1 = last_page_len - const(1, dt)  # in [0, P - 1]
    # one reduction for the bounds: pages >= 0 and pm1 >= 0 (pages >= 1: or'ing pages too keeps
    # pages = -2**31, whose pm1 wraps, out), lm1 >= 0 and P - 1 - lm1 >= 0 hold for every request iff
    # their bitwise or is >= 0 (a negative number has the sign bit, an or of non-negative ones has
    # not; lm1 >= 0 keeps P - 1 - lm1 from wrapping). The ufunc's reduce, not ndarray.min (its Python
    # wrapper costs ~0.5 us).
    bits = pm1 | pages
    bits |= lm1
    bits |= const(page_size - 1, dt) - lm1
    full = bool(np.minimum.reduce(bits) >= 0)
    if full:  # every request has pages and a valid last page (the common case)
        lengths = pm1 * const(page_size, dt)  # (pages - 1) * P + last
        lengths += last_page_len
    else:
        if np.minimum.reduce(pages) < 0:
            b = int(np.argmax(pages < 0))
            raise MoeCommValueError(f"{op}: {indptr_name} must be non-decreasing, got {indptr_name}[{b + 1}] = "
                                    f"{int(indptr[b + 1])} < {indptr_name}[{b}] = {int(indptr[b])}")
        _bad_last(op, pages, last_page_len, page_size)
        lengths = np.where(pages > 0, (pages - 1) * page_size + last_page_len, 0)
    if indptr.item(-1) > num_indices:
        raise MoeCommValueError(f"{op}: indices must hold {indptr_name}[-1] = {indptr.item(-1)} page ids, got {num_indices}")
    return lengths, full


def _bad_last(op, pages, last_page_len, page_size):
    bad = (pages > 0) & ((last_page_len < 1) | (last_page_len > page_size))
    if bad.any():
        b = int(np.argmax(bad))
        raise MoeCommValueError(f"{op}: last_page_len must be in [1, page_size = {page_size}] for a request with pages, "
                                f"got last_page_len[{b}] = {int(last_page_len[b])}")


def check_indices(op: str, indices, num_pages: int | None) -> tuple[int | None, np.ndarray | None]:
    """Range-check host page ids (device ids are not read, not even their size's worth of checks:
    the kernels clamp them); return (their maximum, their host array), (None, None) for ids on the
    device. One pass, no copy: the max over the ids viewed as unsigned (a negative id shows as
    >= 2**31); the min / argmin only once that pass found a bad id."""
    if isinstance(indices, torch.Tensor) and not indices.is_cpu:
        if indices.dtype not in _INT_DTYPES:
            raise MoeCommTypeError(f"{op}: indices must have dtype int32 or int64, got {str(indices.dtype).replace('torch.', '')}")
        return None, None
    arr = host_ints(op, "indices", indices)
    if arr.shape[0] == 0:
        return -1, arr
    hi = np.maximum.reduce(arr.view(_UNSIGNED[arr.itemsize])).item()
    if hi >= 2**31:
        if int(arr.min()) < 0:
            raise MoeCommValueError(f"{op}: indices must be >= 0 (page ids), got {int(arr.min())} at position {int(np.argmin(arr))}")
        raise MoeCommValueError(f"{op}: indices must be < 2**31, got {int(arr.max())}")
    if num_pages is not None and hi >= num_pages:
        raise MoeCommValueError(f"{op}: indices must be < num_pages ({num_pages}), got {hi} at position {int(np.argmax(arr))}")
    return hi, arr


class Staging:
    """Pinned host int32 buffers and one device twin: plan() writes numpy, then one copy.

    Pinned, not pageable: a copy from pageable memory may wait for all the work queued on the stream
    (CUDA's "API synchronization behavior"), which would take away the host's lead over the GPU. A
    pinned buffer may be rewritten only once its previous copy has left it: a ring of _RING host
    buffers, so that plan() waits (if ever) on copies of several plans ago, never on the one it
    queued just before.

    Driver calls: on the sandboxed H200 host one costs several us (~10 us measured once), more than
    most of plan()'s Python; a plan makes one (its copy) plus, per _GROUP plans, one event record and
    one event query, instead of a record and a query per plan. The ring is _RING // _GROUP groups of
    _GROUP buffers; entering a group records one event on the stream of the group just left (it
    follows, in stream order, every copy queued out of that group) and waits on the event of the
    group being entered (recorded _RING - _GROUP plans ago; queried first, so that a done copy costs
    one query and no synchronize). Recording on entry, not after a group's last copy, keeps the
    guard even when a plan raised between its ensure() and its upload(). A caller who switches
    streams inside a group gets one extra event on the stream left, guarding that group's earlier
    copies (stream order holds only within a stream).

    Host cost (plan() has <= 30 us in all): everything a plan would rebuild is cached here: the slices
    copied (per ring slot, sizes rounded up to _QUANTUM ints, so a plan of a similar size reuses its
    views; the extra <= 16 KB cost ~0.3 us of PCIe), the numpy view of each slot, and the stream the
    event is recorded on (torch.cuda.current_stream() builds a Python object per call: the raw handle
    is compared instead, and the Stream rebuilt only when the caller switched streams).

    The device calls are the methods _new_host, _new_dev, _new_event, _copy, _current_handle and
    _current_stream, so that a test can stand in for them on a machine without a GPU.
    """

    _GROUP = 4
    _RING = 8
    _QUANTUM = 4096  # ints (16 KB)

    def __init__(self, device: torch.device, size: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.size = 0
        self._raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._device_index = (device.index if device.index is not None else torch.cuda.current_device()) if self.cuda else 0
        self._stream = None
        self._stream_handle = None
        self._grow(size)

    # the device calls (see the class docstring)
    def _new_host(self, size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.int32, pin_memory=True)

    def _new_dev(self, size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.int32, device=self.device)

    def _new_event(self):
        return torch.cuda.Event()

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def _current_handle(self):
        """The current stream's raw handle (no Python Stream object), None where torch has no such call."""
        return self._raw_stream(self._device_index) if self._raw_stream is not None else None

    def _current_stream(self):
        return torch.cuda.current_stream(self.device)

    def _grow(self, size: int) -> None:
        size = max(int(size), 64)
        ring = self._RING if self.cuda else 1
        self._hosts = [self._new_host(size) if self.cuda else torch.zeros(size, dtype=torch.int32) for _ in range(ring)]
        self._host_nps = [t.numpy() for t in self._hosts]
        self._host_ptrs = [t.data_ptr() for t in self._hosts]  # for plan()'s C path (_plan_host)
        # the old buffers' copies may still be in flight: torch's pinned allocator keeps each one until
        # the streams that copied from it are past that point, so the guards of the old ring can go
        num_groups = max(ring // self._GROUP, 1)
        self._guards: list[list] = [[] for _ in range(num_groups)]  # events to pass before rewriting a group
        self._group_events: list = [None] * num_groups  # each group's own event, recorded when it is left
        self._copy_views: list[dict] = [{} for _ in range(ring)]
        self._slot = 0
        self.host = self._hosts[0]
        self.host_np = self._host_nps[0]
        self.host_ptr = self._host_ptrs[0]
        self.dev = self._new_dev(size) if self.cuda else self.host
        self.size = size
        self._dev_views: dict = {}

    def ensure(self, size: int) -> bool:
        """Make room for ``size`` ints and pick the host buffer to write (``host_np``, at address
        ``host_ptr``); True when the buffers were reallocated (views of the old ones are stale)."""
        if size > self.size:
            self._grow(max(size, 2 * self.size))
            return True
        if self.cuda:
            slot = self._slot = (self._slot + 1) % self._RING
            self.host = self._hosts[slot]
            self.host_np = self._host_nps[slot]
            self.host_ptr = self._host_ptrs[slot]
            if slot % self._GROUP == 0:
                self._enter_group(slot // self._GROUP)
        return False

    def _enter_group(self, group: int) -> None:
        left = (group - 1) % len(self._guards)
        if self._stream is not None:  # one event after every copy queued out of the group just left
            ev = self._group_events[left]
            if ev is None:
                ev = self._group_events[left] = self._new_event()
            ev.record(self._stream)
            self._guards[left].append(ev)
        guards = self._guards[group]
        for ev in guards:
            if not ev.query():
                ev.synchronize()  # copies of _RING - _GROUP plans ago still in flight: a host far ahead
        guards.clear()

    def dev_view(self, start: int, stop: int) -> torch.Tensor:
        """dev[start:stop], cached (a torch slice costs ~1.5 us of host time; plans repeat their layout)."""
        v = self._dev_views.get((start, stop))
        if v is None:
            if len(self._dev_views) > 64:
                self._dev_views.clear()
            v = self._dev_views[(start, stop)] = self.dev[start:stop]
        return v

    def upload(self, n: int) -> None:
        """Queue the copy of the first ``n`` ints of the current host buffer to ``dev`` (current stream)."""
        if not self.cuda:
            return
        n = min(-(-max(n, 1) // self._QUANTUM) * self._QUANTUM, self.size)
        views = self._copy_views[self._slot]
        pair = views.get(n)
        if pair is None:
            if len(views) > 64:  # sizes that drift over a long run: start over rather than grow
                views.clear()
            pair = views[n] = (self.dev[:n], self.host[:n])
        self._copy(pair[0], pair[1])
        handle = self._current_handle()
        if handle is None or handle != self._stream_handle:
            stream = self._current_stream()
            if self._stream is not None and stream != self._stream and self._slot % self._GROUP:
                # this group's earlier copies went to the stream left: they get their own guard
                ev = self._new_event()
                ev.record(self._stream)
                self._guards[self._slot // self._GROUP].append(ev)
            self._stream, self._stream_handle = stream, handle


def check_kv_cache(op: str, paged_kv_cache, kv_layout: str, num_kv_heads: int, head_dim: int, page_size: int,
                   kv_dtype: torch.dtype, device: torch.device):
    """(k_cache, v_cache) of run(), checked against the plan; shapes / dtypes only (no device read)."""
    if isinstance(paged_kv_cache, torch.Tensor):
        if paged_kv_cache.dim() != 5 or paged_kv_cache.shape[1] != 2:
            raise MoeCommValueError(f"{op}: paged_kv_cache must be a (k_cache, v_cache) tuple or one tensor of shape "
                                    f"[num_pages, 2, ...], got shape {list(paged_kv_cache.shape)}")
        k, v = paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    elif isinstance(paged_kv_cache, (tuple, list)) and len(paged_kv_cache) == 2:
        k, v = paged_kv_cache
    else:
        raise MoeCommTypeError(f"{op}: paged_kv_cache must be a (k_cache, v_cache) tuple or a tensor, "
                               f"got {type(paged_kv_cache).__name__}")
    want = (page_size, num_kv_heads, head_dim) if kv_layout == NHD else (num_kv_heads, page_size, head_dim)
    for name, t in (("k_cache", k), ("v_cache", v)):
        # the common case in one comparison per property (run() is on every layer's host path)
        if type(t) is torch.Tensor and t.shape[1:] == want and t.dtype is kv_dtype and t.stride(3) == 1 and (
                t.device == device or t.device.type == device.type == "cuda"):
            continue
        if not isinstance(t, torch.Tensor):
            raise MoeCommTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or tuple(t.shape[1:]) != want:
            dims = "[num_pages, page_size, num_kv_heads, head_dim]" if kv_layout == NHD else "[num_pages, num_kv_heads, page_size, head_dim]"
            raise MoeCommValueError(f"{op}: {name} must have shape {dims} = [*, {', '.join(map(str, want))}] "
                                    f"({kv_layout}, as planned), got {list(t.shape)}")
        if t.dtype is not kv_dtype:
            raise MoeCommTypeError(f"{op}: {name} must have dtype {str(kv_dtype).replace('torch.', '')} (planned kv_data_type), "
                                   f"got {str(t.dtype).replace('torch.', '')}")
        if t.stride(3) != 1:
            raise MoeCommValueError(f"{op}: {name} must be contiguous along head_dim (stride 1), got stride {t.stride(3)}")
        if t.device != device and not (t.device.type == device.type == "cuda"):
            raise MoeCommValueError(f"{op}: {name} must be on device {device}, got {t.device}")
    if k.shape[0] != v.shape[0]:
        raise MoeCommValueError(f"{op}: v_cache must have as many pages as k_cache ({k.shape[0]}), got {v.shape[0]}")
    return k, v


def nhd_strides(t: torch.Tensor, kv_layout: str) -> tuple[int, int, int]:
    """(stride of a page, of a token slot, of a head) of a cache in either layout."""
    if kv_layout == NHD:
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 / H200: plans made on CPU split as they would there


def outputs(op: str, q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None, return_lse: bool,
            rows: int, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """run()'s outputs: ``out`` like q (head_dim contiguous) and, with return_lse, ``lse`` [rows, heads]
    fp32 contiguous; the caller's tensors when given (checked), new ones otherwise."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype is not q.dtype or out.stride(2) != 1:
        raise MoeCommValueError(f"{op}: out must be a {str(q.dtype).replace('torch.', '')} tensor of shape {list(q.shape)} "
                                f"with head_dim contiguous, got {str(out.dtype).replace('torch.', '')} {list(out.shape)}")
    if return_lse:
        if lse is None:
            lse = torch.empty((rows, heads), dtype=torch.float32, device=q.device)
        elif lse.shape != (rows, heads) or lse.dtype is not torch.float32 or not lse.is_contiguous():
            raise MoeCommValueError(f"{op}: lse must be a contiguous float32 tensor of shape [{rows}, {heads}], "
                                    f"got {str(lse.dtype).replace('torch.', '')} {list(lse.shape)}")
    return out, lse


# ----------------------------------------------------------------------------- prefill's host metadata


def pages_consecutive(indptr: np.ndarray, indices: np.ndarray) -> bool:
    """Whether every request's page ids are consecutive (p, p + 1, ...): its KV is then one run of
    token rows of the cache, which v2's TMA path reads. A shuffled table is rejected on the first
    request's first two and last ids (scalar reads, < 1 us), a consecutive one costs one pass over
    the ids (~4 numpy calls)."""
    batch = indptr.shape[0] - 1
    nnz = indptr.item(-1) if batch > 0 else 0
    if nnz == 0:
        return True
    s0, e0 = indptr.item(0), indptr.item(1)
    if e0 - s0 > 1 and (indices.item(s0 + 1) - indices.item(s0) != 1 or
                        indices.item(e0 - 1) - indices.item(s0) != e0 - s0 - 1):
        return False
    bad = (indices[1:nnz] - indices[:nnz - 1]) != 1  # [nnz - 1] steps; those across a boundary do not count
    ends = indptr[1:]
    bad[ends[(ends > 0) & (ends < nnz)] - 1] = False
    return not bad.any()


def _pack_custom_mask(op, custom_mask, packed_custom_mask, qo_lens, kv_lens):
    """(uint8 bits, per-request bit offsets): each request's [qo_len, kv_len] bits start on a byte
    (FlashInfer's packed layout: segment b at byte sum_{c<b} ceil(qo_c * kv_c / 8))."""
    sizes = qo_lens * kv_lens
    nbytes = (sizes + 7) // 8
    byte_off = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(nbytes, out=byte_off[1:])
    if packed_custom_mask is not None:
        packed = packed_custom_mask.cpu().numpy() if isinstance(packed_custom_mask, torch.Tensor) else np.asarray(packed_custom_mask)
        if packed.dtype != np.uint8 or packed.ndim != 1 or packed.shape[0] < byte_off[-1]:
            raise MoeCommValueError(f"{op}: packed_custom_mask must be 1-D uint8 with >= {int(byte_off[-1])} bytes "
                                    f"(each request's qo_len * kv_len bits, byte-aligned), got {packed.dtype} {packed.shape}")
        bits = packed[: byte_off[-1]]
    else:
        flat = custom_mask.cpu().numpy() if isinstance(custom_mask, torch.Tensor) else np.asarray(custom_mask)
        flat = flat.reshape(-1).astype(bool)
        if flat.shape[0] != int(sizes.sum()):
            raise MoeCommValueError(f"{op}: custom_mask must hold sum(qo_len * kv_len) = {int(sizes.sum())} entries "
                                    f"(each request's mask, row-major, concatenated), got {flat.shape[0]}")
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        bits = np.zeros(int(byte_off[-1]), dtype=np.uint8)
        for b in range(len(sizes)):
            seg = np.packbits(flat[starts[b]:starts[b + 1]], bitorder="little")
            bits[byte_off[b]:byte_off[b] + seg.shape[0]] = seg
    if byte_off[-1] * 8 >= 2**31:
        raise MoeCommValueError(f"{op}: custom_mask must hold < 2**31 bits, got {int(byte_off[-1] * 8)}")
    return bits, byte_off[:-1] * 8
