"""The public sampling functions: validate once, resolve the randomness, run one op.

# B = output rows (batch), R = distinct distributions (rows of probs/logits), V = vocab

Names, arguments and returns follow flashinfer.sampling (0.7.2) so that switching is an import.
Differences, all documented per function: the kept-set rule with ties (reference.py), one seed
per row leaving the row index out of the random stream, bad rows flagged instead of undefined,
``deterministic`` accepted and ignored (every kernel here is deterministic), and the default
randomness below (a graph replay draws fresh numbers, torch.compile(fullgraph=True) traces it).

Randomness, in order:
- ``seed`` (int, or int64 tensor [1] or [B]) and ``offset`` (same; default 0): used as given. A
  [B] seed is a per-request seed: the row index is then left out of the counter, so a request's
  tokens depend on its own seed and offset only, whatever its batch neighbours. With tensors
  nothing is read on the host: update ``offset`` in place between CUDA-graph replays for fresh
  numbers (or use the default below).
- otherwise ``generator`` (or torch's default generator of the device) decides, one of two ways:
  - an eager call on a CUDA tensor of the current device, not under CUDA-graph capture
    (torch.cuda.is_current_stream_capturing()) nor torch.compile (torch.compiler.is_compiling()):
    the generator's Philox state, read on the host where torch keeps it (no device read):
    seed = generator.initial_seed(), offset = generator.get_offset(), and the generator's offset
    advanced by 4 (generator.set_offset), as a torch op drawing a few numbers advances it. So
    torch.manual_seed(s) fixes every token, each call gets fresh numbers, and the seed and offset
    of a call do not depend on the batch (row r's numbers are those of row r in any batch drawn
    at that state). ~1.5 us of host time instead of ~14 us for a draw on the device.
  - otherwise (capture, compile, CPU tensors, a tensor on another device than the current one,
    a torch without Generator.get_offset): one int64 seed drawn on the device per call
    (torch.randint), so a captured graph draws fresh numbers at every replay and torch.compile
    traces it; torch.manual_seed(s) fixes every token there too.
  The two ways give different tokens for the same generator state (a captured graph and the same
  call eager do not draw the same numbers). The read and the advance are not atomic: a torch op
  drawing from the same generator in another thread between them would be rewound (later draws
  would repeat its offsets); torch's own ops lock the generator, a read from Python cannot.

Nothing here reads device memory on the host (no .item(), no data-dependent shape), except
``check_nan=True``, which syncs as in FlashInfer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import MoeCommTypeError, MoeCommValueError, check_tensor
from ..jit import backend as _backend
from ..jit.ops import define_op
from . import _cuda, reference

# _cuda (imported here: a call's import statement costs ~0.7 us) brings only the standard library and
# moecomm.jit.cuda, which start nothing; _triton (Triton itself) stays imported on first use

_PROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_SEED_DTYPES = (torch.int64, torch.uint64) if hasattr(torch, "uint64") else (torch.int64,)
MODE_SAMPLE, MODE_RENORM, MODE_MASK = 0, 1, 2


class SampleOutput(NamedTuple):
    """What a pipeline returns.

    Attributes:
        tokens: [B] int32 (int64 when indices are int64), always in [0, V).
        valid: [B] bool, False for a bad row (NaN/inf/negative/zero-sum, a parameter out of range).
        logprobs: [B] fp32 log-probability of each token under the temperature-scaled softmax (or
            the normalised probabilities) before filtering; None unless asked for.
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    logprobs: torch.Tensor | None


# ---------------------------------------------------------------------------------------------
# the two ops (registered custom ops with fakes: torch.compile and CUDA graphs go through them)


# Which kernel samples a call that kernels/sampling/sample.cu covers (fp32 probabilities with top-k /
# top-p / min-p; moecomm.sampling._cuda.covers): "cuda" (the default) or "triton". Every other call,
# and any call when the CUDA toolchain is not usable here, runs the Triton kernel. The benchmark sets
# it to time both kernels in one run; MOECOMM_BACKEND=reference still means the reference.
SAMPLE_KERNEL = "cuda"
_SAMPLE_KERNELS = ("cuda", "triton")


