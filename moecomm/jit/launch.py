"""Launching Triton kernels with little host time: grid arithmetic and a direct launch path.

An eager MoE forward launches ~8 kernels; on the H100 hosts we measured, Triton's JITFunction.run
took 21-48 us of host time per launch (bench_permute --pieces), and at Qwen3-30B-A3B prefill sizes
(0.77 ms of GPU work at 4096 tokens) the eager layer waited on the host. Two costs are avoidable:

- triton.cdiv and triton.next_power_of_2 are ConstexprFunction objects in Triton 3.6: a host call
  unwraps its arguments through Triton's constexpr machinery, ~2-5 us. cdiv / next_pow2 below are
  plain Python with the same results.
- JITFunction.run binds and specialises every argument, builds its cache key (str() of the
  options), reads the current device, stream and several knobs, and calls two (empty) launch hooks
  through Python, on every call. Launcher takes that path once per specialisation, keeps the
  compiled kernel under a key at least as fine as Triton's own, and later hands the arguments
  straight to the compiled kernel's launcher, as JITFunction.run does at its end.
"""

from __future__ import annotations

import threading
from typing import Any

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (what triton.cdiv returns, without its host-call cost)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, 0 for n <= 0 (triton.next_power_of_2's results)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def spec_key(args: tuple) -> tuple:
    """A key that determines Triton's specialisation of a launch's runtime arguments.

    Tensors: dtype and address mod 16 (Triton: 16-byte aligned or not); ints: (== 1, divisible by
    16, width i32 / i64 / u64), what Triton specialises an int on; bools and floats: their type
    (Triton does not specialise them); None: None. Equal keys -> the same compiled kernel from
    Triton (tests/jit/test_launch.py checks this against Triton's own specialisation function).

    Every launch pays this loop (~0.15 us per argument on the H200 host; 20 arguments are common),
    so it is written flat: exact-type checks first (an int argument is ``type(a) is int``; a
    Parameter or other tensor subclass falls through to isinstance).
    """
    key = []
    append = key.append
    for a in args:
        t = type(a)
        if t is int:
            append((a == 1, a % 16 == 0, 0 if -2147483648 <= a < 2147483648 else (1 if -2**63 <= a < 2**63 else 2)))
        elif t is _Tensor or isinstance(a, _Tensor):
            append((a.dtype, a.data_ptr() & 15))
        elif a is None:
            append(None)
        else:
            append(t)
    return tuple(key)


_Tensor = torch.Tensor


class _Recording(threading.local):
    """The recorder this thread's launches go to instead of the GPU (None: they launch)."""

    recorder = None


recording = _Recording()


# Triton's scalar parameter types -> the kind of a cubin parameter in kernels/ep/native.c (2 int32,
# 3 int64); pointers are kind 1
_NATIVE_KINDS = {"i32": 2, "i64": 3}


def native_parameters(compiled, num_args: int) -> tuple[list[int], list[int]] | tuple[None, str]:
    """(the runtime argument each cubin parameter takes, its kind: 1 pointer, 2 int32, 3 int64) of a
    Triton 3.6 CompiledKernel whose first ``num_args`` parameters are the runtime arguments, or
    (None, why) when a launch of it needs Triton's launcher (clusters, cooperative or PDL launches,
    scratch memory, tensor descriptors, parameters of other types). After these parameters a
    Triton 3.6 kernel takes two null pointers (global and profile scratch). Needs no GPU."""
    md = getattr(compiled, "metadata", None)
    src = getattr(compiled, "src", None)
    signature = getattr(src, "signature", None)
    if md is None or not isinstance(signature, dict) or len(signature) < num_args:
        return None, "no compiled signature"
    for attr, ok in (("num_ctas", 1), ("global_scratch_size", 0), ("profile_scratch_size", 0),
                     ("launch_cooperative_grid", False), ("launch_pdl", False)):
        if getattr(md, attr, ok) != ok:
            return None, f"{attr} = {getattr(md, attr)}"
    if getattr(md, "tensordesc_meta", None):
        return None, "tensor descriptors"
    tys = list(signature.values())
    args, kinds = [], []
    for i, ty in enumerate(tys[:num_args]):
        if ty == "constexpr":
            continue  # specialised away (an int == 1): not a parameter of the cubin
        if not isinstance(ty, str):
            return None, f"parameter {i} of type {ty!r}"
        kind = 1 if ty[0] == "*" else _NATIVE_KINDS.get(ty)
        if kind is None:
            return None, f"parameter {i} of type {ty}"
        args.append(i)
        kinds.append(kind)
    if any(ty != "constexpr" for ty in tys[num_args:]):
        return None, "runtime parameters after the constexprs"
    return args, kinds


class Launcher:
    """Launch one @triton.jit kernel; after the first launch of a specialisation, without
    JITFunction.run.

    Call as ``launcher(grid, args, constexprs, num_warps, num_stages)``: ``args`` are the kernel's
    leading runtime parameters in order, ``constexprs`` a dict of its trailing constexpr
    parameters. The direct path is taken only where it mirrors Triton's launch protocol: Triton
    3.6 (other versions, and the interpreter, always take the regular path), a kernel whose
    parameters are exactly ``args`` followed by the named constexprs, and no launch hooks
    installed (a profiler's hooks see every launch through the regular path). The key: spec_key,
    the constexprs, num_warps, num_stages, the current device and TRITON_DEBUG. If a direct launch
    raises, the direct path is switched off for this kernel (logged once) and the regular one
    runs. Not in the key: TRITON_INSTRUMENTATION_MODE changed after the first launch.
    """

    def __init__(self, kernel):
        import triton
        from triton.runtime.jit import JITFunction

        self.kernel = kernel
        self.enabled = isinstance(kernel, JITFunction) and triton.__version__.split(".")[:2] == ["3", "6"]
        if self.enabled:  # triton.knobs is recent (absent in 3.2): imported only where it is used
            from triton import knobs
            from triton.runtime import driver

            self._runtime_knobs, self._driver = knobs.runtime, driver
            self._params = [(p.name, p.is_constexpr) for p in kernel.params]
        self.cache: dict = {}
        self.direct_launches = 0  # tests check that the direct path is taken on a GPU

    def _regular(self, grid, args, constexprs, num_warps, num_stages):
        opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        return self.kernel[grid](*args, **constexprs, **opts)

    def _constexpr_order(self, args: tuple, constexprs: dict) -> tuple | None:
        """The constexpr values in the kernel's parameter order, or None when the call does not
        follow the layout the direct path needs (then it never takes it for this kernel)."""
        n = len(args)
        params = self._params
        if (len(params) != n + len(constexprs) or any(c for _, c in params[:n])
                or any(not c or name not in constexprs for name, c in params[n:])):
            return None
        return tuple(constexprs[name] for name, _ in params[n:])

    def __call__(self, grid: tuple, args: tuple, constexprs: dict[str, Any], num_warps: int,
                 num_stages: int | None = None) -> None:
        rec = recording.recorder
        if rec is not None:  # a native phase is being recorded (moecomm/ep/nccl/native.py)
            rec.launch(self, grid, args, constexprs, num_warps, num_stages)
            return
        if not self.enabled:
            self._regular(grid, args, constexprs, num_warps, num_stages)
            return
        rt = self._runtime_knobs
        if rt.launch_enter_hook.calls or rt.launch_exit_hook.calls:
            self._regular(grid, args, constexprs, num_warps, num_stages)
            return
        drv = self._driver.active
        device = drv.get_current_device()
        key = (spec_key(args), tuple(constexprs.items()), num_warps, num_stages, device, rt.debug)
        hit = self.cache.get(key)
        if hit is None:
            compiled = self._regular(grid, args, constexprs, num_warps, num_stages)
            if hasattr(compiled, "result"):  # an async-compile future
                compiled = compiled.result()
            run = getattr(compiled, "run", None)  # the launcher (loaded by the launch above)
            order = self._constexpr_order(args, constexprs)
            if order is None:
                from .backend import warn_once

                self.enabled = False
                name = getattr(self.kernel, "__name__", "kernel")
                warn_once(f"direct-launch-layout-{name}",
                          f"moecomm: {name} is not called as (runtime args..., constexprs...): Triton's regular launch is used")
            elif run is not None and compiled.function is not None:
                if len(self.cache) >= 256:  # bound what odd shapes and views can add
                    self.cache.clear()
                self.cache[key] = (run, compiled.function, compiled.packed_metadata, order)
            return
        run, function, packed_metadata, order = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        try:
            # the launcher's arguments after the grid: stream, function, packed metadata, launch
            # metadata and the enter/exit hooks (None: none), then every kernel parameter in order
            # (it skips the constexprs itself)
            run(grid[0], g1, g2, drv.get_current_stream(device), function, packed_metadata, None, None, None,
                *args, *order)
        except Exception as exc:  # a protocol mismatch: never again in this process, and say why once
            from .backend import warn_once

            self.enabled = False
            name = getattr(self.kernel, "__name__", "kernel")
            warn_once(f"direct-launch-{name}", f"moecomm: direct launch of {name} failed ({type(exc).__name__}: "
                      f"{exc}); Triton's regular launch is used from now on")
            self._regular(grid, args, constexprs, num_warps, num_stages)
            return
        self.direct_launches += 1


# id(kernel) -> its Launcher. Keyed by id: a JITFunction hashes by its source hash behind a lock
# (~1 us). The Launcher holds the kernel, so an id here never outlives its object and is never reused.
_LAUNCHERS: dict[int, Launcher] = {}


def launch(kernel, grid: tuple, args: tuple, constexprs: dict[str, Any], num_warps: int,
           num_stages: int | None = None) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)`` through the kernel's
    Launcher (one per kernel object; a stand-in such as a test's launch counter gets its own,
    which takes the regular path)."""
    launcher = _LAUNCHERS.get(id(kernel))
    if launcher is None:
        launcher = _LAUNCHERS[id(kernel)] = Launcher(kernel)
    launcher(grid, args, constexprs, num_warps, num_stages)
