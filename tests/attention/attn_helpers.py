"""Random paged KV caches for the attention tests: pages shuffled, spare pages left unused, NaN in
every unused slot (a kernel that reads a slot it must not read returns NaN and fails the test)."""

from __future__ import annotations

import math

import torch


class PagedKV:
    """A random paged cache for requests of the given KV lengths.

    Attributes: k, v ([num_pages, P, Hk, D] NHD, or [num_pages, Hk, P, D] HND), indptr [B + 1],
    indices, last_page_len [B] (int32, host), layout, page_size.
    """

    def __init__(self, kv_lens, num_kv_heads, head_dim, page_size, dtype=torch.float16, layout="NHD", device="cpu",
                 spare=3, seed=0):
        gen = torch.Generator().manual_seed(seed)
        npages = [math.ceil(n / page_size) for n in kv_lens]
        num_pages = sum(npages) + spare
        perm = torch.randperm(num_pages, generator=gen)
        self.indptr = torch.tensor([0] + torch.tensor(npages, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
        self.indices = perm[: int(self.indptr[-1])].to(torch.int32)
        self.last_page_len = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, npages)],
                                          dtype=torch.int32)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        k = torch.full(shape, float("nan"))
        v = torch.full(shape, float("nan"))
        for b, n in enumerate(kv_lens):  # fill only the slots that hold tokens
            for t in range(n):
                page = int(self.indices[int(self.indptr[b]) + t // page_size])
                k[page, t % page_size] = torch.randn(num_kv_heads, head_dim, generator=gen)
                v[page, t % page_size] = torch.randn(num_kv_heads, head_dim, generator=gen)
        if layout == "HND":
            k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        self.k, self.v = k.to(dtype).to(device), v.to(dtype).to(device)
        self.layout, self.page_size, self.num_pages = layout, page_size, num_pages
        self.kv_lens = list(kv_lens)


def workspace(device="cpu", mb=32):
    return torch.empty(mb << 20, dtype=torch.uint8, device=device)


# Tolerances. Outputs are convex combinations of V rows (|v| ~ 1), accumulated in fp32, and rounded
# once to the output dtype: fp16 keeps 11 bits (ulp 2^-10 near 1), so 2e-3 absolute is ~2 ulp. The
# probabilities enter the P.V product rounded to the input dtype (as every flash kernel does): with
# fp16 that adds < 2^-11 relative per weight, averaged over the keys: well under the bound. LSEs are
# fp32 in both: 1e-4 absolute (logits are O(10), fp32 sums over <= 33000 terms).
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}
LSE_ATOL = 1e-4


def request_kv(cache: PagedKV, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Request b's keys and values [n, Hk, D], float64 on the CPU, gathered token by token through
    the page table (written without reference.py's helpers); None for a request with no keys."""
    n = cache.kv_lens[b]
    if n == 0:
        return None
    k_nhd = cache.k if cache.layout == "NHD" else cache.k.transpose(1, 2)
    v_nhd = cache.v if cache.layout == "NHD" else cache.v.transpose(1, 2)
    slots = [(int(cache.indices[int(cache.indptr[b]) + t // cache.page_size]), t % cache.page_size) for t in range(n)]
    return (torch.stack([k_nhd[p, s] for p, s in slots]).double().cpu(),
            torch.stack([v_nhd[p, s] for p, s in slots]).double().cpu())