def _sample_kernel(impl, x: torch.Tensor, launch_args: tuple) -> str | None:
    """The kernel that runs a sampling call: "cuda", "triton", or None (the reference).

    impl: _backend.choose's answer (CUDA when MOECOMM_BACKEND=cuda forces it, or when Triton is
    missing); launch_args: the arguments of launch_sample after x."""
    if impl is _backend.Impl.REFERENCE:
        return None
    if SAMPLE_KERNEL not in _SAMPLE_KERNELS:
        raise MoeCommValueError(f"moecomm.sampling.api: SAMPLE_KERNEL must be one of {_SAMPLE_KERNELS}, got {SAMPLE_KERNEL!r}")
    if (x.is_cuda and (impl is _backend.Impl.CUDA or SAMPLE_KERNEL == "cuda") and _backend.cuda_compile_error() is None
            and _cuda.covers(x, *launch_args)):
        return "cuda"
    return "triton" if _backend.triton_import_error() is None else None


def _sample_impl(
    x: torch.Tensor, indices: torch.Tensor | None, num_rows: int, from_logits: bool,
    top_k_t: torch.Tensor | None, top_k_v: int, has_top_k: bool,
    top_p_t: torch.Tensor | None, top_p_v: float, has_top_p: bool,
    min_p_t: torch.Tensor | None, min_p_v: float, has_min_p: bool,
    temp_t: torch.Tensor | None, temp_v: float, has_temp: bool,
    top_k_first: bool, seed_t: torch.Tensor | None, seed_v: int, offset_t: torch.Tensor | None, offset_v: int,
    per_row_seed: bool, seed_drawn: bool, out_int64: bool, want_logprob: bool,
) -> list[torch.Tensor]:
    """[tokens, valid] or, with want_logprob, [tokens, valid, logprob] (a list: the op's schema has
    no optional output, and the log-probabilities nobody asked for cost an allocation, ~4 us of host
    time on the H200 machine, and the kernel's log). seed_drawn: seed_t is _rng's torch.randint,
    the stream's last kernel before this one (eager code, not compiled): the CUDA kernel may then be
    launched programmatically (_cuda.PDL)."""
    # _pick inlined (four calls, ~0.35 us of the hot path)
    top_k = (top_k_t if top_k_t is not None else top_k_v) if has_top_k else None
    top_p = (top_p_t if top_p_t is not None else top_p_v) if has_top_p else None
    min_p = (min_p_t if min_p_t is not None else min_p_v) if has_min_p else None
    temp = (temp_t if temp_t is not None else temp_v) if has_temp else None
    seed = seed_t if seed_t is not None else seed_v
    offset = offset_t if offset_t is not None else offset_v
    out_dtype = torch.int64 if out_int64 else torch.int32
    impl = _backend.choose(x, "sampling", has=(_backend.Impl.TRITON, _backend.Impl.CUDA))
    if impl is not _backend.Impl.REFERENCE:
        tokens = torch.empty(num_rows, dtype=out_dtype, device=x.device)
        valid = torch.empty(num_rows, dtype=torch.bool, device=x.device)
        logprob = torch.empty(num_rows, dtype=torch.float32, device=x.device) if want_logprob else None
        args = (indices, num_rows, tokens, valid, logprob, None, MODE_SAMPLE, from_logits, top_k, top_p, min_p, temp,
                top_k_first, seed, offset, per_row_seed)
        kernel = _sample_kernel(impl, x, args)
        if kernel == "cuda":
            _cuda.launch_sample(x, *args, programmatic=seed_drawn)
            return [tokens, valid, logprob] if want_logprob else [tokens, valid]
        if kernel == "triton":
            from . import _triton

            _triton.launch_sample(x, *args)
            return [tokens, valid, logprob] if want_logprob else [tokens, valid]
    dev = x.device
    seed_r = seed if isinstance(seed, torch.Tensor) else torch.tensor([seed], dtype=torch.int64, device=dev)
    offset_r = offset if isinstance(offset, torch.Tensor) else torch.tensor([offset], dtype=torch.int64, device=dev)
    res = reference.sample(x, from_logits=from_logits, indices=indices, temperature=temp, top_k=top_k, top_p=top_p,
                           min_p=min_p, top_k_first=top_k_first, seed=seed_r.long(), offset=offset_r.long(),
                           per_row_seed=per_row_seed, out_dtype=out_dtype)
    return list(res) if want_logprob else list(res[:2])


