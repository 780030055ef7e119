"""Sampling: moecomm.sampling (sorting-free kernels) vs torch's sort-based sampler and FlashInfer.

# B = batch, V = vocab; probabilities fp32 = softmax(randn * 3); top_p 0.9, top_k 50

    python -m benchmarks.bench_sampling                 # GPU: B1/B128 V128256, B512 V151936
    python -m benchmarks.bench_sampling --quick         # tiny shapes, CPU, seconds (CI smoke test)
    PYTHONPATH=/tmp/fisite python -m benchmarks.bench_sampling --out results.jsonl   # with FlashInfer

Ours, side by side in each row: "moecomm[cuda]" (the default: kernels/sampling/sample.cu, a
histogram pass and a shared-memory list, 1 to 2 reads of the row) with "moecomm[cuda-nomap]" (the
same without the sector map: pass B reads the whole row), the other sector map
("moecomm[cuda-binmap]" by pass-A bins beside the default's by exponents, or "[cuda-expmap]" if
_cuda.SECTOR_MAP_BINS flips), "moecomm[cuda-paired]" / "[cuda-unpaired]" (the other block pairing:
at B128 and B512 the single blocks, at B1 the lean paired ones) and the Triton kernel
"moecomm[deep]" (its default launch configuration; ~1.2 to ~3 reads, every one racing every token)
with "moecomm[v1]" (its previous configuration) as control rows; api.SAMPLE_KERNEL picks between the
two kernels. The ratios and the targets are against moecomm[cuda].

Peers: FlashInfer is timed when `import flashinfer` works in this process (one version per
process: both are the package `flashinfer`; run once per PYTHONPATH). The first lines say what
was found. torch's sampler is the sort-based one serving stacks use (sort, cumsum, mask,
renormalise, torch.multinomial).

Napkin math: one read of the probabilities is B * V * 4 bytes: 64 MB at B128 V128256 (~14 us at
4.8 TB/s), 311 MB at B512 V151936 (~65 us); see the header of kernels/sampling/sample.cu and
moecomm/sampling/_triton.py for each kernel's passes. GB/s below counts one read.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import torch

import moecomm.sampling as S
from moecomm.sampling import reference as ref
from moecomm.testing import ResultWriter, bench, graph_bench

L2_BYTES = 50 * 2**20
TARGETS = {  # (op, B, V) -> the target in ms
    ("top_p", 128, 128256): 0.07, ("top_p", 512, 151936): 0.20,
    ("top_k_top_p", 128, 128256): 0.15, ("top_k_top_p", 512, 151936): 0.30,
}


def torch_sort_sampler(probs, top_k=None, top_p=None):
    """The sort-based sampler of serving stacks: sort descending, mask by cumsum, multinomial."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    if top_k is not None:
        sorted_p = torch.where(torch.arange(probs.shape[1], device=probs.device) < top_k, sorted_p, 0.0)
    if top_p is not None:
        total = sorted_p.sum(-1, keepdim=True)
        before = torch.cumsum(sorted_p, -1) - sorted_p
        sorted_p = torch.where(before < top_p * total, sorted_p, 0.0)
    choice = torch.multinomial(sorted_p, 1)
    return order.gather(1, choice)[:, 0]


def find_flashinfer():
    try:
        import flashinfer
        import flashinfer.sampling  # noqa: F401
    except Exception as exc:  # absent, or present but broken
        return None, f"{type(exc).__name__}: {str(exc)[:120]}"
    return flashinfer, getattr(flashinfer, "__version__", "?")


def _sets(batch, vocab, device, seed=0):
    set_bytes = batch * vocab * 4
    n = max(2, min(32, math.ceil(2 * L2_BYTES / set_bytes))) if device.type == "cuda" else 1
    g = torch.Generator(device=device).manual_seed(seed)
    return [(torch.softmax(torch.randn(batch, vocab, device=device, generator=g) * 3.0, -1),) for _ in range(n)]


def _in_kept(tokens, probs, top_k, top_p) -> float:
    keep = ref.kept_mask(probs, top_k, top_p)
    return keep.gather(1, tokens.long().view(-1, 1)).float().mean().item()


