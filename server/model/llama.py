"""Our own Llama-family forward (Llama, Mistral, Qwen2): flat token batches, paged KV cache.

The HF modules are not used at serving time: their per-call Python overhead dominates small
decode steps. Weights are loaded straight from safetensors into fused projections (q|k|v and
gate|up), frozen, each wrapped in a MultiLoRALinear. Numerics follow transformers' Llama
(RMSNorm in fp32, rotate-half RoPE, SiLU-gated MLP) so greedy outputs match ``generate``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from server.model.cpu_tuning import prepare_weight
from server.model.forward_batch import ForwardBatch
from server.model.lora_linear import LinearKwargs, MultiLoRALinear, base_linear
from server.model.quant.int_weights import Codes, Int8LMHead, concat
from server.ops import attention_torch, norm_torch
from server.ops.attention_torch import AttentionOps
from server.ops.norm_torch import NormOps

if TYPE_CHECKING:
    from transformers import PretrainedConfig

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [H_kv, num_kv_rows, D]
Weights = dict[str, torch.Tensor | Codes]  # checkpoint names → tensors; linear weights may be codes


def rope_cos_sin(config: PretrainedConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, D] in fp32, as transformers computes them for this config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    elif rope_type in ("linear", "llama3", "yarn"):
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    else:
        raise ValueError(f"RoPE type {rope_type!r} is not supported (default, linear, llama3, yarn are)")
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    return emb.cos() * scaling, emb.sin() * scaling


def refine_top_ties(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] (fp32 copies of ``hidden @ weightᵀ`` rounded to a 16-bit dtype) with each
    row's maxima recomputed in fp32, in place: a greedy pick is then the argmax of the exact products.

    bf16 keeps 8 bits of mantissa, so logits near 25 come in steps of 0.125 and two tokens 0.08
    apart tie; argmax would then take the lower token id, whatever the products say. Rounding is
    monotone, so the exact best token is always among a row's tied maxima: only those are
    recomputed (``hidden`` [B, H], ``weight`` [V, H]), a few dot products per step.
    """
    if hidden.dtype == torch.float32 or logits.shape[1] < 2:
        return logits
    tied = _rows_with_tied_maxima(logits)  # [N_rows]: usually none
    if tied.numel() == 0:
        return logits
    sub = logits.index_select(0, tied)  # [N_rows, V]
    rows, cols = (sub == sub.amax(dim=-1, keepdim=True)).nonzero(as_tuple=True)  # [N], N >= N_rows
    exact = (hidden.index_select(0, tied[rows]).float() * weight.index_select(0, cols).float()).sum(-1)
    logits[tied[rows], cols] = exact
    return logits


