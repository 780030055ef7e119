"""The drop-in MoE layer: route -> dispatch -> expert MLP -> combine (+ shared experts).

# T = num_tokens, H = hidden, I = intermediate (per expert), E = num_experts,
# L = num_local_experts, k = top_k, S = shared-expert intermediate size, R = rows after dispatch

One forward on the GPU is a fixed sequence of launches with no host sync: the router GEMM, the
fused routing kernel, the permute (dispatch), the gate_up grouped GEMM with SiLU*mul fused, the
down grouped GEMM with the routing weight applied per row in its epilogue, and the unweighted
combine. Memory beyond the input: the routed rows are gathered inside the GEMM (gather_idx), or,
for wide experts at prefill sizes (materialize_min_rows), copied once into expert order; then the
[R, I] activation (SiLU*mul fused into the gate_up GEMM) and the [R, H] expert output; never
[T, E, H]. Up to cuda_graph_tokens tokens on a GPU, the forward replays a CUDA graph per token count.

    import torch, moecomm
    moe = moecomm.MoE(hidden_size=1024, intermediate_size=2048, num_experts=8, top_k=2)
    x = torch.randn(16, 1024)
    y = moe(x)                                           # [16, 1024]
    torch.testing.assert_close(y, moe.reference_forward(x), atol=1e-4, rtol=1e-4)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoeCommTypeError, MoeCommValueError, as_tensor, check_tensor
from ..ep.placement import ExpertPlacement
from ..routing import RoutingMethod, route
from .config import MoEConfig, check_device, check_dtype, check_placement
from .graphs import GraphRunner

__all__ = ["MoE", "SharedExpertMLP"]



_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(MoEConfig))


def _config_field(name: str) -> property:
    return property(lambda self: getattr(self.config, name), doc=f"config.{name} (read-only)")


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x)


class SharedExpertMLP(nn.Module):
    """A dense gated MLP every token goes through (Qwen2-MoE's shared_expert, DeepSeek's shared_experts).

    Args:
        hidden_size: H.
        intermediate_size: S (DeepSeek: moe_intermediate_size * n_shared_experts, run as one MLP).
        activation: "silu" or "gelu", applied to the gate projection.

    Parameters gate_proj / up_proj [S, H] and down_proj [H, S] are nn.Linear without bias, named
    like transformers' MLPs so their weights can be shared with a Hugging Face block.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "bias": False}
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype (cuBLAS accumulates in fp32)."""
        return self.down_proj(_act(self.activation, self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """A Mixture-of-Experts layer: top-k routing over gated-MLP experts, optional shared experts.

    MoE(H, I, E, k, **fields) and MoE.from_config(MoEConfig(H, I, E, k, **fields)) build the same
    layer: the fields are checked once, by MoEConfig (moecomm/layer/config.py), and the layer keeps
    that frozen config as ``moe.config`` (``moe.top_k`` etc. read it).

    Args:
        hidden_size: H, the model width.
        intermediate_size: I, the width of each routed expert's MLP.
        num_experts: E, the number of routed experts (global, over the whole EP group).
        top_k: k, experts per token; 1 <= k <= E.
        routing: RoutingMethod.SOFTMAX_TOPK (Mixtral, Qwen-MoE) or SIGMOID_GROUPED_TOPK (DeepSeek-V3).
        renormalize: rescale each token's k weights to sum to 1 (Mixtral: True; Qwen: norm_topk_prob;
            DeepSeek-V3: norm_topk_prob).
        n_group, topk_group: SIGMOID_GROUPED_TOPK only: experts form n_group groups, a token picks
            its experts among its best topk_group groups. Default: 1 group (plain sigmoid top-k).
        routed_scaling_factor: multiplies the routing weights (DeepSeek-V3: 2.5).
        activation: "silu" or "gelu", for the routed and shared experts.
        shared_expert_intermediate_size: S; 0 means no shared expert. Otherwise one dense gated MLP
            that every token also goes through, added to the routed output.
        shared_expert_gate: Qwen2-MoE style: scale the shared expert's output by
            sigmoid(x @ shared_expert_gate.weight.T) per token (a Linear [1, H]).
        dtype: of the parameters: float32, bfloat16 or float16 (default: torch's default dtype).
            float64 and integer dtypes are refused here, naming the supported ones: the routing and
            GEMM kernels have no fp64 path (the tests' fp64 truth is their own loop).
        device: of the parameters (default: torch's default): cpu, meta, or a CUDA GPU this machine
            has (UnsupportedHardwareError otherwise, saying what was found).
        ep_group: torch.distributed group for expert parallelism; None (or size 1): all experts here.
        placement: ExpertPlacement over the EP group; default contiguous blocks.
        cuda_graph_tokens: on a CUDA device with EP size 1, a forward of at most this many tokens
            replays a CUDA graph captured for its token count (the second time that count is seen),
            when no autograd is recorded and neither torch.compile nor another capture is running.
            With EP size > 1, forwards of at most this many tokens per rank exchange tokens in the
            static-capacity mode (buffers sized at construction, no host sync: the caller may
            capture the layer in a CUDA graph on every rank at once); larger ones in the throughput
            mode (one host sync for the split sizes).
            A decode step is otherwise bound by Python and kernel-launch time. 0 turns it off;
            None reads MOECOMM_CUDA_GRAPH_TOKENS (default 128). Replacing a weight tensor (not its
            values) drops the graphs; at most 16 token counts are kept per layer.
        materialize_min_rows: from this many routed rows (T * k) on, dispatch copies the rows into
            expert order and the GEMMs read them contiguously (through TMA), instead of gathering
            them inside the GEMM; below it the gather saves the copy. None: always gather. "auto":
            4096 when intermediate_size >= 4096, else None (the copy pays only for wide experts).

    Parameters:
        gate.weight [E, H]: the router (no bias).
        w_gate_up [L, 2I, H]: gate rows then up rows of each local expert (transformers' gate_up_proj).
        w_down [L, H, I]: each local expert's down projection (transformers' down_proj).
        e_score_correction_bias [E] fp32 buffer (SIGMOID_GROUPED_TOPK only).
        shared_experts (SharedExpertMLP) and shared_expert_gate (Linear H -> 1) when configured.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        ep_group: Any = None,
        placement: ExpertPlacement | None = None,
        **config: Any,
    ):
        """The arguments above; config: the other MoEConfig fields (routing, renormalize, ...)."""
        super().__init__()
        unknown = sorted(set(config) - _CONFIG_FIELDS)
        if unknown:
            raise MoeCommTypeError(f"MoE: arguments must be among {sorted(_CONFIG_FIELDS - {'hidden_size', 'intermediate_size', 'num_experts', 'top_k'})} "
                                   f"and dtype, device, ep_group, placement, got {', '.join(unknown)}")
        cfg = MoEConfig(hidden_size, intermediate_size, num_experts, top_k, **config)
        self._build(cfg, dtype=dtype, device=device, ep_group=ep_group, placement=placement)

    @classmethod
    def from_config(
        cls, config: MoEConfig, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
        ep_group: Any = None, placement: ExpertPlacement | None = None,
    ) -> MoE:
        """The layer a MoEConfig describes, its parameters in dtype on device (MoE(...)'s other arguments).

        Example:
            >>> cfg = MoEConfig(1024, 2048, 8, 2, renormalize=True)
            >>> moe = MoE.from_config(cfg, dtype=torch.bfloat16)
        """
        if not isinstance(config, MoEConfig):
            raise MoeCommTypeError(f"MoE.from_config: config must be a moecomm.layer.MoEConfig, got {type(config).__name__}")
        moe = cls.__new__(cls)
        nn.Module.__init__(moe)
        moe._build(config, dtype=dtype, device=device, ep_group=ep_group, placement=placement)
        return moe

    # the configuration, read-only on the layer: a changed value needs a new layer (MoE.from_config)
    hidden_size = _config_field("hidden_size")
    intermediate_size = _config_field("intermediate_size")
    num_experts = _config_field("num_experts")
    top_k = _config_field("top_k")
    routing = _config_field("routing")
    renormalize = _config_field("renormalize")
    n_group = _config_field("n_group")
    topk_group = _config_field("topk_group")
    routed_scaling_factor = _config_field("routed_scaling_factor")
    activation = _config_field("activation")

    # ------------------------------------------------------------------ set-up
    def _build(self, config: MoEConfig, *, dtype: Any, device: Any, ep_group: Any, placement: Any) -> None:
        """Everything but the config's own checks: where the layer lives, its parameters, dispatcher, graphs."""
        dtype, device = check_dtype(dtype), check_device(device)
        self.config = config
        self.cuda_graph_tokens = config.cuda_graph_tokens  # a run-time knob: may be changed on the layer
        self.ep_group = ep_group
        self.ep_size, self.ep_rank = _group_size_rank(ep_group)
        self.placement = check_placement(placement, config.num_experts, self.ep_size)
        self.local_expert_ids = self.placement.local_experts(self.ep_rank)
        self.num_local_experts = len(self.local_expert_ids)
        self._make_parameters(dtype, device)
        self.reset_parameters()
        self.dispatcher = self._make_dispatcher(config.materialize_min_rows)
        self.graphs = GraphRunner(name="MoE") if self.ep_size == 1 and self.cuda_graph_tokens else None

    def _make_parameters(self, dtype: torch.dtype, device: torch.device | None) -> None:
        """The Parameters and buffers listed in the class docstring (uninitialised: reset_parameters fills them)."""
        c, kw = self.config, {"dtype": dtype, "device": device}
        H, I, L = c.hidden_size, c.intermediate_size, self.num_local_experts
        self.gate = nn.Linear(H, c.num_experts, bias=False, **kw)
        self.w_gate_up = nn.Parameter(torch.empty(L, 2 * I, H, **kw))
        self.w_down = nn.Parameter(torch.empty(L, H, I, **kw))
        if c.routing == RoutingMethod.SIGMOID_GROUPED_TOPK:
            self.register_buffer("e_score_correction_bias", torch.zeros(c.num_experts, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None
        S = c.shared_expert_intermediate_size
        self.shared_experts = SharedExpertMLP(H, S, c.activation, **kw) if S else None
        self.shared_expert_gate = nn.Linear(H, 1, bias=False, **kw) if c.shared_expert_gate else None

    def _make_dispatcher(self, materialize_min_rows: int | None):
        """The Dispatcher (moecomm/ep/types.py) that moves tokens to this rank's experts and back."""
        if self.ep_size == 1:
            from ..ep import LocalDispatcher

            # ids come from route(), in range by construction: skip the check that reads them on the host
            return LocalDispatcher(self.num_experts, self.top_k, validate=False,
                                   materialize_min_rows=materialize_min_rows)
        from ..ep import EPDispatcher

        # decode sizes (<= cuda_graph_tokens tokens a rank) take the static-capacity exchange: no host
        # sync, so a model-level CUDA graph can capture the layer; larger calls the throughput mode
        ep = EPDispatcher(
            self.num_experts, self.top_k, self.hidden_size, group=self.ep_group, placement=self.placement,
            dtype=self.w_gate_up.dtype, max_tokens=self.cuda_graph_tokens or None, share_buffers=True,
        )
        if self.w_gate_up.device.type != "cuda":
            return ep  # no IPC off CUDA (CPU / meta layers): NCCL or gloo as before
        return node_dispatcher(ep, num_experts=self.num_experts, top_k=self.top_k, hidden=self.hidden_size,
                               group=self.ep_group, placement=self.placement, dtype=self.w_gate_up.dtype,
                               device=self.w_gate_up.device, ll_max_tokens=self.cuda_graph_tokens or 0)

    @property
    def last_ep_path(self) -> Any:
        """The expert-parallel path of the latest forward (moecomm.ep.ipc.PathChoice: .path, .reason),
        or None (EP size 1, a CPU layer, or no forward yet)."""
        return getattr(self.dispatcher, "last_path", None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random weights scaled 1/sqrt(fan_in), so activations stay O(1) through the layer."""
        if self.w_gate_up.device.type == "meta":
            return
        H, I = self.hidden_size, self.intermediate_size
        nn.init.normal_(self.gate.weight, std=H**-0.5)
        nn.init.normal_(self.w_gate_up, std=H**-0.5)
        nn.init.normal_(self.w_down, std=I**-0.5)
        if self.shared_experts is not None:
            for lin in (self.shared_experts.gate_proj, self.shared_experts.up_proj):
                nn.init.normal_(lin.weight, std=H**-0.5)
            nn.init.normal_(self.shared_experts.down_proj.weight, std=self.shared_experts.down_proj.in_features**-0.5)
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, std=H**-0.5)

    @torch.no_grad()
    def load_expert_weights(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
        """Copy this rank's experts out of the global expert weights (the same call on every rank).

        Args:
            w_gate_up: [E, 2I, H], every expert's gate rows then up rows (transformers' gate_up_proj).
            w_down: [E, H, I], every expert's down projection.
        """
        op = "MoE.load_expert_weights"
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        check_tensor(op, "w_gate_up", w_gate_up, shape=(E, 2 * I, H))
        check_tensor(op, "w_down", w_down, shape=(E, H, I))
        idx = torch.tensor(self.local_expert_ids, dtype=torch.long, device=w_gate_up.device)
        self.w_gate_up.copy_(w_gate_up.index_select(0, idx))
        self.w_down.copy_(w_down.index_select(0, idx.to(w_down.device)))

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.num_experts} "
            f"(local {self.num_local_experts}), top_k={self.top_k}, routing={self.routing.name}, "
            f"renormalize={self.renormalize}, activation={self.activation}, ep_size={self.ep_size}"
        )

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Any, op: str) -> torch.Tensor:
        x = as_tensor(op, "x", x)
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise MoeCommValueError(f"{op}: x must have shape [..., {self.hidden_size}], got {list(x.shape)}")
        w = self.w_gate_up
        if x.dtype != w.dtype:
            raise MoeCommTypeError(
                f"{op}: x must have dtype {str(w.dtype).replace('torch.', '')} (the layer's), got {str(x.dtype).replace('torch.', '')}"
            )
        if x.device.type != w.device.type or (x.device.type == "cuda" and x.device != w.device):
            raise MoeCommValueError(f"{op}: x must be on device {w.device}, got {x.device}")
        return x

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> logits [T, E]: in x's dtype for softmax routing (as Mixtral/Qwen compute them),
        in fp32 for sigmoid routing (as DeepSeek-V3 does: its bias-corrected scores need the precision)."""
        if self.routing == RoutingMethod.SIGMOID_GROUPED_TOPK:
            return F.linear(x.float(), self.gate.weight.float())
        return self.gate(x)

    def route(self, x2: torch.Tensor):
        """x2 [T, H] -> the layer's RoutingResult (topk_ids, topk_weights): its router, its method and
        settings; no host sync (the device checks are skipped). The logits are checked as route() does."""
        return route(
            self.router_logits(x2), self.top_k, method=self.routing, renormalize=self.renormalize,
            n_group=self.n_group, topk_group=self.topk_group, e_score_correction_bias=self.e_score_correction_bias,
            routed_scaling_factor=self.routed_scaling_factor, validate=False,  # its checks would sync the host
        )

    def _route_unchecked(self, x2: torch.Tensor):
        """route() for the forward: x2 was checked once by the layer, the settings at construction."""
        from ..routing.api import route_unchecked

        return route_unchecked(
            self.router_logits(x2), self.top_k, self.routing, self.renormalize, self.n_group, self.topk_group,
            self.e_score_correction_bias, self.routed_scaling_factor,
        )

    def _bias(self) -> torch.Tensor | None:
        b = self.e_score_correction_bias
        # a model cast with .to(bf16) casts buffers too; the reference adds the bias to fp32 scores
        return b if b is None or b.dtype == torch.float32 else b.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: [..., H] in the layer's dtype, any device the layer lives on (a DLPack array works).

        Returns [..., H] in x's dtype: sum over k of weight * expert(x) (+ shared experts).
        """
        x = self._check_input(x, "MoE.forward")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)  # [T, H]
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if self._may_replay(x2):
            y = self.graphs(x2, self._graph_key(), self._forward_2d)
            if y is not None:
                return y.reshape(shape)
        return self._forward_2d(x2).reshape(shape)

    def _may_replay(self, x2: torch.Tensor) -> bool:
        """Whether this forward may come from a CUDA graph (see cuda_graph_tokens)."""
        if self.graphs is None or torch.compiler.is_compiling() or not x2.is_cuda:
            return False
        if not 0 < x2.shape[0] <= self.cuda_graph_tokens:
            return False
        if torch.is_grad_enabled() and (x2.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False  # a replayed graph records no autograd history
        return not torch.cuda.is_current_stream_capturing()

    def _graph_key(self) -> tuple:
        # the graphs read these tensors' memory: a replaced tensor (new storage) invalidates them.
        # Named one by one: walking self.parameters() costs ~10 us, a tenth of a replayed decode step.
        ts = [self.gate.weight, self.w_gate_up, self.w_down]
        if self.e_score_correction_bias is not None:
            ts.append(self.e_score_correction_bias)
        if self.shared_experts is not None:
            se = self.shared_experts
            ts += [se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight]
            if self.shared_expert_gate is not None:
                ts.append(self.shared_expert_gate.weight)
        return tuple(t.data_ptr() for t in ts)

    def _forward_2d(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [T, H] contiguous -> [T, H]: the launches of one forward, no host sync.

        The input was checked once (forward's _check_input); every call below is a trusted internal
        one (no argument checks): routing, dispatch, experts and combine pass each other what they built.
        """
        from ..gemm.mlp import expert_mlp_unchecked
        from ..jit.backend import warn_once

        if self.ep_size > 1 and torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.w_down.requires_grad:
            warn_once("moe-ep-autograd", "MoE: with ep_size > 1 the all_to_all of dispatch/combine records no gradient "
                      "yet, so the routed experts and the router get none; train with ep_size 1, and run inference "
                      "under torch.no_grad() to silence this")
        r = self._route_unchecked(x2)
        d = self.dispatcher.dispatch_unchecked(x2, r.topk_ids, r.topk_weights)
        h = expert_mlp_unchecked(
            d.tokens, self.w_gate_up, self.w_down, d.expert_offsets, "enk", self.activation,
            d.gather_idx, d.row_weights,  # offsets, rows and weights come from dispatch
        )  # [R, H], rows already weighted when row_weights is set
        y = self.dispatcher.combine_unchecked(h, d.handle)  # [T, H]
        return y + self._shared(x2) if self.shared_experts is not None else y

    def _shared(self, x2: torch.Tensor) -> torch.Tensor:
        s = self.shared_experts(x2)
        if self.shared_expert_gate is not None:
            s = torch.sigmoid(self.shared_expert_gate(x2)) * s
        return s

    # ------------------------------------------------------------------ reference
    @torch.no_grad()
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer in plain torch, fp32 arithmetic, a loop over experts: the truth in tests.

        Args:
            x: [..., H] in the layer's dtype. Needs every expert on this rank (no EP).

        Returns [..., H] in x's dtype.
        """
        op = "MoE.reference_forward"
        x = self._check_input(x, op)
        if self.num_local_experts != self.num_experts:
            raise MoeCommValueError(
                f"{op}: the layer must hold all {self.num_experts} experts (ep_size 1), got {self.num_local_experts} local"
            )
        shape = x.shape
        xf = x.reshape(-1, self.hidden_size).float()  # [T, H]
        logits = self.router_logits(x.reshape(-1, self.hidden_size)).float()  # [T, E]
        topk_ids, topk_w = reference_routing(
            logits, self.top_k, self.routing, renormalize=self.renormalize, n_group=self.n_group,
            topk_group=self.topk_group, bias=self._bias(), routed_scaling_factor=self.routed_scaling_factor,
        )
        y = torch.zeros_like(xf)
        I = self.intermediate_size
        for e in range(self.num_experts):
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            w = self.w_gate_up[e].float()  # [2I, H]
            hg = xf[tok] @ w.T  # [n, 2I]
            h = _act(self.activation, hg[:, :I]) * hg[:, I:]
            out = h @ self.w_down[e].float().T  # [n, H]
            y.index_add_(0, tok, out * topk_w[tok, slot, None])
        if self.shared_experts is not None:
            se = self.shared_experts
            s = _act(self.activation, xf @ se.gate_proj.weight.float().T) * (xf @ se.up_proj.weight.float().T)
            s = s @ se.down_proj.weight.float().T
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(xf @ self.shared_expert_gate.weight.float().T) * s
            y = y + s
        return y.to(x.dtype).reshape(shape)


def reference_routing(
    logits: torch.Tensor,
    top_k: int,
    method: RoutingMethod,
    *,
    renormalize: bool,
    n_group: int | None,
    topk_group: int | None,
    bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 -> (topk_ids int64 [T, k], topk_weights fp32 [T, k]), as the HF models route.

    Kept here, independent of moecomm.routing, so reference_forward does not test routing with itself.
    """
    T, E = logits.shape
    if method == RoutingMethod.SOFTMAX_TOPK:
        probs = torch.softmax(logits, dim=-1)
        w, ids = _topk_lowest_index_first(probs, top_k)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return ids, w * routed_scaling_factor
    scores = torch.sigmoid(logits)  # [T, E]
    choice = scores + bias if bias is not None else scores
    g = n_group or 1
    tg = topk_group or g
    per = E // g
    # a group's score is the sum of its best two experts (DeepSeek-V3), or its one expert
    group_scores = choice.view(T, g, per).topk(min(2, per), dim=-1)[0].sum(dim=-1)  # [T, g]
    group_idx = torch.topk(group_scores, tg, dim=-1)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    mask = group_mask.unsqueeze(-1).expand(T, g, per).reshape(T, E).bool()
    ids = _topk_lowest_index_first(choice.masked_fill(~mask, float("-inf")), top_k)[1]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * routed_scaling_factor


def _topk_lowest_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.topk has no tie rule; moecomm.route picks the lowest expert index among equal scores
    values, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], ids[:, :k]


_IPC_BUFFERS: dict[tuple, Any] = {}  # (group, device, bytes) -> SymmetricBuffer shared by the layers of a model


def node_dispatcher(ep: Any, *, num_experts: int, top_k: int, hidden: int, group: Any, placement: Any,
                    dtype: torch.dtype, device: torch.device, ll_max_tokens: int) -> Any:
    """The layer's dispatcher on CUDA with EP size > 1: NodeDispatcher(ep, IPCDispatcher or None).

    Inside one node, when moecomm.distributed.symmetric.eligibility(group) says IPC works (decided
    once, cached, collective) and 0 < ll_max_tokens <= 1024, steps of at most ll_max_tokens tokens a
    rank (the static mode's threshold: the ranks agree on the path exactly where they agreed on the
    mode) take the low-latency IPC path (one symmetric buffer shared by every layer of these sizes:
    their calls never interleave); every other step takes ``ep`` (EPDispatcher). The path a step took
    is the NodeDispatcher's ``last_path``, and a change of path is logged once (logger 'moecomm').
    Collective: every rank of ``group`` builds its layers in the same order.
    """
    from ..distributed import symmetric
    from ..ep.ipc import IPCDispatcher, NodeDispatcher
    from ..ep.ipc import layout as LY
    from ..errors import UnsupportedHardwareError

    W = ep.ep_size
    C = ll_max_tokens
    if C <= 0:
        return NodeDispatcher(ep, None, eligibility=symmetric.Eligibility(False, "cuda_graph_tokens is 0 (no decode path)"))
    if C > LY.MAX_TOKENS:  # the IPC path must replace the static mode at the same threshold, or ranks could disagree
        return NodeDispatcher(ep, None, eligibility=symmetric.Eligibility(
            False, f"cuda_graph_tokens = {C} exceeds the low-latency path's {LY.MAX_TOKENS} tokens a rank"))
    if W > LY.MAX_WORLD_SIZE:
        return NodeDispatcher(ep, None, eligibility=symmetric.Eligibility(
            False, f"EP size {W} exceeds the {LY.MAX_WORLD_SIZE} ranks of one node"))
    elig = symmetric.eligibility(group, device=device)
    if not elig.ok:
        return NodeDispatcher(ep, None, eligibility=elig)
    nbytes = IPCDispatcher.buffer_bytes(W, C, hidden, top_k, dtype)
    key = (id(group), str(device), nbytes)
    try:
        buf = _IPC_BUFFERS.get(key)
        if buf is None or buf.closed:
            buf = _IPC_BUFFERS[key] = symmetric.open_symmetric(nbytes, group, device=device)
        ipc = IPCDispatcher(num_experts, top_k, hidden, buffer=buf, placement=placement, dtype=dtype, max_tokens=C,
                            group=group)
    except UnsupportedHardwareError as exc:  # no toolchain for ll.cu here: say so (once, on a path change), use NCCL
        return NodeDispatcher(ep, None, eligibility=symmetric.Eligibility(False, str(exc)))
    return NodeDispatcher(ep, ipc, eligibility=elig)


def _group_size_rank(group: Any) -> tuple[int, int]:
    if group is None:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise MoeCommValueError("MoE: ep_group must be None or a group of an initialized torch.distributed, got a group with no process group initialized")
    return dist.get_world_size(group), dist.get_rank(group)
