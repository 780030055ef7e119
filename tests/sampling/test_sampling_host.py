"""The host path of an eager sampling call on CUDA tensors, run on CPU tensors by
moecomm.testing.fake_cuda.gpu_host_mock (the real dispatch, plan and launch over a fake libcuda):
what reaches cuLaunchKernel is plan_launch's argument list (the one tests/sampling/test_sampling_cuda.py
checks against the kernel's PTX signature and runs through the host emulation)."""

from __future__ import annotations

import pytest
import torch

import moecomm.sampling as S
from moecomm.sampling import _cuda
from moecomm.testing import fake_cuda

pytestmark = pytest.mark.skipif(fake_cuda.compiler_error() is not None, reason="no C compiler: no fake driver")
KERNELS = [(_cuda.SOURCE, e, _cuda.entry_flags(e)) for e in _cuda.ENTRY.values()]


def _probs(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=g) * 3, -1)


def _launched(lib):
    """The last launch's 20 parameters as the kernel reads them (SIGNATURE's C types)."""
    ptrs = lib.fake_last_params()
    return [t.from_address(ptrs[i]).value or 0 for i, t in enumerate(_cuda.SIGNATURE.types)]


def _planned(plan):
    return [a.data_ptr() if isinstance(a, torch.Tensor) else (a.value or 0) for a in plan.args]


@pytest.mark.parametrize("kw", [{"top_p": 0.9}, {"top_k": 50, "top_p": 0.5}, {"min_p": 0.1},
                                {"top_k": 7, "top_p": 0.8, "seed": -5, "offset": 2**40 + 3}])
def test_the_launch_packs_plan_launchs_arguments(kw, monkeypatch):
    """Each call launches once, with exactly the values of plan_launch's ctypes arguments for the
    same tensors (captured from launch_sample), its entry's grid, block and shared memory."""
    x = _probs(3, 1000)
    plans = []
    real = _cuda.launch_sample

    def spy(*args, **kw):
        x_, rowmap, num_rows, out, valid, logprob = args[:6]
        top_k, top_p, min_p, _temperature, tkf, seed, offset, prs = args[9:]
        plans.append(_cuda.plan_launch(x_, rowmap, num_rows, out, valid, logprob, top_k, top_p, min_p, tkf, seed, offset, prs))
        return real(*args, **kw)

    monkeypatch.setattr(_cuda, "launch_sample", spy)
    with fake_cuda.gpu_host_mock(kernels=KERNELS) as mock:
        before = mock.launches()
        S.sample(probs=x, **kw)
        assert mock.launches() == before + 1
        got = _launched(mock.lib)
    assert got == _planned(plans[0])
    assert [mock.lib.fake_last_dim(i) for i in range(7)] == [3, 1, 1, _cuda.THREADS, 1, 1, plans[0].shared_bytes]


# ---------------------------------------------------------------------------------------------
# the default randomness (api's module docstring): the generator's Philox state read on the host
# in eager calls, a seed drawn on the device under capture or compile


class _CudaGenerator(torch.Generator):
    """A torch.Generator that reads as a CUDA generator of device 0 (FakeCudaGenerator's state)."""

    def __new__(cls, seed):
        return super().__new__(cls)  # torch.Generator's own argument is the device

    def __init__(self, seed):
        super().__init__()
        self.state = fake_cuda.FakeCudaGenerator(seed)

    @property
    def device(self):
        return torch.device("cuda", 0)

    def initial_seed(self):
        return self.state.initial_seed()

    def get_offset(self):
        return self.state.get_offset()

    def set_offset(self, offset):
        self.state.set_offset(offset)


def _seeds_launched(monkeypatch):
    """The (seed, offset) each launch_sample call receives (ints, or the seed tensor)."""
    seen = []
    real = _cuda.launch_sample
    monkeypatch.setattr(_cuda, "launch_sample", lambda *a, **k: (seen.append((a[14], a[15])), real(*a, **k))[1])
    return seen


def _tokens(x, seed, offset, top_p=0.9):
    """The tokens sample.cu draws for (seed, offset): the reference's (the kernel equals it bit for
    bit, tests/sampling/test_sampling_cuda.py)."""
    return S.reference.sample(x, from_logits=False, top_p=top_p, seed=torch.tensor([seed]),
                              offset=torch.tensor([offset]))[0]


