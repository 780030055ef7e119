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
