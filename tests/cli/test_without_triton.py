"""Without Triton (not a dependency of moecomm) every op runs its reference and the demos pass.

Each test runs a fresh interpreter in which `import triton` fails: a sitecustomize on PYTHONPATH puts
a meta-path finder first that refuses every `triton` module (as on a machine where it was never
installed). Subprocesses (the ranks of `demo -n 2`) inherit PYTHONPATH, so they are blocked too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120

_BLOCKER = '''
import sys


class _NoTriton:
    """`import triton` fails as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
for _name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
    del sys.modules[_name]
'''


@pytest.fixture(scope="module")
def no_triton_env(tmp_path_factory) -> dict[str, str]:
    shim = tmp_path_factory.mktemp("no_triton")
    (shim / "sitecustomize.py").write_text(_BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("MOECOMM_BACKEND", None)
    return env


def _run(args: list[str], env: dict[str, str], **extra_env: str) -> str:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(env, **extra_env), capture_output=True,
                       text=True, timeout=TIMEOUT_S)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out


def test_the_blocker_blocks(no_triton_env):
    p = subprocess.run([sys.executable, "-c", "import triton"], env=no_triton_env, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert p.returncode != 0 and "No module named 'triton'" in p.stderr, p.stderr


def test_every_public_module_imports(no_triton_env):
    code = textwrap.dedent("""
        import importlib, pkgutil, moecomm
        names = [m.name for m in pkgutil.walk_packages(moecomm.__path__, "moecomm.")
                 if not any(part.startswith("_") for part in m.name.split("."))]
        failed = []
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
        assert "triton" not in __import__("sys").modules
        print(len(names), "modules;", "failed:", failed)
    """)
    out = _run(["-c", code], no_triton_env)
    assert "failed: []" in out, out
    assert int(out.split()[0]) > 20, out  # walked the whole package


def test_info_says_triton_is_missing(no_triton_env):
    out = _run(["-m", "moecomm.cli", "info"], no_triton_env)
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.splitlines() if "  " in line}
    assert rows["backend triton"].startswith("no: ModuleNotFoundError"), out
    assert rows["backend reference"].startswith("yes"), out


# Forced onto Triton (MOECOMM_BACKEND=triton TRITON_INTERPRET=1: the kernels through the interpreter),
# routing, permute, gemm, the EP path's kernels and attention's
# each op must still run, and run its reference: the results must equal the reference's exactly.
_OPS = textwrap.dedent("""
    import torch
    from moecomm.routing import route
    from moecomm.routing.reference import route_softmax_topk
    from moecomm.permute import permute, unpermute
    from moecomm.gemm import expert_mlp, expert_mlp_reference, grouped_mm, grouped_mm_reference
    from moecomm.ep.nccl.virtual import virtual_ep_forward
    from moecomm.ep.placement import placement_from_list
    from moecomm.ep.reference import ep_reference

    torch.manual_seed(0)
    T, H, I, E, k = 13, 16, 8, 4, 2
    logits = torch.randn(T, E)
    ids, w = route(logits, top_k=k, renormalize=True)
    ref_ids, ref_w = route_softmax_topk(logits, k, True, 1.0)
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
    x = torch.randn(T, H)
    p = permute(x, ids, E)
    assert torch.equal(p.permuted[p.indices.dst_row.long().flatten()], x.repeat_interleave(k, 0))
    y = unpermute(p.permuted, p.indices, w)
    assert torch.allclose(y, x * w.sum(1, keepdim=True), atol=1e-6)
    offs = p.indices.expert_offsets
    wg, wd = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    assert torch.equal(grouped_mm(p.permuted, wg, offs, layout="enk"),
                       grouped_mm_reference(p.permuted, wg, offs, layout="enk"))
    assert torch.equal(expert_mlp(p.permuted, wg, wd, offs), expert_mlp_reference(p.permuted, wg, wd, offs))
    placement = placement_from_list(E, 2, None)
    xs = [torch.randint(-4, 5, (T, H)).float() for _ in range(2)]
    idss = [torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int() for _ in range(2)]
    ws = [torch.ones(T, k) for _ in range(2)]
    run = virtual_ep_forward(xs, idss, ws, placement, lambda rows, e, rw: rows * (e[:, None] + 1) * rw[:, None])
    ref = ep_reference(xs, idss, ws, placement, lambda rows, e: rows * (e + 1))
    assert all(torch.equal(a, b) for a, b in zip(run.y, ref.y))
    from moecomm.attention.merge import merge_states
    v, s = torch.randn(3, 2, 4, 8), torch.zeros(3, 2, 4)  # two partial states of equal weight
    out, out_s = merge_states(v, s)
    assert torch.allclose(out, v.mean(1), atol=1e-6) and torch.allclose(out_s, torch.ones(3, 4))
    import sys
    assert "triton" not in sys.modules
    print("every op ran its reference")
""")


def test_every_capability_runs_its_reference(no_triton_env):
    out = _run(["-c", _OPS], no_triton_env, MOECOMM_BACKEND="triton", TRITON_INTERPRET="1")
    assert "every op ran its reference" in out, out


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_demo_runs(no_triton_env, backend):
    out = _run(["-m", "moecomm.cli", "demo"], no_triton_env, MOECOMM_BACKEND=backend)
    assert "all checks passed" in out, out


def test_expert_parallel_demo_runs(no_triton_env):
    out = _run(["-m", "moecomm.cli", "demo", "-n", "2", "--tokens-per-rank=16"], no_triton_env)
    assert "all ranks match the reference" in out, out