def _sample_fake(x, indices, num_rows, *args):
    out_int64, want_logprob = args[-2:]
    out = [x.new_empty(num_rows, dtype=torch.int64 if out_int64 else torch.int32), x.new_empty(num_rows, dtype=torch.bool)]
    return out + [x.new_empty(num_rows, dtype=torch.float32)] if want_logprob else out


_sample_op = define_op("sampling_sample", _sample_impl, fake=_sample_fake, differentiable=False)


def _filter_impl(
    x: torch.Tensor, mode: int, from_logits: bool,
    top_k_t: torch.Tensor | None, top_k_v: int, has_top_k: bool,
    top_p_t: torch.Tensor | None, top_p_v: float, has_top_p: bool,
    temp_t: torch.Tensor | None, temp_v: float, has_temp: bool, out_fp32: bool,
) -> torch.Tensor:
    top_k = _pick(top_k_t, top_k_v, has_top_k)
    top_p = _pick(top_p_t, top_p_v, has_top_p)
    temp = _pick(temp_t, temp_v, has_temp)
    out_dtype = torch.float32 if out_fp32 else x.dtype
    if _backend.choose(x, "sampling") is _backend.Impl.TRITON:
        from . import _triton

        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        scratch = torch.empty(1, dtype=torch.int32, device=x.device)
        _triton.launch_sample(x, None, x.shape[0], scratch, scratch, None, y, mode, from_logits, top_k, top_p, None,
                              temp, True, 0, 0, False)
        return y
    y = reference.filter_probs(x, from_logits=from_logits, temperature=temp, top_k=top_k, top_p=top_p,
                               mask_logits=mode == MODE_MASK)
    return y.to(out_dtype)


def _filter_fake(x, mode, from_logits, *args):
    return torch.empty(x.shape, dtype=torch.float32 if args[-1] else x.dtype, device=x.device)


_filter_op = define_op("sampling_filter", _filter_impl, fake=_filter_fake, differentiable=False)


def _pick(t, v, has):
    if not has:
        return None
    return t if t is not None else v


# ---------------------------------------------------------------------------------------------
# argument checks (once, in the public function)


def _check_dist(op: str, name: str, x) -> torch.Tensor:
    x = check_tensor(op, name, x, ndim=2, dtype=_PROB_DTYPES)
    if x.shape[1] < 1:
        raise MoeCommValueError(f"{op}: {name} must have a vocabulary of at least 1 column, got shape {list(x.shape)}")
    if x.shape[1] >= 2**31 - 2**20:
        raise MoeCommValueError(f"{op}: {name} must have fewer than 2**31 - 2**20 columns, got {x.shape[1]}")
    return x if x.stride(1) == 1 else x.contiguous()


def _check_indices(op: str, indices, x: torch.Tensor) -> torch.Tensor | None:
    if indices is None:
        return None
    indices = check_tensor(op, "indices", indices, ndim=1, dtype=_INDEX_DTYPES, device=x.device)
    if x.shape[0] == 0 and indices.shape[0] > 0:
        raise MoeCommValueError(f"{op}: the input must have at least one row when indices are given, got shape {list(x.shape)}")
    return indices.contiguous()