def test_eager_default_randomness_reads_and_advances_the_generator(monkeypatch):
    """Eager, not capturing: seed = initial_seed() (as int64), offset = get_offset(), the offset
    advanced by 4 per call; no device draw (torch.randint is not called); the same state gives the
    same (seed, offset), hence the same tokens; successive calls give fresh numbers."""
    seen = _seeds_launched(monkeypatch)
    monkeypatch.setattr(torch, "randint", lambda *a, **k: pytest.fail("drew the seed on the device"))
    x = _probs(64, 1000, seed=1)[:1].expand(64, -1)
    with fake_cuda.gpu_host_mock(kernels=KERNELS) as mock:
        gen = mock.generator
        gen.manual_seed(2**64 - 3)  # initial_seed is unsigned: passed as its int64 bits
        for _ in range(3):
            S.top_p_sampling_from_probs(x, 0.9)
        assert gen.get_offset() == 12
        gen.manual_seed(2**64 - 3)
        S.top_p_sampling_from_probs(x, 0.9)
    assert seen == [(-3, 0), (-3, 4), (-3, 8), (-3, 0)]
    first, second = _tokens(x, -3, 0), _tokens(x, -3, 4)
    assert not torch.equal(first, second)  # fresh numbers call after call (64 rows of one distribution)


def test_eager_default_randomness_does_not_depend_on_the_batch(monkeypatch):
    """A call's (seed, offset) depends on the generator's state only: after the same seeding, a
    1-row and a 5-row call get the same, so row 0 draws the same token in both."""
    seen = _seeds_launched(monkeypatch)
    x = _probs(5, 1000, seed=4)
    with fake_cuda.gpu_host_mock(kernels=KERNELS) as mock:
        mock.generator.manual_seed(7)
        S.top_p_sampling_from_probs(x[:1], 0.9)
        mock.generator.manual_seed(7)
        S.top_p_sampling_from_probs(x, 0.9)
    assert seen == [(7, 0), (7, 0)]
    assert torch.equal(_tokens(x[:1], 7, 0), _tokens(x, 7, 0)[:1])


def test_a_given_generator_is_the_one_read(monkeypatch):
    """generator= (a CUDA generator of the tensor's device): its state seeds the call and it is
    the one advanced; the default generator is untouched."""
    seen = _seeds_launched(monkeypatch)
    g = _CudaGenerator(11)
    with fake_cuda.gpu_host_mock(kernels=KERNELS) as mock:
        S.top_k_top_p_sampling_from_probs(_probs(2, 1000), 50, 0.9, generator=g)
        S.min_p_sampling_from_probs(_probs(2, 1000), 0.1, generator=g)
        assert mock.generator.get_offset() == 0
    assert seen == [(11, 0), (11, 4)] and g.get_offset() == 8


def test_under_capture_the_seed_is_drawn_on_the_device(monkeypatch):
    """While a CUDA graph is captured the seed is a device tensor from torch.randint (a replay
    draws it afresh; host ints would be frozen into the graph) and the generator is not read."""
    seen = _seeds_launched(monkeypatch)
    with fake_cuda.gpu_host_mock(kernels=KERNELS, capturing=True) as mock:
        S.top_p_sampling_from_probs(_probs(2, 1000), 0.9)
        assert mock.generator.get_offset() == 0
        flags = _launched(mock.lib)[18]
    (seed, offset), = seen
    assert isinstance(seed, torch.Tensor) and seed.dtype is torch.int64 and seed.shape == (1,) and offset == 0
    assert flags & _cuda.F_SEED_TENSOR


