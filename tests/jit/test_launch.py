"""moecomm.jit.launch: grid arithmetic and the direct launch path, checked against the installed Triton
without a GPU (Triton's own specialisation function; a stand-in driver and compiled kernel)."""

import itertools

import pytest
import torch

from moecomm.jit.launch import Launcher, cdiv, next_pow2, spec_key


def test_cdiv_and_next_pow2_match_triton():
    import triton

    for n in [*range(0, 70), 127, 128, 129, 1000, 1023, 1024, 1025, 2**31 - 1, 2**31, 2**40 + 3]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_spec_key_determines_tritons_specialisation():
    """Launches with equal spec_key must get the same compiled kernel from Triton: equal keys ->
    equal specialisation by Triton's own function, over aligned/misaligned tensors of several
    dtypes, ints around every boundary Triton looks at (1, multiples of 16, int32, int64, signs),
    floats, bools and None."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))

    def triton_spec(args):
        return tuple(native_specialize_impl(backend, a, False, True, True) for a in args)

    buf = torch.zeros(64, dtype=torch.float16)
    tensors = [buf, buf[1:], buf[8:], buf.view(torch.bfloat16)[3:], buf.view(torch.int32), buf.view(torch.int32)[1:]]
    ints = [0, 1, 2, -1, -16, -17, 15, 16, 17, 4096, 7168, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -2**31,
            -2**31 - 16, 2**40, 2**63 - 1, 2**63]
    others = [None, True, False, 0.5, 1.0]
    seen: dict = {}
    distinct = set()
    for ts in itertools.product(tensors, repeat=2):
        for a in ints + others:
            for b in itertools.product([1, 16, 17, 2**31, None, 2.0], repeat=2):
                args = (*ts, a, *b)
                key, truth = spec_key(args), triton_spec(args)
                assert seen.setdefault(key, truth) == truth, (args, key, truth, seen[key])
                distinct.add(truth)
    assert len(distinct) > 1000  # the sample reaches many different specialisations


class _FakeCompiled:  # what Triton's compile returns, reduced to what a launch touches
    function, packed_metadata = 0xF00, ("packed",)

    def __init__(self, launches):
        self.fail = False
        self.launches = launches

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        if self.fail and args[7] is None:  # direct launches pass no hooks (Triton's run: its HookChains)
            raise TypeError("launcher protocol changed")
        self.launches.append(args)


@pytest.fixture
def fake_triton(monkeypatch):
    """A stand-in driver and compile step: launches are recorded, nothing needs a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    if triton.__version__.split(".")[:2] != ["3", "6"]:
        pytest.skip(f"the direct launch mirrors Triton 3.6's protocol; installed: {triton.__version__}")

    class FakeDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0x5EA

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    launches, compiles = [], []
    compiled = _FakeCompiled(launches)
    monkeypatch.setattr(driver, "_active", FakeDriver())

    def fresh(kernel):  # a fresh JITFunction: the module's kernel keeps its caches clean
        from triton.runtime.jit import JITFunction

        k = JITFunction(kernel.fn)
        monkeypatch.setattr(k, "_do_compile", lambda *a, **kw: compiles.append(a) or compiled)
        return k

    return fresh, compiled, launches, compiles


def test_direct_launch_passes_what_triton_passes(fake_triton):
    """The direct path hands the compiled kernel's launcher the same arguments as Triton's
    JITFunction.run does; a new specialisation, launch hooks or a failing launcher take the
    regular path."""
    import triton

    from moecomm.ep.nccl import _triton as DT

    fresh, compiled, launches, compiles = fake_triton
    launcher = Launcher(fresh(DT.ep_pack_kernel))
    assert launcher.enabled
    x, pos = torch.zeros(6, 32, dtype=torch.float16), torch.zeros(6, 2, dtype=torch.int32)
    out = torch.zeros(9, 32, dtype=torch.float16)

    def launch(x=x, grid=(6, 1)):
        launcher(grid, (x, pos, out, 9, x.stride(0), x.stride(1), 2, 1, 32), {"H": 32, "W": 2, "BLOCK_H": 32}, 4)

    launch()  # first: Triton's run (compiles, launches)
    launch()  # then: direct
    assert len(compiles) == 1 and launcher.direct_launches == 1 and len(launches) == 2
    via_triton, direct = launches
    assert direct[:6] == via_triton[:6] == (6, 1, 1, 0x5EA, 0xF00, ("packed",))  # grid, stream, kernel, metadata
    assert direct[6:9] == (None, None, None)  # no launch metadata, no hooks
    assert direct[9:] == via_triton[9:]  # every kernel parameter, in Triton's order
    assert direct[9:12] == (x, pos, out) and direct[12:] == (9, 32, 1, 2, 1, 32, 32, 2, 32)

    launch(x=torch.zeros(7, 33, dtype=torch.float16)[:6, 1:])  # misaligned, new strides: Triton's run again
    assert len(compiles) == 2 and launcher.direct_launches == 1

    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch()  # a profiler's hook must see the launch: regular path
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert launcher.direct_launches == 1 and launches[-1][7] is not None

    compiled.fail = True
    n = len(launches)
    launch()  # the direct launch raises: switched off, the regular path launches instead
    assert not launcher.enabled and len(launches) == n + 1 and launches[-1][7] is not None