def _rows_with_tied_maxima(logits: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``logits`` [B, V] whose maximum is reached twice or more.

    Two max reductions (the best with its index, then the best without it) instead of a
    [B, V] comparison and ``nonzero``: 130 against 380 µs for 8 rows of 49152 on a 2-core Xeon.
    """
    arange = torch.arange(logits.shape[0], device=logits.device)
    best, index = logits.max(dim=-1)  # [B]
    logits[arange, index] = float("-inf")
    runner_up = logits.amax(dim=-1)  # [B]
    logits[arange, index] = best
    return (runner_up == best).nonzero().flatten()


class RMSNorm(nn.Module):
    if TYPE_CHECKING:  # nn.Module.__call__ (which runs forward) returns Any: give calls forward's types

        def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``norm_torch.add_rms_norm`` without a residual (the layers call their ``norm_ops`` instead)."""
        return norm_torch.add_rms_norm(x, None, self.weight, self.eps)[0]


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        weights: Weights,
        linear_kwargs: LinearKwargs,
        attention_ops: AttentionOps = attention_torch,
        norm_ops: NormOps = norm_torch,
    ) -> None:
        super().__init__()
        self.attention_ops = attention_ops  # rope_and_cache + decode_attention: attention_torch's signatures
        self.norm_ops = norm_ops  # add_rms_norm + silu_mul: norm_torch's signatures
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(_dense(weights["input_layernorm.weight"]), eps)
        self.post_attention_layernorm = RMSNorm(_dense(weights["post_attention_layernorm.weight"]), eps)
        qkv_bias = _cat_optional([_dense_or_none(weights.get(f"self_attn.{p}_proj.bias")) for p in "qkv"])
        self.qkv_proj = MultiLoRALinear(
            concat([weights[f"self_attn.{p}_proj.weight"] for p in "qkv"]),
            qkv_bias,
            ("q_proj", "k_proj", "v_proj"),
            (q_size, kv_size, kv_size),
            **linear_kwargs,
        )
        self.o_proj = MultiLoRALinear(
            weights["self_attn.o_proj.weight"], _dense_or_none(weights.get("self_attn.o_proj.bias")),
            ("o_proj",), (config.hidden_size,), **linear_kwargs,
        )  # fmt: skip
        inter = config.intermediate_size
        self.gate_up_proj = MultiLoRALinear(
            concat([weights["mlp.gate_proj.weight"], weights["mlp.up_proj.weight"]]), None,
            ("gate_proj", "up_proj"), (inter, inter), **linear_kwargs,
        )  # fmt: skip
        self.down_proj = MultiLoRALinear(
            weights["mlp.down_proj.weight"], None, ("down_proj",), (config.hidden_size,), **linear_kwargs
        )
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual [T, hidden]; cos/sin [T, D] → (hidden, residual) after this layer."""
        norms = self.norm_ops
        pre_attention, pre_mlp = self.input_layernorm, self.post_attention_layernorm
        normed, residual = norms.add_rms_norm(hidden, residual, pre_attention.weight, pre_attention.eps)
        qkv = self.qkv_proj(normed, batch.lora)  # [T, (H + 2·H_kv)·D]
        k_cache, v_cache = kv
        q = self.attention_ops.rope_and_cache(
            qkv, cos, sin, batch.kv_write_index, k_cache, v_cache, self.num_heads, self.num_kv_heads
        )  # [T, H, D]; this step's K/V rows are in the cache now
        attn = self._attention(q, k_cache, v_cache, batch)  # [T, H·D]
        normed, residual = norms.add_rms_norm(
            self.o_proj(attn, batch.lora), residual, pre_mlp.weight, pre_mlp.eps
        )
        gate_up = self.gate_up_proj(normed, batch.lora)  # [T, 2·I]
        return self.down_proj(norms.silu_mul(gate_up), batch.lora), residual

    def _attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """q [T, H, D] against the cached K/V of each token's sequence → [T, H·D]."""
        if batch.decode_token_index is not None and not batch.prefills and batch.decode_is_all_tokens:
            return self._decode_attention(q, k_cache, v_cache, batch).view(q.shape[0], -1)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if batch.decode_token_index is not None:
            qd = q.index_select(0, batch.decode_token_index)  # [Bd, H, D]
            out.index_copy_(0, batch.decode_token_index, self._decode_attention(qd, k_cache, v_cache, batch))
        for chunk in batch.prefills:
            start, end = chunk.token_start, chunk.token_end
            qp = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
            kp = k_cache.index_select(1, chunk.kv_index).unsqueeze(0)  # [1, H_kv, C, D]
            vp = v_cache.index_select(1, chunk.kv_index).unsqueeze(0)
            mask = _causal_mask(end - start, chunk.kv_index.shape[0], q.device)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[start:end] = op.squeeze(0).transpose(0, 1)
        return out.view(out.shape[0], -1)

    def _decode_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """q [Bd, H, D], one query per decode sequence → [Bd, H, D] over its cached K/V."""
        kv_index, kv_lens, kv_bias = batch.decode_kv_index, batch.decode_kv_lens, batch.decode_kv_bias
        assert kv_index is not None and kv_lens is not None and kv_bias is not None  # set with decode tokens
        return self.attention_ops.decode_attention(
            q, k_cache, v_cache, kv_index, kv_lens, kv_bias, self.scale
        )


def _causal_mask(num_queries: int, ctx_len: int, device: torch.device) -> torch.Tensor:
    """[L, C] bool: query i (at position C - L + i) sees keys 0..C - L + i."""
    query_pos = torch.arange(ctx_len - num_queries, ctx_len, device=device)
    return torch.arange(ctx_len, device=device)[None, :] <= query_pos[:, None]


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return None if len(present) < len(tensors) else torch.cat(present)


