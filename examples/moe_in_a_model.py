"""The moecomm MoE layer inside a small model, trained for a few steps.

    python examples/moe_in_a_model.py            # CPU or GPU, a few seconds on a laptop CPU

A decoder-style block (pre-norm, attention, pre-norm, MoE feed-forward, residuals) stacked twice,
learning to copy a random token sequence shifted by one. The MoE layer drops in where a dense MLP
would be: `moecomm.MoE(hidden, intermediate, num_experts, top_k)` maps [batch, seq, hidden] to the
same shape. Its router and experts are ordinary parameters, so any torch optimizer trains them.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import moecomm


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, num_experts: int, top_k: int, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = nn.LayerNorm(hidden, **kw)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True, **kw)
        self.norm2 = nn.LayerNorm(hidden, **kw)
        # the MoE feed-forward: 2 of num_experts gated MLPs per token, weights renormalised (Mixtral)
        self.moe = moecomm.MoE(hidden, 2 * hidden, num_experts, top_k, renormalize=True, **kw)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:  # x [B, S, H]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.moe(self.norm2(x))  # [B, S, H] -> [B, S, H]


class TinyMoEModel(nn.Module):
    def __init__(self, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4, num_experts: int = 8,
                 top_k: int = 2, dtype=torch.float32, device=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, dtype=dtype, device=device)
        self.blocks = nn.ModuleList(Block(hidden, heads, num_experts, top_k, dtype, device) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, dtype=dtype, device=device)
        self.head = nn.Linear(hidden, vocab, bias=False, dtype=dtype, device=device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens [B, S] -> logits [B, S, vocab]
        S = tokens.shape[1]
        causal = torch.triu(torch.ones(S, S, dtype=torch.bool, device=tokens.device), diagonal=1)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.norm(x))


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = TinyMoEModel(dtype=dtype, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (8, 17), device=dev)  # a fixed batch: the model should learn it
    t0 = time.perf_counter()
    for step in range(args.steps):
        logits = model(data[:, :-1])  # predict token t+1 from tokens <= t
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # through the router, the experts' grouped GEMMs and the combine
        opt.step()
        if step == 0:
            first = loss.item()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}", flush=True)
    print(f"loss {first:.3f} -> {loss.item():.3f} in {args.steps} steps, {time.perf_counter() - t0:.1f} s on {dev.type}")
    return loss.item() / first


if __name__ == "__main__":
    main()
