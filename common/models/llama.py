"""One Llama-family decoder for Llama 2/3.x, Mistral, SmolLM2, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Module names mirror HF's (``model.layers.N.self_attn...``) except the fused ``qkv_proj`` and
``gate_up_proj``; ``load_weights`` maps HF checkpoint names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.models.attention import PagedAttention
from common.models.rotary import RotaryEmbedding, rope_parameters
from kernels.activation import silu_and_mul
from kernels.attention_metadata import AttentionMetadata
from kernels.rms_norm import fused_add_rms_norm, rms_norm

# HF checkpoint names that carry no weights for us.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# FP8 KV cache scales as checkpoints name them (vLLM reads the same): which of K/V each one sets.
_KV_SCALE_SUFFIXES = {
    ".self_attn.k_scale": ("k",),
    ".self_attn.v_scale": ("v",),
    ".self_attn.kv_scale": ("k", "v"),
    ".self_attn.k_proj.k_scale": ("k",),
    ".self_attn.v_proj.v_scale": ("v",),
}


@dataclass(frozen=True)
class LlamaVariant:
    """What distinguishes the family members: biases and per-head q/k RMSNorm (Qwen3)."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


class RMSNorm(nn.Module):
    """HF-exact RMSNorm: normalize in float32, cast back, then scale by the weight.

    ``forward(x)`` returns the normed ``x``; ``forward(x, residual)`` first adds the residual (rounded to the
    activation dtype, as HF's ``residual + hidden``) and returns ``(normed, x + residual)``. A fused Triton
    kernel on CUDA (``kernels.rms_norm``), HF's torch code elsewhere.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


def head_dim_of(hf_config: Any) -> int:
    """``hf_config.head_dim`` when set (Qwen3: != hidden / heads), else hidden_size // num_heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


class LlamaAttention(nn.Module):
    """Fused qkv projection, optional per-head q/k norm, rope, paged attention, output projection."""

    def __init__(self, hf_config: Any, variant: LlamaVariant) -> None:
        super().__init__()
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(hf_config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        hidden = hf_config.hidden_size
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=variant.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=variant.o_bias)
        self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if variant.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if variant.qk_norm else None
        self.rotary_emb = RotaryEmbedding(self.head_dim, rope_parameters(hf_config))
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalizes each head before rope
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class LlamaMLP(nn.Module):
    """SwiGLU with a fused gate/up projection: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with the residual carried separately.

    ``forward`` takes the previous layer's un-added output and the residual stream (None for the first
    layer) and returns the same pair, so each residual add is fused into the norm that follows it (vLLM
    style). The sums and their rounding are HF's: ``residual + hidden`` in the activation dtype.
    """

    def __init__(self, hf_config: Any, variant: LlamaVariant) -> None:
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.self_attn = LlamaAttention(hf_config, variant)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.mlp = LlamaMLP(hf_config.hidden_size, hf_config.intermediate_size, variant.mlp_bias)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm (which also adds the last layer's output to the residual)."""

    def __init__(self, hf_config: Any, variant: LlamaVariant) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size)
        layers = [LlamaDecoderLayer(hf_config, variant) for _ in range(hf_config.num_hidden_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, kv_cache[i], attn_metadata)
        if residual is None:  # a model without layers
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The served model: ``forward`` gives final-norm hidden states, ``compute_logits`` float32 logits.

    ``kv_cache`` is ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; each forward
    writes its tokens' K/V at ``attn_metadata.slot_mapping`` in every layer before reading.
    """

    def __init__(self, hf_config: Any, variant: LlamaVariant) -> None:
        super().__init__()
        self.config = hf_config
        self.model = LlamaModel(hf_config, variant)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        first = self.model.layers[0].self_attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = first.num_heads
        self.num_kv_heads = first.num_kv_heads
        self.head_dim = first.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` -> hidden states ``[T, hidden]`` after the final norm."""
        return self.model(input_ids, positions, kv_cache, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> float32 ``[N, vocab]``."""
        return self.lm_head(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into our (partly fused) parameters, casting dtype.

        Raises ValueError on an unknown name, a shape mismatch, or a parameter left unloaded.
        Returns the names of our parameters that were (at least partly) loaded.
        """
        params = dict(self.named_parameters())
        shards: dict[str, set[int]] = {}  # our name -> first rows filled, to catch half-loaded fusions
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES) or (self.tie_word_embeddings and hf_name == "lm_head.weight"):
                continue
            if self._load_kv_scale(hf_name, tensor):
                continue
            name, rows = self._map_name(hf_name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} matches no parameter of {type(self).__name__}")
            _copy_shard(params[name], tensor, rows, hf_name)
            shards.setdefault(name, set()).add(0 if rows is None else rows.start)
        missing = sorted(n for n in params if len(shards.get(n, ())) < _num_shards(n))
        if missing:
            raise ValueError(f"checkpoint is missing weights for {missing[:5]} ({len(missing)} in all)")
        return set(shards)

    def _load_kv_scale(self, hf_name: str, tensor: torch.Tensor) -> bool:
        """Set a layer's FP8 KV cache scale from a checkpoint tensor (a per-head vector: its max, as vLLM
        does); False when ``hf_name`` is no KV scale. Read once here, so no step ever syncs for it."""
        suffix = next((s for s in _KV_SCALE_SUFFIXES if hf_name.endswith(s)), None)
        if suffix is None:
            return False
        layer = int(hf_name.removesuffix(suffix).rsplit(".", 1)[-1])
        value = float(tensor.float().max())
        if not value > 0.0:
            raise ValueError(f"checkpoint tensor {hf_name!r}: a KV cache scale must be positive, got {value}")
        for kind in _KV_SCALE_SUFFIXES[suffix]:
            setattr(self.model.layers[layer].self_attn.attn, f"{kind}_scale", value)
        return True

    def _map_name(self, hf_name: str) -> tuple[str, slice | None]:
        """HF name -> (our parameter name, rows of it that the tensor fills; None = all)."""
        attn = self.model.layers[0].self_attn
        q, kv = attn.q_size, attn.kv_size
        inter = self.model.layers[0].mlp.intermediate
        fused = {
            ".q_proj.": (".qkv_proj.", slice(0, q)),
            ".k_proj.": (".qkv_proj.", slice(q, q + kv)),
            ".v_proj.": (".qkv_proj.", slice(q + kv, q + 2 * kv)),
            ".gate_proj.": (".gate_up_proj.", slice(0, inter)),
            ".up_proj.": (".gate_up_proj.", slice(inter, 2 * inter)),
        }
        for part, (fused_part, rows) in fused.items():
            if part in hf_name:
                return hf_name.replace(part, fused_part), rows
        return hf_name, None


def _num_shards(name: str) -> int:
    """How many HF tensors fill one of our parameters (3 for q/k/v, 2 for gate/up, else 1)."""
    return 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 1


@torch.no_grad()
def _copy_shard(param: torch.Tensor, tensor: torch.Tensor, rows: slice | None, hf_name: str) -> None:
    """``param[rows] = tensor`` (whole param when rows is None) with a strict shape check."""
    target = param if rows is None else param[rows]
    if target.shape != tensor.shape:
        raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(target.shape)}")
    target.copy_(tensor)