def _param(op: str, name: str, value, num_rows: int, device, *, integer: bool, lo: float, hi: float,
           lo_open: bool, hi_open: bool = False):
    """A scalar (range-checked here) or a [B] tensor (range-checked per row in the kernel: a row
    out of range comes back invalid, since reading it here would sync)."""
    if value is None:
        return None, 0, False
    if isinstance(value, torch.Tensor):
        allowed = _INDEX_DTYPES if integer else (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        t = check_tensor(op, name, value, dtype=allowed, device=device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(num_rows)
        if t.dim() != 1 or t.shape[0] != num_rows:
            raise MoeCommValueError(f"{op}: {name} must be a scalar or have shape [{num_rows}] (one per output row), got {list(t.shape)}")
        if t.dtype is torch.float64:
            t = t.float()
        return t.contiguous(), 0, True
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise MoeCommTypeError(f"{op}: {name} must be {'an int' if integer else 'a float'} or a tensor, got {type(value).__name__}")
    if not math.isfinite(value) and not (integer and value >= 0):
        raise MoeCommValueError(f"{op}: {name} must be finite, got {value}")
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = value >= hi if hi_open else value > hi
    if bad_lo or bad_hi:
        if integer:
            raise MoeCommValueError(f"{op}: {name} must be >= {int(lo) + (1 if lo_open else 0)}, got {value}")
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise MoeCommValueError(f"{op}: {name} must be in {rng}, got {value}")
    return None, value, True


_OFF = (None, 0, False)  # _param's answer for a filter not given (most calls leave two or three off)


def _top_k(op, value, num_rows, device):
    if value is None:  # most calls: no top-k (0.5 -> 0.1 us)
        return _OFF
    t, v, has = _param(op, "top_k", value, num_rows, device, integer=True, lo=0, hi=float("inf"), lo_open=True)
    return t, min(int(v), 2**31 - 1), has


def _philox_on_host(generator, device, is_cuda: bool) -> tuple[int, int] | None:
    """(seed, offset) of an eager call on a CUDA device: the generator's Philox seed and offset,
    the offset advanced by 4 as a torch op that draws a few numbers advances it; or None where the
    seed must be drawn on the device (see the module docstring: capture, compile, CPU, the
    tensor's device not the current one, a torch without Generator.get_offset).

    ~1.5 us of host calls instead of torch.randint on the device (14 us of host time on the H200
    machine). Nothing is read from the device: the CUDA generator's state lives on the host."""
    if not is_cuda or torch.compiler.is_compiling():
        return None
    current = torch.cuda.current_device()
    index = device.index if device.index is not None else current
    # the capture status read is the current device's current stream's: the stream the launch uses
    # only when the tensor's device is the current one
    if index != current or torch.cuda.is_current_stream_capturing():
        return None
    if generator is None:
        gens = torch.cuda.default_generators
        if index >= len(gens):
            return None
        generator = gens[index]
    elif generator.device.type != "cuda" or (generator.device.index or 0) != index:
        return None  # torch.randint raises its own error for a generator of another device
    get_offset = getattr(generator, "get_offset", None)
    if get_offset is None:
        return None
    offset = get_offset()
    generator.set_offset(offset + 4)
    seed = generator.initial_seed() % 2**64
    return (seed - 2**64 if seed >= 2**63 else seed), offset


def _rng(op: str, generator, seed, offset, num_rows: int, device, is_cuda: bool):
    """(seed tensor or None, seed int, offset tensor or None, offset int, per_row_seed).

    is_cuda: the input is a CUDA tensor (the default randomness may then be read on the host)."""
    if seed is None:
        if offset is not None:
            raise MoeCommValueError(f"{op}: offset must come with a seed, got offset={type(offset).__name__} and seed=None")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise MoeCommTypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        state = _philox_on_host(generator, device, is_cuda)
        if state is not None:
            return None, state[0], None, state[1], False
        # drawn on the device: no host read, fresh at every CUDA-graph replay, traceable by torch.compile
        s = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)
        return s, 0, None, 0, False
    offset = 0 if offset is None else offset
    seed_t = offset_t = None
    seed_v = offset_v = 0
    per_row = False
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, torch.Tensor):
            t = check_tensor(op, name, value, dtype=_SEED_DTYPES, device=device)
            t = t.reshape(-1)
            if t.shape[0] not in (1, num_rows):
                raise MoeCommValueError(f"{op}: {name} must have 1 or {num_rows} (one per output row) elements, got {t.shape[0]}")
            t = t.view(torch.int64) if t.dtype is not torch.int64 else t
            if name == "seed":
                seed_t, per_row = t.contiguous(), t.shape[0] == num_rows and num_rows > 1
            else:
                offset_t = t.contiguous()
        elif isinstance(value, bool) or not isinstance(value, int):
            raise MoeCommTypeError(f"{op}: {name} must be an int or an int64 tensor, got {type(value).__name__}")
        else:
            v = value % 2**64
            v = v - 2**64 if v >= 2**63 else v
            if name == "seed":
                seed_v = v
            else:
                offset_v = v
    return seed_t, seed_v, offset_t, offset_v, per_row


