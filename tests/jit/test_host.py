"""moecomm.jit.host: plain C sources compile with the system C compiler into a shared library, the
cache hits without recompiling, a changed source, header, flag or compiler gives a new key, the
library is published atomically and loaded with its functions' argtypes set, compile errors carry
the command and the compiler's message, and no compiler is an error that says what to do."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from moecomm.errors import MoeCommTypeError, UnsupportedHardwareError
from moecomm.jit import host

needs_cc = pytest.mark.skipif(host.compile_error() is not None, reason=f"no C compiler here: {host.compile_error()}")

TINY = r"""
#include <stdint.h>
#include "tiny.h"
int64_t tiny_sum(const int32_t *x, int64_t n) {
    int64_t s = 0, i;
    for (i = 0; i < n; i++)
        s += x[i] * TINY_STEP;
    return s;
}
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(d))
    host.forget_loaded()
    yield d
    host.forget_loaded()


@pytest.fixture
def tiny(tmp_path):
    src = tmp_path / "src" / "tiny.c"
    src.parent.mkdir()
    src.write_text(TINY)
    (src.parent / "tiny.h").write_text("#define TINY_STEP 1\n")
    return src


def test_key_follows_source_header_flags_and_compiler(tiny):
    key = lambda **kw: host.cache_key(tiny, **{"compiler": "cc 12.2", **kw})  # noqa: E731
    base = key()
    assert key() == base and len(base) == 64
    assert key(flags=("-O2", "-std=c99", "-shared", "-fPIC")) != base
    assert key(compiler="cc 13.1") != base
    tiny.write_text(TINY + "\n/* edited */\n")
    assert key() != base
    tiny.write_text(TINY)
    assert key() == base
    (tiny.parent / "tiny.h").write_text("#define TINY_STEP 2\n")
    assert key() != base
    with pytest.raises(MoeCommTypeError, match="flags must be a sequence of str, got '-O2'"):
        host.cache_key(tiny, flags="-O2", compiler="x")


@needs_cc
def test_compile_load_call_and_cache_hit(cache_dir, tiny, monkeypatch):
    replaced, runs = [], []
    real_replace, real_run = os.replace, host._run_cc
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    monkeypatch.setattr(host, "_run_cc", lambda *a: (runs.append(a), real_run(*a))[1])
    a = host.compile(tiny)
    assert a.compiled and a.path.parent == cache_dir / "host" and a.path.name.startswith("tiny-")
    assert replaced[-1][1] == a.path and Path(replaced[-1][0]).parent == a.path.parent  # temp file beside it
    assert a.path.read_bytes()[:4] == b"\x7fELF"
    n = len(runs)
    assert not host.compile(tiny).compiled and len(runs) == n  # a hit: the compiler did not run

    lib = host.load(tiny, {"tiny_sum": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64])})
    assert lib.tiny_sum.restype is ctypes.c_int64
    x = (ctypes.c_int32 * 4)(1, 2, 3, -10)
    assert lib.tiny_sum(ctypes.addressof(x), 4) == -4
    assert host.load(tiny, {}) is lib and len(runs) == n  # loaded once per process
    with pytest.raises(host.HostCompileError, match="has no function 'nope'"):
        host.load(tiny, {"nope": (ctypes.c_int, [])})

    (tiny.parent / "tiny.h").write_text("#define TINY_STEP 2\n")  # an included header changed
    assert host.compile(tiny).compiled and len(list((cache_dir / "host").glob("*.so"))) == 2


@needs_cc
def test_compile_error_carries_the_command_and_the_message(cache_dir, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("int broken(void) { return undefined_name; }\n")
    with pytest.raises(host.HostCompileError) as info:
        host.compile(bad)
    msg = str(info.value)
    assert "undefined_name" in msg and "-shared" in msg and str(bad) in msg
    assert not list((cache_dir / "host").glob("*.so"))  # nothing published


def test_no_compiler_says_what_to_do(cache_dir, tiny, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(UnsupportedHardwareError, match="CC='/nonexistent/cc' was not found"):
        host.compile(tiny)
    assert "was not found" in host.compile_error()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UnsupportedHardwareError, match="no C compiler here .* install gcc or set CC"):
        host.compiler()


@needs_cc
def test_cc_with_words_of_its_own(cache_dir, tiny, monkeypatch):
    """CC is a command line ("ccache gcc", "gcc -m64"): split as a shell would."""
    cc = host.compiler()[0]
    monkeypatch.setenv("CC", f"{cc} -DTINY_UNUSED=1")
    assert host.compiler() == [cc, "-DTINY_UNUSED=1"]
    assert host.compile(tiny).compiled


@needs_cc
def test_plan_host_source_builds_without_warnings(tmp_path):
    """kernels/attention/plan_host.c is C99 with no warning under -Wall -Wextra -pedantic -Wconversion."""
    import subprocess

    src = host.source_path("attention/plan_host.c")
    cmd = [*host.compiler(), *host.DEFAULT_FLAGS, "-Wall", "-Wextra", "-pedantic", "-Wconversion", "-Werror",
           "-o", str(tmp_path / "p.so"), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
