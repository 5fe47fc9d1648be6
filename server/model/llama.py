"""Our own Llama-family forward (Llama, Mistral, Qwen2): flat token batches, paged KV cache.

The HF modules are not used at serving time: their per-call Python overhead dominates small
decode steps. Weights are loaded straight from safetensors into fused projections (q|k|v and
gate|up), frozen, each wrapped in a MultiLoRALinear. Numerics follow transformers' Llama
(RMSNorm in fp32, rotate-half RoPE, SiLU-gated MLP) so greedy outputs match ``generate``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from server.model.cpu_tuning import prepare_weight
from server.model.forward_batch import ForwardBatch
from server.model.lora_linear import MultiLoRALinear, base_linear

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [H_kv, num_kv_rows, D]


def rope_cos_sin(config, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, 1, D] → rotated x (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One fused op (bit-identical to transformers' formula in fp32; in bf16 it rounds once, after
        the weight, where transformers rounds before it too)."""
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, config, weights: dict[str, torch.Tensor], linear_kwargs: dict) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(weights["input_layernorm.weight"], eps)
        self.post_attention_layernorm = RMSNorm(weights["post_attention_layernorm.weight"], eps)
        qkv_bias = _cat_optional([weights.get(f"self_attn.{p}_proj.bias") for p in "qkv"])
        self.qkv_proj = MultiLoRALinear(
            torch.cat([weights[f"self_attn.{p}_proj.weight"] for p in "qkv"]),
            qkv_bias,
            ("q_proj", "k_proj", "v_proj"),
            (q_size, kv_size, kv_size),
            **linear_kwargs,
        )
        self.o_proj = MultiLoRALinear(
            weights["self_attn.o_proj.weight"], weights.get("self_attn.o_proj.bias"),
            ("o_proj",), (config.hidden_size,), **linear_kwargs,
        )  # fmt: skip
        inter = config.intermediate_size
        self.gate_up_proj = MultiLoRALinear(
            torch.cat([weights["mlp.gate_proj.weight"], weights["mlp.up_proj.weight"]]), None,
            ("gate_proj", "up_proj"), (inter, inter), **linear_kwargs,
        )  # fmt: skip
        self.down_proj = MultiLoRALinear(
            weights["mlp.down_proj.weight"], None, ("down_proj",), (config.hidden_size,), **linear_kwargs
        )
        self.scale = self.head_dim**-0.5

    def forward(self, hidden, residual, cos, sin, kv: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch):
        """hidden, residual [T, hidden]; cos/sin [T, 1, D] → (hidden, residual) after this layer."""
        residual = hidden if residual is None else residual + hidden
        qkv = self.qkv_proj(self.input_layernorm(residual), batch.lora)  # [T, (H + 2·H_kv)·D]
        num_tokens = qkv.shape[0]
        qk = qkv[:, : (self.num_heads + self.num_kv_heads) * self.head_dim]
        qk = apply_rope(qk.view(num_tokens, -1, self.head_dim), cos, sin)  # [T, H + H_kv, D]
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, (self.num_heads + self.num_kv_heads) * self.head_dim :].view(num_tokens, -1, self.head_dim)
        k_cache, v_cache = kv
        k_cache.index_copy_(1, batch.kv_write_index, k.transpose(0, 1).to(k_cache.dtype))  # head-major
        v_cache.index_copy_(1, batch.kv_write_index, v.transpose(0, 1).to(v_cache.dtype))
        attn = self._attention(q, k_cache, v_cache, batch)  # [T, H·D]
        residual = residual + self.o_proj(attn, batch.lora)
        gate_up = self.gate_up_proj(self.post_attention_layernorm(residual), batch.lora)  # [T, 2·I]
        inter = gate_up.shape[1] // 2
        return self.down_proj(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], batch.lora), residual

    def _attention(self, q, k_cache, v_cache, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, D] against the cached K/V of each token's sequence → [T, H·D]."""
        if batch.decode_token_index is not None and not batch.prefills and batch.decode_is_all_tokens:
            return self._decode_attention(q, k_cache, v_cache, batch).view(q.shape[0], -1)
        out = torch.empty_like(q)
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

    def _decode_attention(self, q, k_cache, v_cache, batch: ForwardBatch) -> torch.Tensor:
        """q [Bd, H, D], one query per decode sequence → [Bd, H, D] over its cached K/V.

        Plain batched products over (kv head, sequence) instead of SDPA, which for one query per
        sequence costs 3x more on CPU in bf16. The head-major cache makes every operand a view:
        no transposing copies. Scores and softmax are in fp32, as in SDPA.
        """
        num_seqs, max_len = batch.decode_kv_index.shape
        rows = batch.decode_kv_index.view(-1)  # [Bd·Lmax]
        k = k_cache.index_select(1, rows).view(-1, max_len, self.head_dim)  # [H_kv·Bd, Lmax, D]
        v = v_cache.index_select(1, rows).view(-1, max_len, self.head_dim)
        groups = self.num_heads // self.num_kv_heads
        qg = q.view(num_seqs, self.num_kv_heads, groups, self.head_dim).transpose(0, 1)  # [H_kv, Bd, g, D]
        scores = torch.bmm(
            qg.reshape(-1, groups, self.head_dim), k.transpose(1, 2)
        ).float()  # [H_kv·Bd, g, Lmax]
        scores = scores.view(self.num_kv_heads, num_seqs, groups, max_len).mul_(self.scale)
        probs = torch.softmax(scores.add_(batch.decode_kv_bias.view(1, num_seqs, 1, max_len)), dim=-1)
        out = torch.bmm(probs.to(v.dtype).view(-1, groups, max_len), v)  # [H_kv·Bd, g, D]
        return out.view(self.num_kv_heads, num_seqs, groups, self.head_dim).transpose(0, 1).reshape(q.shape)