def with_config(name, fn):
    """fn run with moecomm's sampling kernel configuration `name` (_triton.CONFIGS): the control
    rows (the previous configuration timed in the same run as the default)."""
    from moecomm.sampling import _triton

    def run(*args):
        old = _triton.CONFIG
        _triton.CONFIG = name
        try:
            return fn(*args)
        finally:
            _triton.CONFIG = old
    return run


# with_kernel's keywords that are not their _cuda switch in lower case
_SWITCH = {"sector_map": "SECTOR_MAP", "paired": "PAIRED", "map_bins": "SECTOR_MAP_BINS", "split": "SPLIT",
           "paired_map": "PAIRED_TOP_P_SECTOR_MAP"}


def with_kernel(kernel, fn, config=None, **switches):
    """fn run with api.SAMPLE_KERNEL = kernel ("cuda": sample.cu for the calls it covers; "triton":
    the Triton kernel for all), the Triton launch configuration `config` when given, and the _cuda
    switches given set for the call (a switch not given, or given as None, keeps the module's value):
    sector_map (SECTOR_MAP), map_bins (SECTOR_MAP_BINS), paired (PAIRED), split (SPLIT), paired_map
    (PAIRED_TOP_P_SECTOR_MAP), or any other switch by its name in lower case (pass_a_list,
    pass_b_reverse, pass_b_gather, pass_a_pipe, split_slice, pdl)."""
    from moecomm.sampling import _cuda, api

    inner = with_config(config, fn) if config is not None else fn
    names = {_SWITCH.get(k, k.upper()): v for k, v in switches.items() if v is not None}
    for name in names:
        if not hasattr(_cuda, name):
            raise ValueError(f"with_kernel: no _cuda switch {name}")

    def run(*args):
        old_kernel, old = api.SAMPLE_KERNEL, {name: getattr(_cuda, name) for name in names}
        api.SAMPLE_KERNEL = kernel
        for name, v in names.items():
            setattr(_cuda, name, v)
        try:
            return inner(*args)
        finally:
            api.SAMPLE_KERNEL = old_kernel
            for name, v in old.items():
                setattr(_cuda, name, v)
    return run


def map_control():
    """(row name, SECTOR_MAP_BINS) of the sector-map control row: the map the default does not use,
    named from the switch so that the label stays right if the default flips."""
    from moecomm.sampling import _cuda

    bins = not _cuda.SECTOR_MAP_BINS
    return f"moecomm[cuda-{'binmap' if bins else 'expmap'}]", bins


# a control row's name part for a _cuda switch flipped: (when the flip turns it on, when it turns it off)
_FLIP_TAGS = {"PASS_A_LIST": ("passa", "passb"), "PASS_B_REVERSE": ("reverse", "forward"),
              "PASS_B_GATHER": ("gather", "nogather"), "PASS_A_PIPE": ("pipe", "nopipe"),
              "PAIRED_TOP_P_SECTOR_MAP": ("pairedmap", "pairednomap"), "SPLIT_SLICE": ("slice", "noslice"),
              "PDL": ("pdl", "nopdl")}


def flip_row(*switches, op="moecomm"):
    """The name of the row that runs with these _cuda switches flipped (named from their current
    values, so that a label stays right when a default flips): e.g. moecomm[cuda-passa-nopipe]."""
    from moecomm.sampling import _cuda

    tags = (_FLIP_TAGS[sw][1 if getattr(_cuda, sw) else 0] for sw in switches)
    return f"{op}[cuda-{'-'.join(tags)}]"


def _triton_rows(device):
    """{name: Triton configuration} of the Triton kernel's rows beside ours: on a GPU only (on a
    CPU every op runs its reference, and Triton may not be installed)."""
    if device.type != "cuda":
        return {}
    from moecomm.sampling import _triton

    return {f"moecomm[{c}]": c for c in [_triton.CONFIG] + [c for c in _triton.CONFIGS if c != _triton.CONFIG]}


