"""Compile Triton kernels for Hopper (sm_90) without a GPU: the cheap CI check of GPU kernels.

Works whether or not TRITON_INTERPRET is set (an interpreted kernel is re-wrapped as a JIT one).
"""

from __future__ import annotations

from typing import Any


def compile_for_hopper(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], **options: Any):
    """Compile ``kernel`` for sm_90 and return Triton's CompiledKernel (``.asm['ptx']``, ``['cubin']``).

    Args:
        kernel: a @triton.jit function (or its interpreted wrapper).
        signature: every argument's Triton type, e.g. {"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}.
        constexprs: values of the constexpr arguments.
        options: num_warps, num_stages, ...
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    src = ASTSource(fn, signature, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def cubin_resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, local bytes) of a compiled kernel's cubin, from Triton's bundled
    cuobjdump --dump-resource-usage (stack or local > 0: spills)."""
    import re
    import subprocess
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    regs, stack, local = map(int, m.groups())
    return regs, stack, local


def run_without_interpreter(test_file: str, function: str, *, timeout_s: float = 600) -> str:
    """Call ``function()`` of the module at ``test_file`` in a fresh Python without TRITON_INTERPRET,
    and return the last word it prints (its return value).

    Why: with TRITON_INTERPRET set (as tests/conftest.py sets it without a GPU), triton.language's
    own @jit helpers (tl.sum, tl.max, ...) are interpreter functions, and a cold-cache sm_90 compile
    of a kernel that calls them fails inside them. The module's folder is importable (its helpers).

    Raises:
        AssertionError with the child's stderr when it fails.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = Path(test_file).resolve()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import runpy, sys; sys.path.insert(0, {str(path.parent)!r}); "
            f"print(runpy.run_path({str(path)!r})[{function!r}]())")
    root = next((p for p in path.parents if (p / "pyproject.toml").exists()), path.parent)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s,
                          cwd=root)
    if proc.returncode != 0:  # a test helper: the failure is the calling test's
        raise AssertionError(proc.stderr[-3000:])
    return proc.stdout.split()[-1]