def _check_nan(op: str, x: torch.Tensor, check_nan: bool) -> None:
    if check_nan and _backend.device_checks_allowed(True) and bool(torch.isnan(x).any()):
        raise MoeCommValueError(f"{op}: probs must not contain NaN (check_nan=True), got a NaN")


def _order(op: str, filter_apply_order: str) -> bool:
    if filter_apply_order not in ("top_k_first", "joint"):
        raise MoeCommValueError(f"{op}: filter_apply_order must be 'top_k_first' or 'joint', got {filter_apply_order!r}")
    return filter_apply_order == "top_k_first"


def _run_sample(op, x, from_logits, indices, top_k, top_p, min_p, temperature, top_k_first, generator, seed, offset,
                want_logprob: bool = False):
    """SampleOutput of one sampling call (logprobs None unless want_logprob)."""
    x = _check_dist(op, "logits" if from_logits else "probs", x)
    indices = _check_indices(op, indices, x)
    num_rows = indices.shape[0] if indices is not None else x.shape[0]
    dev = x.device
    kt, kv, hk = _top_k(op, top_k, num_rows, dev)
    pt, pv, hp = _OFF if top_p is None else _param(op, "top_p", top_p, num_rows, dev, integer=False, lo=0.0, hi=1.0,
                                                   lo_open=True)
    mt, mv, hm = _OFF if min_p is None else _param(op, "min_p", min_p, num_rows, dev, integer=False, lo=0.0, hi=1.0,
                                                   lo_open=False)
    tt, tv, ht = _OFF if temperature is None else _param(op, "temperature", temperature, num_rows, dev, integer=False,
                                                         lo=0.0, hi=float("inf"), lo_open=True, hi_open=True)
    st, sv, ot, ov, per_row = _rng(op, generator, seed, offset, num_rows, dev, x.is_cuda)
    out_int64 = indices is not None and indices.dtype is torch.int64
    # the seed drawn on the device just now, in eager code (compiled code may put kernels between)
    drawn = seed is None and st is not None and not torch.compiler.is_compiling()
    res = _sample_op(x, indices, num_rows, from_logits, kt, kv, hk, pt, float(pv), hp, mt, float(mv), hm,
                     tt, float(tv) if ht else 1.0, ht, top_k_first, st, sv, ot, ov, per_row, drawn, out_int64,
                     want_logprob)
    return SampleOutput(res[0], res[1], res[2] if want_logprob else None)


def _ret(res: SampleOutput, return_valid: bool):
    return (res.tokens, res.valid) if return_valid else res.tokens


# ---------------------------------------------------------------------------------------------
# public functions (flashinfer.sampling names and arguments)

_RNG_ARGS = """        indices: [B] int32/int64 or None: output row i samples from row indices[i] of the input
            (several outputs may share a distribution); the output then has the indices' dtype.
            An index out of [0, R) gives an invalid row.
        deterministic: accepted for FlashInfer compatibility; every path here is deterministic.
        generator: torch.Generator on the device, or None (torch's default): its Philox state
            seeds the call (see the module docstring: read on the host in eager calls, drawn on
            the device under capture or compile).
        check_nan: raise if the input holds NaN (reads the device: syncs).
        seed, offset: int, or int64 tensor [1] or [B] on the device (see the module docstring).
        return_valid: also return valid [B] bool (False: a bad row, whose token is 0)."""