def _causal_mask(num_queries: int, ctx_len: int, device: torch.device) -> torch.Tensor:
    """[L, C] bool: query i (at position C - L + i) sees keys 0..C - L + i."""
    query_pos = torch.arange(ctx_len - num_queries, ctx_len, device=device)
    return torch.arange(ctx_len, device=device)[None, :] <= query_pos[:, None]


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors)


class LlamaForServing(nn.Module):
    """The whole causal LM: embeddings → decoder layers → norm → LM head on sampled tokens only."""

    def __init__(self, config, weights: dict[str, torch.Tensor], max_positions: int, linear_kwargs: dict):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Parameter(weights.pop("model.embed_tokens.weight"), requires_grad=False)
        lm_head = weights.pop("lm_head.weight", None)
        self.lm_head = self.embed_tokens if lm_head is None else nn.Parameter(lm_head, requires_grad=False)
        self.norm = RMSNorm(weights.pop("model.norm.weight"), config.rms_norm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(config, _layer_weights(weights, i), linear_kwargs)
            for i in range(config.num_hidden_layers)
        )
        self.gemm = linear_kwargs.get("gemm", "x_wt")
        self.lm_head_gemm_weight = prepare_weight(self.lm_head, self.gemm)  # a reordered copy for oneDNN
        cos, sin = rope_cos_sin(config, max_positions)
        dtype = self.embed_tokens.dtype
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)  # [P, D]
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: KVCaches) -> torch.Tensor:
        """One step over the flat batch → next-token logits [B_sample, V] in fp32."""
        hidden = F.embedding(batch.input_ids, self.embed_tokens)  # [T, hidden]
        cos = self.rope_cos[batch.positions].unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin[batch.positions].unsqueeze(1)
        residual = None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos, sin, kv, batch)
        last = (residual + hidden).index_select(0, batch.logits_index)  # [B_sample, hidden]
        return base_linear(self.norm(last), self.lm_head_gemm_weight, None, self.gemm).float()

    def lora_layers(self) -> Iterator[tuple[int, MultiLoRALinear]]:
        """(layer index, module) for every module that holds LoRA slots."""
        for i, layer in enumerate(self.layers):
            for module in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                if module.has_lora_buffers:
                    yield i, module


def _layer_weights(weights: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Pop the tensors of layer ``index`` out of ``weights``, keyed relative to the layer."""
    prefix = f"model.layers.{index}."
    keys = [k for k in weights if k.startswith(prefix)]
    return {k[len(prefix) :]: weights.pop(k) for k in keys}


def load_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype, device) -> dict[str, torch.Tensor]:
    """Checkpoint tensors cast to the serving dtype on the serving device (rotary buffers dropped)."""
    return {
        name: tensor.to(device=device, dtype=dtype)
        for name, tensor in named_tensors
        if not name.endswith("rotary_emb.inv_freq")
    }