def test_direct_launch_of_every_hot_kernel_matches_triton(fake_triton):
    """Each kernel the layer launches through a Launcher, called as its wrapper calls it: the
    direct launch passes what Triton's run passed (constexprs in the kernel's order, num_stages in
    the key), and a call in another layout (a constexpr passed positionally) keeps the regular path."""
    from moecomm.permute import _triton as EK
    from moecomm.routing import _triton as RK

    fresh, compiled, launches, compiles = fake_triton
    logits = torch.zeros(5, 8)
    ids, w = torch.zeros(5, 2, dtype=torch.int32), torch.zeros(5, 2)
    launcher = Launcher(fresh(RK.route_softmax_topk_kernel))
    args = (logits, ids, w, 5, 8, 8, 1, 2, 2, 1.0)
    cx = {"TOP_K": 2, "RENORMALIZE": True, **RK.softmax_topk_launch_config(8, 2)}
    for _ in range(2):
        launcher((1,), args, cx, 4)
    via_triton, direct = launches
    assert launcher.direct_launches == 1 and direct[:6] == via_triton[:6] and direct[9:] == via_triton[9:]
    assert direct[6:9] == (None, None, None) and direct[9:19] == args

    launcher = Launcher(fresh(EK.combine_kernel))
    eo, dst, y = torch.zeros(10, 16), torch.zeros(5, 2, dtype=torch.int32), torch.zeros(5, 16)
    args = (eo, dst, w, y, 5, 16, 16, 16, 2, 1)
    for stages in (None, None, 3):
        launcher((5, 1), args, {"TOP_K": 2, "HAS_WEIGHTS": True, "BLOCK_T": 1, "BLOCK_H": 16}, 4, stages)
    assert launcher.direct_launches == 1 and len(compiles) == 3  # num_stages=3: a new key, Triton's run

    launcher = Launcher(fresh(EK.combine_kernel))
    for _ in range(2):  # TOP_K positionally: not the (runtime args, constexprs) layout
        launcher((5, 1), (*args, 2), {"HAS_WEIGHTS": True, "BLOCK_T": 1, "BLOCK_H": 16}, 4)
    assert not launcher.enabled and launcher.direct_launches == 0


def test_choose_follows_the_environment_as_it_changes(monkeypatch):
    """choose() caches its decision per environment: a MOECOMM_BACKEND / TRITON_INTERPRET change made
    after earlier calls (as tests and launchers do) is seen by the next call; _env.raw sees it too."""
    import torch

    from moecomm import _env
    from moecomm.jit.backend import Impl, choose

    pytest.importorskip("triton")
    t = torch.zeros(2)
    monkeypatch.delenv("MOECOMM_BACKEND", raising=False)
    assert _env.raw("MOECOMM_BACKEND") is None
    assert choose(t, "test_op") is Impl.REFERENCE
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _env.raw("MOECOMM_BACKEND") in ("triton", b"triton")
    assert choose(t, "test_op") is Impl.TRITON
    assert choose(t.double(), "test_op") is Impl.REFERENCE  # float64: always the reference
    assert choose(torch.zeros(2, device="meta"), "test_op") is Impl.REFERENCE  # neither CPU nor CUDA
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose(t, "test_op") is Impl.REFERENCE
    monkeypatch.setenv("MOECOMM_BACKEND", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose(t, "test_op") is Impl.REFERENCE