def run_case(writer, device, fi, op, batch, vocab, warmup, rep, triton=True, torch_sort=True):
    sets = _sets(batch, vocab, device)
    top_k = 50 if op == "top_k_top_p" else None
    top_p = 0.9
    ours = "moecomm[cuda]" if device.type == "cuda" else "moecomm"
    if op == "top_p":
        call = lambda p: S.top_p_sampling_from_probs(p, top_p)  # noqa: E731
        seeded = lambda p: S.top_p_sampling_from_probs(p, top_p, seed=1)  # noqa: E731
    else:
        call = lambda p: S.top_k_top_p_sampling_from_probs(p, top_k, top_p)  # noqa: E731
        seeded = lambda p: S.top_k_top_p_sampling_from_probs(p, top_k, top_p, seed=1)  # noqa: E731
    impls = {ours: with_kernel("cuda", call)}
    paired_by_batch, split_by_batch = None, 1
    if device.type == "cuda":  # control rows: pass B reads the whole row; the other block pairing
        from moecomm.sampling import _cuda

        impls["moecomm[cuda-nomap]"] = with_kernel("cuda", call, sector_map=False)
        map_row, other_map = map_control()
        impls[map_row] = with_kernel("cuda", call, map_bins=other_map)
        paired_by_batch = _cuda.paired(device, batch, top_k, top_p)
        other = "unpaired" if paired_by_batch else "paired"
        impls[f"moecomm[cuda-{other}]"] = with_kernel("cuda", call, paired=not paired_by_batch)
        split_by_batch = _cuda.split_blocks(device, batch, top_k, top_p)
        if split_by_batch > 1:  # the split rows' control: one block a row
            impls["moecomm[cuda-nosplit]"] = with_kernel("cuda", call, split=1)
        if paired_by_batch and top_k is None:  # paired top-p's map (PAIRED_TOP_P_SECTOR_MAP): the control flips it
            impls[flip_row("PAIRED_TOP_P_SECTOR_MAP")] = with_kernel(
                "cuda", call, paired_map=not _cuda.PAIRED_TOP_P_SECTOR_MAP)
        if top_k is None:  # top-p's candidates from pass A or pass B: the setting the default does not use
            impls[flip_row("PASS_A_LIST")] = with_kernel("cuda", call, pass_a_list=not _cuda.PASS_A_LIST)
        impls[flip_row("PASS_B_REVERSE")] = with_kernel("cuda", call, pass_b_reverse=not _cuda.PASS_B_REVERSE)
        impls[flip_row("PASS_B_GATHER")] = with_kernel("cuda", call, pass_b_gather=not _cuda.PASS_B_GATHER)
        impls[flip_row("PASS_A_PIPE")] = with_kernel("cuda", call, pass_a_pipe=not _cuda.PASS_A_PIPE)
        if top_k is None:  # pass A's candidates with the other pass A loop
            impls[flip_row("PASS_A_LIST", "PASS_A_PIPE")] = with_kernel(
                "cuda", call, pass_a_list=not _cuda.PASS_A_LIST, pass_a_pipe=not _cuda.PASS_A_PIPE)
    for name, cfg in (_triton_rows(device) if triton else {}).items():  # the Triton kernel: its default, then the control rows
        impls[name] = with_kernel("triton", call, cfg)
    if fi is not None:
        if op == "top_p":
            impls["flashinfer"] = lambda p: fi.sampling.top_p_sampling_from_probs(p, top_p)
        else:
            impls["flashinfer"] = lambda p: fi.sampling.top_k_top_p_sampling_from_probs(p, top_k, top_p)
    if torch_sort:
        impls["torch_sort"] = lambda p: torch_sort_sampler(p, top_k, top_p)
    # validate before timing: every token of each of our kernels lies in the kept set
    kept = {}
    for name in [n for n in impls if n.startswith("moecomm")]:
        kept[name] = _in_kept(impls[name](*sets[0]), sets[0][0], top_k, top_p)
        if kept[name] < 1.0:  # loud, recorded, and the timing still runs (the table must say it)
            print(f"  WARNING {op} B{batch} V{vocab}: {1 - kept[name]:.2%} of {name}'s tokens lie outside the kept set")
    ok = kept[ours]
    # the same seed: the CUDA kernel, every Triton configuration and the reference draw the same tokens
    want = with_kernel("cuda", seeded)(sets[0][0])
    others = {name: with_kernel("triton", seeded, cfg) for name, cfg in (_triton_rows(device) if triton else {}).items()}
    if device.type == "cuda":
        others["moecomm[cuda-nomap]"] = with_kernel("cuda", seeded, sector_map=False)
        if "moecomm[cuda-nosplit]" in impls:
            others["moecomm[cuda-nosplit]"] = with_kernel("cuda", seeded, split=1)
        if flip_row("PAIRED_TOP_P_SECTOR_MAP") in impls:
            others[flip_row("PAIRED_TOP_P_SECTOR_MAP")] = with_kernel(
                "cuda", seeded, paired_map=not _cuda.PAIRED_TOP_P_SECTOR_MAP)
        if flip_row("PASS_A_LIST") in impls:
            others[flip_row("PASS_A_LIST")] = with_kernel("cuda", seeded, pass_a_list=not _cuda.PASS_A_LIST)
        others[flip_row("PASS_B_REVERSE")] = with_kernel("cuda", seeded, pass_b_reverse=not _cuda.PASS_B_REVERSE)
        others[flip_row("PASS_B_GATHER")] = with_kernel("cuda", seeded, pass_b_gather=not _cuda.PASS_B_GATHER)
        others[flip_row("PASS_A_PIPE")] = with_kernel("cuda", seeded, pass_a_pipe=not _cuda.PASS_A_PIPE)
        others[map_row] = with_kernel("cuda", seeded, map_bins=other_map)
        others[f"moecomm[cuda-{other}]"] = with_kernel("cuda", seeded, paired=not paired_by_batch)
    for name, fn in others.items():
        same = (fn(sets[0][0]) == want).float().mean().item()
        if same < 0.995:
            print(f"  WARNING {op} B{batch} V{vocab}: {name} drew other tokens than {ours} on {1 - same:.2%} of rows")
    times = {}
    for name, fn in impls.items():
        try:
            times[name] = bench(fn, sets, warmup=warmup, rep=rep, device=device)
        except Exception as exc:
            print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
    base = times.get("flashinfer")
    t_ours = times[ours].median_ms
    read_bytes = batch * vocab * 4
    how = "[paired]" if paired_by_batch else (f"[split{split_by_batch}]" if device.type == "cuda" and split_by_batch > 1 else "")
    row = f"{op:12s} B{batch:<4d} V{vocab:<7d} {ours}{how} {t_ours:8.4f} ms"
    for name, t in times.items():
        if name != ours:
            row += f" | {name} {t.median_ms:8.4f} ({t.median_ms / t_ours:5.2f}x)"
    target = TARGETS.get((op, batch, vocab))
    if target is not None:
        row += f" | target {target} ms {'met' if t_ours <= target else 'MISSED'}"
        if base is not None:
            row += f", 1.4x FI {'met' if base.median_ms / t_ours >= 1.4 else 'MISSED'}"
    print(row, flush=True)
    for name, t in times.items():
        writer.write(op=op, batch=batch, vocab=vocab, impl=name, top_k=top_k, top_p=top_p,
                     median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                     gbps_one_read=read_bytes / (t.median_ms * 1e-3) / 1e9,
                     speedup_of_ours=t.median_ms / t_ours, target_ms=target, ours_in_kept_set=ok,
                     in_kept_set=kept.get(name),
                     flashinfer=getattr(fi, "__version__", None) if fi is not None else None)