def test_a_seed_drawn_under_capture_launches_programmatically(monkeypatch):
    """The seed api drew by torch.randint (under capture) is the stream's last kernel: with PDL on, on a
    device that has it, the kernel goes through cuLaunchKernelEx with programmatic stream
    serialisation; not with PDL off, not for a seed the caller gave (its kernel is not known), not for
    the eager host seed, and not while compiling (compiled code may put kernels between)."""
    monkeypatch.setattr(_cuda, "programmatic_ok", lambda device: True)  # the mock's tensors are CPU ones
    monkeypatch.setattr(_cuda, "PDL", True)
    x = _probs(2, 1000)

    def programmatic(call, **mock_kw):
        with fake_cuda.gpu_host_mock(kernels=KERNELS, **mock_kw) as mock:
            before, launches = mock.programmatic_launches(), mock.launches()
            call()
            assert mock.launches() == launches + 1
            n = mock.programmatic_launches() - before
            if n:
                assert (mock.lib.fake_last_attr(0), mock.lib.fake_last_attr(1)) == (6, 1)
            return n

    assert programmatic(lambda: S.top_p_sampling_from_probs(x, 0.9), capturing=True) == 1
    assert programmatic(lambda: S.top_k_top_p_sampling_from_probs(x, 20, 0.9), capturing=True) == 1
    assert programmatic(lambda: S.top_p_sampling_from_probs(x, 0.9)) == 0  # eager: the host's seed
    seed = torch.tensor([5])
    assert programmatic(lambda: S.top_p_sampling_from_probs(x, 0.9, seed=seed), capturing=True) == 0
    monkeypatch.setattr(_cuda, "PDL", False)
    assert programmatic(lambda: S.top_p_sampling_from_probs(x, 0.9), capturing=True) == 0
    monkeypatch.setattr(_cuda, "PDL", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert programmatic(lambda: S.top_p_sampling_from_probs(x, 0.9), capturing=True) == 0
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(_cuda, "programmatic_ok", lambda device: False)  # before sm_90
    assert programmatic(lambda: S.top_p_sampling_from_probs(x, 0.9), capturing=True) == 0


def test_when_the_seed_comes_from_the_device(monkeypatch):
    """_philox_on_host answers None (the device draws) under torch.compile, under capture, for a
    CPU tensor, for a tensor of another device than the current one, for a generator of another
    device, and for a generator without get_offset (an older torch)."""
    from moecomm.sampling import api

    dev0, dev1 = torch.device("cuda", 0), torch.device("cuda", 1)
    with fake_cuda.gpu_host_mock(kernels=KERNELS) as mock:
        assert api._philox_on_host(None, dev0, True) == (mock.generator.initial_seed(), 0)
        assert api._philox_on_host(None, dev0, False) is None  # CPU
        assert api._philox_on_host(None, dev1, True) is None  # current device is 0
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        assert api._philox_on_host(None, dev1, True) is None  # no default generator for device 1 here
        monkeypatch.undo()
        assert api._philox_on_host(torch.Generator(), dev0, True) is None  # a CPU generator
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert api._philox_on_host(None, dev0, True) is None
        monkeypatch.undo()
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert api._philox_on_host(None, dev0, True) is None
        monkeypatch.undo()
        monkeypatch.setattr(fake_cuda.FakeCudaGenerator, "get_offset", None)
        assert api._philox_on_host(None, dev0, True) is None
        monkeypatch.undo()
        assert mock.generator.get_offset() == 4  # only the first call advanced it


def test_logprobs_are_computed_only_when_asked_for(monkeypatch):
    """The functions that return no log-probabilities launch without a logprob buffer (no
    F_LOGPROB, the dummy pointer: one allocation less); S.sample(return_logprobs=True) passes one;
    the tokens do not depend on it (same seed, same tokens from the reference either way)."""
    seen = []
    real = _cuda.launch_sample
    monkeypatch.setattr(_cuda, "launch_sample", lambda *a, **k: (seen.append(a[5]), real(*a, **k))[1])
    x = _probs(4, 1000)
    with fake_cuda.gpu_host_mock(kernels=KERNELS) as mock:
        S.top_p_sampling_from_probs(x, 0.9, seed=3)
        no_lp = _launched(mock.lib)[18]
        out = S.sample(probs=x, top_p=0.9, seed=3, return_logprobs=True)
        with_lp = _launched(mock.lib)[18]
    assert seen[0] is None and isinstance(seen[1], torch.Tensor) and out.logprobs is seen[1]
    assert not no_lp & _cuda.F_LOGPROB and with_lp & _cuda.F_LOGPROB
    a = S.sample(probs=x, top_p=0.9, seed=3)  # CPU: the reference, with and without log-probabilities
    b = S.sample(probs=x, top_p=0.9, seed=3, return_logprobs=True)
    assert a.logprobs is None and torch.equal(a.tokens, b.tokens) and torch.equal(a.valid, b.valid)
    torch.testing.assert_close(b.logprobs, torch.log(x.gather(1, b.tokens.long()[:, None])[:, 0]), atol=1e-5, rtol=0)
