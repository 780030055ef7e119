"""End to end: a tiny Llama and a tiny Qwen3-MoE (transformers 5.17, random weights) decoding through
moecomm.attention (our RoPE, append_paged_kv_cache, paged prefill for the prompts, paged decode for
each new token, one plan per step shared by every layer; the Qwen3-MoE blocks replaced by moecomm's
MoE layer) generate the same greedy tokens as transformers' own generate() with its attention.

# B = batch, nnz = tokens of a step, H = hidden, Hq / Hk = heads, D = head_dim, P = page_size
"""

from __future__ import annotations

import pytest
import torch

import moecomm.attention as A

transformers = pytest.importorskip("transformers")

PAGE = 4


class PagedEngine:
    """The minimum an inference engine needs: pages handed out per request as it grows, one K/V cache
    per layer, the transformers model's weights for everything but attention and RoPE."""

    def __init__(self, model, num_pages=64, device="cpu"):
        cfg = model.config
        self.model, self.device = model, device
        self.Hq, self.Hk, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.theta = cfg.rope_parameters["rope_theta"]
        shape = (num_pages, PAGE, self.Hk, self.D)
        self.caches = [(torch.zeros(shape, device=device), torch.zeros(shape, device=device))
                       for _ in range(cfg.num_hidden_layers)]
        self.free = list(range(num_pages))[::-1]
        self.pages: list[list[int]] = []
        self.lens: list[int] = []
        ws = torch.empty(8 << 20, dtype=torch.uint8, device=device)
        self.prefill = A.BatchPrefillWithPagedKVCacheWrapper(ws)
        self.decode = A.BatchDecodeWithPagedKVCacheWrapper(ws)

    def _grow(self, new_lens):
        for b, n in enumerate(new_lens):
            self.lens[b] += n
            while len(self.pages[b]) * PAGE < self.lens[b]:
                self.pages[b].append(self.free.pop())
        indptr = torch.tensor([0] + torch.tensor([len(p) for p in self.pages]).cumsum(0).tolist(), dtype=torch.int32)
        indices = torch.tensor([i for p in self.pages for i in p], dtype=torch.int32)
        last = torch.tensor([n - (len(p) - 1) * PAGE for n, p in zip(self.lens, self.pages)], dtype=torch.int32)
        return indptr, indices, last

    def _layers(self, h, pos, bi, kv, attend):
        indptr, indices, last = (t.to(self.device) for t in kv)
        nnz = h.shape[0]
        for layer, cache in zip(self.model.model.layers, self.caches):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = att.q_proj(x).view(nnz, self.Hq, self.D)
            k = att.k_proj(x).view(nnz, self.Hk, self.D)
            v = att.v_proj(x).view(nnz, self.Hk, self.D)
            if hasattr(att, "q_norm"):  # Qwen3: RMSNorm of each head's q and k before RoPE
                q, k = att.q_norm(q), att.k_norm(k)
            q, k = A.apply_rope_pos_ids(q, k, pos, rope_theta=self.theta)
            A.append_paged_kv_cache(k, v, bi, pos, cache, indices, indptr, last)
            h = h + att.o_proj(attend(q, cache).reshape(nnz, -1))
            m = layer.mlp(layer.post_attention_layernorm(h)[None])  # MoE blocks take [batch, tokens, hidden]
            h = h + (m[0] if isinstance(m, tuple) else m)[0]
        return self.model.lm_head(self.model.model.norm(h))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        dev = self.device
        B = len(prompts)
        self.pages, self.lens = [[] for _ in range(B)], [0] * B
        kv = self._grow([len(p) for p in prompts])
        qo_indptr = torch.tensor([0] + torch.tensor([len(p) for p in prompts]).cumsum(0).tolist(), dtype=torch.int32)
        tokens = torch.tensor([t for p in prompts for t in p], device=dev)
        bi, pos = A.get_batch_indices_positions(qo_indptr.to(dev), torch.tensor(self.lens, device=dev), tokens.shape[0])
        self.prefill.plan(qo_indptr, *kv, self.Hq, self.Hk, self.D, PAGE, causal=True, q_data_type=torch.float32)
        logits = self._layers(self.model.model.embed_tokens(tokens), pos, bi, kv, self.prefill.run)
        nxt = logits[qo_indptr[1:].long() - 1].argmax(-1)  # each prompt's last row
        out = [[int(t)] for t in nxt]
        for _ in range(max_new_tokens - 1):
            kv = self._grow([1] * B)
            pos = torch.tensor(self.lens, device=dev, dtype=torch.int32) - 1
            bi = torch.arange(B, device=dev, dtype=torch.int32)
            self.decode.plan(*kv, self.Hq, self.Hk, self.D, PAGE, q_data_type=torch.float32)
            logits = self._layers(self.model.model.embed_tokens(nxt), pos, bi, kv, self.decode.run)
            nxt = logits.argmax(-1)
            for b in range(B):
                out[b].append(int(nxt[b]))
        return out


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                                   rope_parameters=dict(rope_type="default", rope_theta=10000.0), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init: greedy choices far from ties
        model.lm_head.weight.mul_(8)
    return model


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_greedy_tokens_match_transformers(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    model = _model()
    prompts = [[5, 17, 2, 40, 3], [9, 1, 1, 60, 22, 7, 8, 31, 4, 50, 11]]  # ragged: 5 and 11 tokens
    new = 6
    ours = PagedEngine(model).generate(prompts, new)
    for b, p in enumerate(prompts):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)[0, len(p):].tolist()
        assert ours[b] == ref, f"prompt {b}: ours {ours[b]} vs transformers {ref}"


def _qwen3_moe():
    torch.manual_seed(1)
    cfg = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256,
                                      rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                                      attn_implementation="eager")
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def test_qwen3_moe_with_moecomm_moe_matches_transformers(triton_backend):
    import copy

    import moecomm

    model = _qwen3_moe()
    ours_model = copy.deepcopy(model)
    assert moecomm.patch_hf_model(ours_model) == 2  # both MoE blocks now moecomm.MoE
    prompts = [[5, 17, 2, 40, 3, 9, 9], [60, 22, 7]]
    new = 5
    ours = PagedEngine(ours_model).generate(prompts, new)
    for b, p in enumerate(prompts):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)[0, len(p):].tolist()
        assert ours[b] == ref, f"prompt {b}: ours {ours[b]} vs transformers {ref}"