def run_graph_case(writer, device, fi, shapes=((1, 128256),), triton=True):
    """Replayed in a CUDA graph (the decode-step setting, and device time without the host's launch
    cost at any batch): top-p and top-k + top-p at each (batch, vocab) (ours by the batch: split rows
    over a cluster of 8 at B <= 12, "moecomm[cuda-nosplit]" one block a row, the control, where they
    differ), pass B's other direction and pass A's candidates as control rows, and at B1 the map
    controls and the Triton kernel."""
    from moecomm.sampling import _cuda

    top_p = lambda p: S.top_p_sampling_from_probs(p, 0.9)  # noqa: E731
    topk_topp = lambda p: S.top_k_top_p_sampling_from_probs(p, 50, 0.9)  # noqa: E731
    seed_t = torch.full((1,), 1234, dtype=torch.int64, device=device)
    offset_t = torch.zeros(1, dtype=torch.int64, device=device)
    for batch, vocab in shapes:
        sets = _sets(batch, vocab, device)
        fns = {"moecomm[cuda]": with_kernel("cuda", top_p), "moecomm_topk_topp[cuda]": with_kernel("cuda", topk_topp)}
        if _cuda.split_blocks(device, batch, None, 0.9) > 1:
            fns["moecomm[cuda-nosplit]"] = with_kernel("cuda", top_p, split=1)
            fns["moecomm_topk_topp[cuda-nosplit]"] = with_kernel("cuda", topk_topp, split=1)
            fns[flip_row("SPLIT_SLICE")] = with_kernel("cuda", top_p, split_slice=not _cuda.SPLIT_SLICE)
            fns[flip_row("SPLIT_SLICE", op="moecomm_topk_topp")] = with_kernel(
                "cuda", topk_topp, split_slice=not _cuda.SPLIT_SLICE)
        fns[flip_row("PASS_A_LIST")] = with_kernel("cuda", top_p, pass_a_list=not _cuda.PASS_A_LIST)
        fns[flip_row("PASS_B_REVERSE")] = with_kernel("cuda", top_p, pass_b_reverse=not _cuda.PASS_B_REVERSE)
        fns[flip_row("PASS_B_REVERSE", op="moecomm_topk_topp")] = with_kernel(
            "cuda", topk_topp, pass_b_reverse=not _cuda.PASS_B_REVERSE)
        fns[flip_row("PASS_B_GATHER")] = with_kernel("cuda", top_p, pass_b_gather=not _cuda.PASS_B_GATHER)
        fns[flip_row("PASS_B_GATHER", op="moecomm_topk_topp")] = with_kernel(
            "cuda", topk_topp, pass_b_gather=not _cuda.PASS_B_GATHER)
        fns[flip_row("PASS_A_PIPE")] = with_kernel("cuda", top_p, pass_a_pipe=not _cuda.PASS_A_PIPE)
        fns[flip_row("PASS_A_PIPE", op="moecomm_topk_topp")] = with_kernel(
            "cuda", topk_topp, pass_a_pipe=not _cuda.PASS_A_PIPE)
        fns[flip_row("PASS_A_LIST", "PASS_A_PIPE")] = with_kernel(
            "cuda", top_p, pass_a_list=not _cuda.PASS_A_LIST, pass_a_pipe=not _cuda.PASS_A_PIPE)
        if _cuda.paired(device, batch, None, 0.9):  # paired top-p reads the whole row: the map's control
            fns[flip_row("PAIRED_TOP_P_SECTOR_MAP")] = with_kernel(
                "cuda", top_p, paired_map=not _cuda.PAIRED_TOP_P_SECTOR_MAP)
        # seed and offset as device tensors (the graph-replay way to fresh numbers: no draw of a seed
        # on the device a call, one kernel instead of two)
        fns["moecomm[cuda-seedtensor]"] = with_kernel("cuda", lambda p: S.top_p_sampling_from_probs(
            p, 0.9, seed=seed_t, offset=offset_t))
        fns["moecomm_topk_topp[cuda-seedtensor]"] = with_kernel("cuda", lambda p: S.top_k_top_p_sampling_from_probs(
            p, 50, 0.9, seed=seed_t, offset=offset_t))
        # the default seed's randint then ours, launched programmatically or not (PDL)
        fns[flip_row("PDL")] = with_kernel("cuda", top_p, pdl=not _cuda.PDL)
        fns[flip_row("PDL", op="moecomm_topk_topp")] = with_kernel("cuda", topk_topp, pdl=not _cuda.PDL)
        fns["moecomm[cuda]#2"] = with_kernel("cuda", top_p)  # the control row: the default timed twice
        if batch == 1:
            fns["moecomm[cuda-nomap]"] = with_kernel("cuda", top_p, sector_map=False)
            fns[map_control()[0]] = with_kernel("cuda", top_p, map_bins=map_control()[1])
            for name, cfg in (_triton_rows(device) if triton else {}).items():
                fns[name] = with_kernel("triton", top_p, cfg)
                fns[name.replace("moecomm", "moecomm_topk_topp")] = with_kernel("triton", topk_topp, cfg)
        if fi is not None:
            fns["flashinfer"] = lambda p: fi.sampling.top_p_sampling_from_probs(p, 0.9)
            fns["flashinfer_topk_topp"] = lambda p: fi.sampling.top_k_top_p_sampling_from_probs(p, 50, 0.9)
        split = _cuda.split_blocks(device, batch, None, 0.9)
        us = {}
        for name, fn in fns.items():
            try:
                t = graph_bench(fn, sets, replays=50, calls=20)
            except Exception as exc:
                print(f"  graph {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            us[name] = t.median_ms * 1e3
            tag = f" [split{split}]" if split > 1 and name.startswith("moecomm") and "nosplit" not in name else ""
            print(f"cuda graph B{batch} V{vocab} {name:32s} {t.median_ms * 1e3:8.2f} us/call{tag}"
                  f"{' (target 20 us for top-p)' if batch == 1 else ''}", flush=True)
            writer.write(op="graph_top_p" if "topk" not in name else "graph_top_k_top_p", batch=batch, vocab=vocab,
                         impl=name, median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                         target_ms=0.02 if "topk" not in name and batch == 1 else None, split=split)
        for op, ours, fi_name in (("top_p", "moecomm[cuda]", "flashinfer"),
                                  ("top_k_top_p", "moecomm_topk_topp[cuda]", "flashinfer_topk_topp"),
                                  ("top_p seed tensors", "moecomm[cuda-seedtensor]", "flashinfer"),
                                  ("top_k_top_p seed tensors", "moecomm_topk_topp[cuda-seedtensor]",
                                   "flashinfer_topk_topp")):
            if ours in us and fi_name in us:
                key = op.split()[0]
                target = 0.02 if (key, batch) == ("top_p", 1) else TARGETS.get((key, batch, vocab))
                met = "" if target is None else f"; target {target * 1e3:.0f} us {'met' if us[ours] <= target * 1e3 else 'MISSED'}"
                print(f"cuda graph B{batch} V{vocab} {op}: ours {us[ours]:.2f} us, FlashInfer {us[fi_name]:.2f} us "
                      f"({us[fi_name] / us[ours]:.2f}x; 1.4x {'met' if us[fi_name] / us[ours] >= 1.4 else 'MISSED'}){met}",
                      flush=True)


_FIRST_CALL = r"""
import sys, time
t0 = time.perf_counter()
import torch
import moecomm.sampling as S
name, batch, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
p = torch.softmax(torch.randn(batch, vocab, device="cuda") * 3, -1)
lg = torch.randn(batch, vocab, device="cuda")
torch.cuda.synchronize()
fn = {"sampling_from_probs": lambda: S.sampling_from_probs(p),
      "top_p_sampling_from_probs": lambda: S.top_p_sampling_from_probs(p, 0.9),
      "top_k_top_p_sampling_from_probs": lambda: S.top_k_top_p_sampling_from_probs(p, 50, 0.9),
      "min_p_sampling_from_probs": lambda: S.min_p_sampling_from_probs(p, 0.1),
      "top_k_top_p_sampling_from_logits": lambda: S.top_k_top_p_sampling_from_logits(lg, 50, 0.9),
      "top_p_renorm_probs": lambda: S.top_p_renorm_probs(p, 0.9),
      "softmax": lambda: S.softmax(lg, 0.7)}[name]
t = time.perf_counter(); fn(); torch.cuda.synchronize(); first = time.perf_counter() - t
t = time.perf_counter(); fn(); torch.cuda.synchronize(); second = time.perf_counter() - t
print(f"FIRST {first:.3f} {second:.4f} {t - t0 - first:.2f}")
"""
# (function, batch, vocab): B4 takes the split entries (a row over 8 blocks), B512 the paired ones
FIRST_CALLS = [("sampling_from_probs", 4, 128256), ("top_p_sampling_from_probs", 4, 128256),
               ("top_p_sampling_from_probs", 512, 151936), ("top_k_top_p_sampling_from_probs", 4, 128256),
               ("top_k_top_p_sampling_from_probs", 512, 151936), ("min_p_sampling_from_probs", 4, 128256),
               ("top_k_top_p_sampling_from_logits", 4, 128256), ("top_p_renorm_probs", 4, 128256),
               ("softmax", 4, 128256)]


def run_first_call(writer, cache_dir):
    """The first call of each function (and shape: another entry of sample.cu) in a fresh process,
    compilation included, each process with its own empty Triton and moecomm caches under cache_dir
    ("cold"), then again in a fresh process over the cache it left ("warm"). The cold round's
    processes run at once (one core each of the GPU host's 16: each compiler runs on one), so a cold
    figure is an upper bound of that call alone; the warm round's run one after the other (~5 s each:
    nine processes at once spent 5-6 s in imports and CUDA inits and put one warm call at 2.7 s)."""
    for label in ("cold", "warm"):
        procs = []
        for i, (name, batch, vocab) in enumerate(FIRST_CALLS):
            d = os.path.join(cache_dir, f"c{i}")
            env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(d, "triton"), MOECOMM_CACHE_DIR=d)
            procs.append(subprocess.Popen([sys.executable, "-c", _FIRST_CALL, name, str(batch), str(vocab)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            if label == "warm":
                procs[-1] = (procs[-1], procs[-1].communicate(timeout=300))
        for (name, batch, vocab), proc in zip(FIRST_CALLS, procs):
            proc, (out, err) = proc if isinstance(proc, tuple) else (proc, proc.communicate(timeout=300))
            line = [ln for ln in out.splitlines() if ln.startswith("FIRST")]
            if proc.returncode != 0 or not line:
                print(f"first call ({label}) {name} B{batch} failed: {err[-500:]}")
                continue
            first, second, start = (float(v) for v in line[0].split()[1:])
            print(f"first call, {label} cache: {name:34s} B{batch:<4d} V{vocab} {first:7.3f} s (second call "
                  f"{second * 1e3:.2f} ms; import + CUDA init + inputs {start:.2f} s){'' if first <= (20 if label == 'cold' else 1) else '  OVER TARGET'}",
                  flush=True)
            writer.write(op="first_call", cache=label, impl=name, batch=batch, vocab=vocab, median_ms=first * 1e3,
                         target_ms=(20 if label == "cold" else 1) * 1e3)


_COMPILE = r"""
import sys, time
from moecomm.jit import cuda
from moecomm.sampling import _cuda
t = time.perf_counter()
flags = _cuda.entry_flags(sys.argv[1], ("-DMOECOMM_SAMPLE_PROFILE",) if sys.argv[2] == "profile" else ())
c = cuda.compile(sys.argv[3], flags=flags)
print(f"COMPILED {sys.argv[3]} {sys.argv[1]} {sys.argv[2]} {time.perf_counter() - t:.2f} s compiled={c.compiled}")
"""


def precompile(sources=()) -> None:
    """Every entry of sample.cu (and its profile build's) compiled into MOECOMM_CACHE_DIR by processes
    started at once, each entry its own translation unit (_cuda.entry_flags). A later run (the
    tests, the benchmark, profile_sampling) finds them on disk. sources: also these copies of
    sample.cu (paths under kernels/: profile_sampling's --source / --base-source trials), top-p's
    entries only."""
    from moecomm.sampling import _cuda

    entries = sorted({*_cuda.ENTRY.values(), *_cuda.PAIRED_ENTRY.values(), *_cuda.SPLIT_ENTRY.values()})
    trial_entries = {e for e in entries if "_qsum" in e}  # (top-p's)
    t = time.perf_counter()
    procs = [(e, b, subprocess.Popen([sys.executable, "-c", _COMPILE, e, b, src], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
             for src in (_cuda.SOURCE, *sources) for b in ("production", "profile") for e in entries
             if src == _cuda.SOURCE or e in trial_entries]
    for e, b, proc in procs:
        out, _ = proc.communicate(timeout=300)
        print(out.strip() if proc.returncode == 0 else f"precompile {e} {b} failed: {out[-400:]}", flush=True)
    print(f"precompile: {len(procs)} cubins in {time.perf_counter() - t:.1f} s", flush=True)


def run_sweep(device):
    """Launch configurations of the Triton sampling kernel (_triton.CONFIGS, and variations of the
    default) on the benchmark's rows; each line names its configuration."""
    from moecomm.sampling import _triton

    base = dict(_triton.CONFIGS[_triton.CONFIG])
    trials = dict(_triton.CONFIGS)
    for over in (dict(depth=2), dict(pivots=4, pivots_counted=4), dict(block=1024, depth=4),
                 dict(block_counted=2048, pivots_counted=4), dict(pivots=16)):
        trials["+".join(f"{k}={v}" for k, v in over.items())] = {**base, **over}
    for name, cfg in trials.items():
        _triton.CONFIGS["sweep"] = cfg
        row = f"sweep {name:28s} {cfg}:"
        for op, batch, vocab in (("top_p", 128, 128256), ("top_p", 512, 151936), ("top_k_top_p", 128, 128256),
                                 ("top_k_top_p", 512, 151936)):
            sets = _sets(batch, vocab, device)
            fn = (lambda p: S.top_p_sampling_from_probs(p, 0.9)) if op == "top_p" else (
                lambda p: S.top_k_top_p_sampling_from_probs(p, 50, 0.9))
            t = bench(with_kernel("triton", fn, "sweep"), sets, warmup=5, rep=20, device=device)
            row += f" {op} B{batch} {t.median_ms:.4f} ms;"
        t = graph_bench(with_kernel("triton", lambda p: S.top_p_sampling_from_probs(p, 0.9), "sweep"), _sets(1, 128256, device),
                        replays=20, calls=10)
        row += f" graph top_p B1 {t.median_ms * 1e3:.1f} us"
        print(row, flush=True)
    _triton.CONFIGS.pop("sweep", None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on whatever device (CI)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--first-call-cache", default=None, help="an empty folder: also time first calls (cold, warm)")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations of our kernel")
    parser.add_argument("--graph-batches", default="1", help="batches of the CUDA-graph rows at V128256, comma-separated")
    parser.add_argument("--graph-shapes", default=None, help="CUDA-graph rows as B:V,B:V (instead of --graph-batches)")
    parser.add_argument("--shapes", default=None, help="eager rows, as B:V,B:V (default: B1/B128 V128256, B512 V151936)")
    parser.add_argument("--ops", default="top_p,top_k_top_p", help="eager ops, comma-separated")
    parser.add_argument("--no-triton", action="store_true", help="leave out the Triton kernel's rows")
    parser.add_argument("--no-torch", action="store_true", help="leave out torch's sort-based sampler")
    parser.add_argument("--precompile", action="store_true", help="only compile every entry at once (and exit)")
    parser.add_argument("--precompile-source", action="append", default=[],
                        help="with --precompile: also this copy of sample.cu (a path under kernels/; repeatable)")
    parser.add_argument("--first-call-only", action="store_true",
                        help="with --first-call-cache: only the first calls (no timed rows)")
    args = parser.parse_args(argv)
    if args.precompile:
        precompile(args.precompile_source)
        return 0
    if args.first_call_only:
        if not args.first_call_cache:
            parser.error("--first-call-only needs --first-call-cache")
        run_first_call(ResultWriter(args.out), args.first_call_cache)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fi, fi_info = find_flashinfer() if device.type == "cuda" else (None, "not tried on CPU")
    writer = ResultWriter(args.out)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"peers: torch sort-based sampler; FlashInfer {'found: ' + fi_info if fi is not None else 'not found (' + fi_info + ')'}")
    print("columns: median ms; (x) = that peer's time / ours, > 1 means ours is faster")
    shapes = [(4, 1000)] if args.quick else [(1, 128256), (128, 128256), (512, 151936)]
    if args.shapes and not args.quick:
        shapes = [tuple(int(v) for v in sv.split(":")) for sv in args.shapes.split(",")]
    warmup, rep = (1, 3) if args.quick else (10, 50)
    for op in args.ops.split(","):
        for batch, vocab in shapes:
            run_case(writer, device, fi, op, batch, vocab, warmup, rep, triton=not args.no_triton,
                     torch_sort=not args.no_torch)
    if device.type == "cuda" and not args.quick:
        gshapes = [(int(b), 128256) for b in args.graph_batches.split(",")]
        if args.graph_shapes:
            gshapes = [tuple(int(v) for v in sv.split(":")) for sv in args.graph_shapes.split(",")]
        run_graph_case(writer, device, fi, shapes=gshapes, triton=not args.no_triton)
        if args.sweep:
            run_sweep(device)
        if args.first_call_cache:
            run_first_call(writer, args.first_call_cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