class LlamaForServing(nn.Module):
    """The whole causal LM: embeddings → decoder layers → norm → LM head on sampled tokens only."""

    rope_cos: torch.Tensor  # [P, D] buffer (registered in __init__)
    rope_sin: torch.Tensor  # [P, D] buffer

    def __init__(
        self,
        config: PretrainedConfig,
        weights: Weights,
        max_positions: int,
        linear_kwargs: LinearKwargs,
        attention_ops: AttentionOps | None = None,
        norm_ops: NormOps | None = None,
    ) -> None:
        """``attention_ops``: the decode step's attention kernels (default: ``attention_torch``);
        ``norm_ops``: the layers' residual adds, RMS norms and SiLU gates (default: ``norm_torch``)."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Parameter(
            _dense(weights.pop("model.embed_tokens.weight")), requires_grad=False
        )
        lm_head = _dense_or_none(weights.pop("lm_head.weight", None))
        self.lm_head = self.embed_tokens if lm_head is None else nn.Parameter(lm_head, requires_grad=False)
        self.norm = RMSNorm(_dense(weights.pop("model.norm.weight")), config.rms_norm_eps)
        self.norm_ops = norm_ops or norm_torch
        attention = attention_ops or attention_torch
        self.layers = nn.ModuleList(
            DecoderLayer(config, _layer_weights(weights, i), linear_kwargs, attention, self.norm_ops)
            for i in range(config.num_hidden_layers)
        )
        self.gemm = linear_kwargs.get("gemm", "x_wt")
        self.lm_head_gemm_weight = prepare_weight(self.lm_head, self.gemm)  # a reordered copy for oneDNN
        self.lm_head_int8: Int8LMHead | None = None  # set by the factory where it measured faster
        cos, sin = rope_cos_sin(config, max_positions)
        dtype = self.embed_tokens.dtype
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)  # [P, D]
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: KVCaches) -> torch.Tensor:
        """One step over the flat batch → next-token logits [B_logits, V] in fp32."""
        hidden = F.embedding(batch.input_ids, self.embed_tokens)  # [T, hidden]
        cos = self.rope_cos.index_select(0, batch.positions)  # [T, D]
        sin = self.rope_sin.index_select(0, batch.positions)
        residual: torch.Tensor | None = None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos, sin, kv, batch)
        assert residual is not None  # a model has at least one layer
        index = batch.logits_index
        last, _ = self.norm_ops.add_rms_norm(
            hidden.index_select(0, index), residual.index_select(0, index), self.norm.weight, self.norm.eps
        )  # [B_logits, hidden]
        return refine_top_ties(self._logits(last), last, self.lm_head)

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        """[B_logits, hidden] → fp32 [B_logits, V]: on the int8 head where there is one, else dense."""
        head = self.lm_head_int8
        logits = head.matmul(last) if head is not None else None
        if logits is None:
            logits = base_linear(last, self.lm_head_gemm_weight, None, self.gemm).float()
        return logits

    def lora_layers(self) -> Iterator[tuple[int, MultiLoRALinear]]:
        """(layer index, module) for every module that holds LoRA slots."""
        layers = cast("Iterable[DecoderLayer]", self.layers)  # nn.ModuleList types its items as Module
        for i, layer in enumerate(layers):
            for module in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                if module.has_lora_buffers:
                    yield i, module


def _layer_weights(weights: Weights, index: int) -> Weights:
    """Pop the tensors of layer ``index`` out of ``weights``, keyed relative to the layer."""
    prefix = f"model.layers.{index}."
    keys = [k for k in weights if k.startswith(prefix)]
    return {k[len(prefix) :]: weights.pop(k) for k in keys}


def load_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors cast to the serving dtype on the serving device (rotary buffers dropped)."""
    return {
        name: tensor.to(device=device, dtype=dtype)
        for name, tensor in named_tensors
        if not name.endswith("rotary_emb.inv_freq")
    }


def _dense(value: torch.Tensor | Codes) -> torch.Tensor:
    """A tensor that only linear layers may hold quantized (norms, embeddings, biases)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"only linear weights can be quantized, got {type(value).__name__} elsewhere")
    return value


def _dense_or_none(value: torch.Tensor | Codes | None) -> torch.Tensor | None:
    return None if value is None else _dense(value)