def sampling_from_probs(probs, indices=None, deterministic: bool = True, generator=None, check_nan: bool = False,
                        seed=None, offset=None, return_valid: bool = False):
    """Sample one token per row from (unnormalised) probabilities, in one pass: no prefix sum.

    Args:
        probs: [R, V] fp32/fp16/bf16, >= 0 (need not sum to 1).
""" + _RNG_ARGS + """

    Returns:
        tokens [B] int32 (or indices' dtype), and valid [B] bool when return_valid.

    Example:
        >>> tokens = sampling_from_probs(torch.softmax(logits, -1))
    """
    _check_nan("sampling_from_probs", probs, check_nan)
    return _ret(_run_sample("sampling_from_probs", probs, False, indices, None, None, None, None, True,
                            generator, seed, offset), return_valid)


def sampling_from_logits(logits, indices=None, deterministic: bool = True, generator=None, check_nan: bool = False,
                         seed=None, offset=None, return_valid: bool = False):
    """Sample from softmax(logits) by the Gumbel-max trick in one pass (no softmax is written).

    Args:
        logits: [R, V] fp32/fp16/bf16; -inf entries are never drawn; NaN or +inf: a bad row.
""" + _RNG_ARGS + """

    Returns:
        tokens [B] int32 (or indices' dtype), and valid [B] bool when return_valid.
    """
    _check_nan("sampling_from_logits", logits, check_nan)
    return _ret(_run_sample("sampling_from_logits", logits, True, indices, None, None, None, None, True,
                            generator, seed, offset), return_valid)


def top_p_sampling_from_probs(probs, top_p, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, return_valid: bool = False):
    """Nucleus sampling: the shortest prefix of the tokens by descending probability (ties: lowest
    index first) whose mass reaches top_p * row sum; top_p = 1 is plain sampling.

    Args:
        probs: [R, V] fp32/fp16/bf16.
        top_p: float in (0, 1], or [B] tensor (a row out of range is invalid).
""" + _RNG_ARGS + """

    Returns:
        tokens [B], and valid [B] bool when return_valid.
    """
    _check_nan("top_p_sampling_from_probs", probs, check_nan)
    return _ret(_run_sample("top_p_sampling_from_probs", probs, False, indices, None, top_p, None, None, True,
                            generator, seed, offset), return_valid)


def top_k_sampling_from_probs(probs, top_k, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, return_valid: bool = False):
    """Sample among the top_k most probable tokens (ties at the boundary: lowest index first;
    top_k >= V: no filter; top_k = 1: the argmax, lowest index among equal maxima).

    Args:
        probs: [R, V] fp32/fp16/bf16.
        top_k: int >= 1, or [B] int tensor (a row with top_k <= 0 is invalid).
""" + _RNG_ARGS + """

    Returns:
        tokens [B], and valid [B] bool when return_valid.
    """
    _check_nan("top_k_sampling_from_probs", probs, check_nan)
    return _ret(_run_sample("top_k_sampling_from_probs", probs, False, indices, top_k, None, None, None, True,
                            generator, seed, offset), return_valid)


def min_p_sampling_from_probs(probs, min_p, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, return_valid: bool = False):
    """Sample among the tokens with probability >= min_p * max probability of the row.

    Args:
        probs: [R, V] fp32/fp16/bf16.
        min_p: float in [0, 1], or [B] tensor.
""" + _RNG_ARGS + """

    Returns:
        tokens [B], and valid [B] bool when return_valid.
    """
    _check_nan("min_p_sampling_from_probs", probs, check_nan)
    return _ret(_run_sample("min_p_sampling_from_probs", probs, False, indices, None, None, min_p, None, True,
                            generator, seed, offset), return_valid)


def top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices=None, filter_apply_order: str = "top_k_first",
                                    deterministic: bool = True, generator=None, check_nan: bool = False, seed=None,
                                    offset=None, return_valid: bool = False):
    """Top-k and top-p together, in one kernel.

    Args:
        probs: [R, V] fp32/fp16/bf16.
        top_k: int >= 1 or [B] tensor. top_p: float in (0, 1] or [B] tensor.
        filter_apply_order: "top_k_first" (top-p measured on the top-k-renormalised distribution,
            FlashInfer's default) or "joint" (both measured on the full distribution).
""" + _RNG_ARGS + """

    Returns:
        tokens [B], and valid [B] bool when return_valid.
    """
    op = "top_k_top_p_sampling_from_probs"
    first = _order(op, filter_apply_order)
    _check_nan(op, probs, check_nan)
    return _ret(_run_sample(op, probs, False, indices, top_k, top_p, None, None, first, generator, seed, offset),
                return_valid)


def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order: str = "top_k_first",
                                     deterministic: bool = True, generator=None, check_nan: bool = False, seed=None,
                                     offset=None, return_valid: bool = False):
    """top_k_top_p_sampling_from_probs of softmax(logits), the softmax fused (never written).

    Args:
        logits: [R, V] fp32/fp16/bf16. Other arguments as top_k_top_p_sampling_from_probs.
""" + _RNG_ARGS + """

    Returns:
        tokens [B], and valid [B] bool when return_valid.
    """
    op = "top_k_top_p_sampling_from_logits"
    first = _order(op, filter_apply_order)
    _check_nan(op, logits, check_nan)
    return _ret(_run_sample(op, logits, True, indices, top_k, top_p, None, None, first, generator, seed, offset),
                return_valid)


def _run_filter(op, x, mode, from_logits, top_k=None, top_p=None, temperature=None, out_fp32=False):
    x = _check_dist(op, "logits" if from_logits or mode == MODE_MASK else "probs", x)
    num_rows, dev = x.shape[0], x.device
    kt, kv, hk = _top_k(op, top_k, num_rows, dev)
    pt, pv, hp = _param(op, "top_p", top_p, num_rows, dev, integer=False, lo=0.0, hi=1.0, lo_open=True)
    tt, tv, ht = _param(op, "temperature", temperature, num_rows, dev, integer=False, lo=0.0, hi=float("inf"),
                        lo_open=True, hi_open=True)
    return _filter_op(x, mode, from_logits, kt, kv, hk, pt, float(pv), hp, tt, float(tv) if ht else 1.0, ht, out_fp32)


def top_k_renorm_probs(probs, top_k, is_deterministic: bool = False):
    """Keep the top_k probabilities of each row (ties: lowest index), zero the rest, renormalise.

    Args:
        probs: [R, V] fp32/fp16/bf16. top_k: int >= 1 or [R] tensor.
        is_deterministic: accepted for FlashInfer compatibility (always deterministic here).

    Returns:
        [R, V] in probs' dtype. A bad row: zeros.
    """
    return _run_filter("top_k_renorm_probs", probs, MODE_RENORM, False, top_k=top_k)


def top_p_renorm_probs(probs, top_p, is_deterministic: bool = False):
    """Keep the top-p prefix of each row (the rule of top_p_sampling_from_probs), renormalise.

    Args:
        probs: [R, V] fp32/fp16/bf16. top_p: float in (0, 1] or [R] tensor.

    Returns:
        [R, V] in probs' dtype. A bad row: zeros.
    """
    return _run_filter("top_p_renorm_probs", probs, MODE_RENORM, False, top_p=top_p)


def top_k_mask_logits(logits, top_k):
    """Keep the top_k logits of each row (ties: lowest index), set the rest to -inf.

    Args:
        logits: [R, V] fp32/fp16/bf16. top_k: int >= 1 or [R] tensor.

    Returns:
        [R, V] in logits' dtype. A row with NaN or +inf: returned unchanged.
    """
    return _run_filter("top_k_mask_logits", logits, MODE_MASK, False, top_k=top_k)


def softmax(logits, temperature=None, enable_pdl=None):
    """softmax(logits / temperature) over the last dim, fp32, in two passes (max+sum, write).

    Args:
        logits: [R, V] fp32/fp16/bf16. temperature: None (1), a float > 0, or [R] tensor.
        enable_pdl: accepted for FlashInfer compatibility, ignored.

    Returns:
        [R, V] fp32. A row with NaN or +inf, or all -inf: zeros.
    """
    return _run_filter("softmax", logits, MODE_RENORM, True, temperature=temperature, out_fp32=True)
