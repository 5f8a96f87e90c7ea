"""One Llama-family decoder for Llama 2/3.x, Mistral, SmolLM2, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Module names mirror HF's (``model.layers.N.self_attn...``) except the fused ``qkv_proj`` and
``gate_up_proj``; ``load_weights`` maps HF checkpoint names onto them.

With a ``TensorParallelGroup`` (``tp``) each rank builds its shard: its query/KV heads (fused q|k|v of its heads),
its rows of gate and of up (fused gate|up), the matching columns of o_proj and down_proj (each followed by an
all-reduce), and its rows of the vocabulary (embedding and LM head). ``load_weights`` then reads only the rank's
rows/columns of each checkpoint tensor. Without ``tp`` the model is built from plain layers: no collective, no
extra op.

Multi-LoRA: a forward may take a ``LoRAStep`` (``lora=``) for a step with adapter rows; each layer then adds its
adapters' deltas to the outputs of ``qkv_proj``, ``o_proj``, ``gate_up_proj`` and ``down_proj`` (whatever modules
those are). Without it (``lora=None``) the forward is the base model's, op for op.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.distributed.group import TensorParallelGroup, partition
from common.lora.step import LayerLoRA, LoRAStep
from common.models.attention import PagedAttention
from common.models.parallel_layers import (
    HeadShard,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    shard_heads,
)
from common.models.rotary import RotaryEmbedding, rope_parameters
from kernels.activation import silu_and_mul
from kernels.attention_metadata import AttentionMetadata
from kernels.rms_norm import fused_add_rms_norm, rms_norm

# (dim, start, end, full length along dim) of a checkpoint tensor that one rank reads; None = all of it.
Source = tuple[int, int, int, int] | None

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

    def __init__(self, hf_config: Any, variant: LlamaVariant, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        total_heads = hf_config.num_attention_heads
        total_kv_heads = getattr(hf_config, "num_key_value_heads", None) or total_heads
        self.shard: HeadShard | None = None
        if tp is not None:
            self.shard = shard_heads(total_heads, total_kv_heads, tp.rank, tp.world_size)
        self.num_heads = self.shard.num_heads if self.shard else total_heads
        self.num_kv_heads = self.shard.num_kv_heads if self.shard else total_kv_heads
        self.head_dim = head_dim_of(hf_config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        hidden = hf_config.hidden_size
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=variant.qkv_bias)
        self.o_proj = _row_parallel(self.q_size, hidden, variant.o_bias, tp)
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
        lora: LayerLoRA | None = None,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if lora is not None:
            lora.add("qkv_proj", qkv, x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalizes each head before rope
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        attn = self.attn(q, k, v, kv_cache, attn_metadata)
        out = self.o_proj(attn)
        if lora is not None:
            lora.add("o_proj", out, attn)
        return out


class LlamaMLP(nn.Module):
    """SwiGLU with a fused gate/up projection: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.total_intermediate = intermediate
        self.rows = partition(intermediate, tp.world_size)[tp.rank] if tp is not None else (0, intermediate)
        self.intermediate = self.rows[1] - self.rows[0]  # this rank's
        self.gate_up_proj = nn.Linear(hidden, 2 * self.intermediate, bias=bias)
        self.down_proj = _row_parallel(self.intermediate, hidden, bias, tp)

    def forward(self, x: torch.Tensor, lora: LayerLoRA | None = None) -> torch.Tensor:
        if lora is None:
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        gate_up = lora.add("gate_up_proj", self.gate_up_proj(x), x)
        hidden = silu_and_mul(gate_up)
        return lora.add("down_proj", self.down_proj(hidden), hidden)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with the residual carried separately.

    ``forward`` takes the previous layer's un-added output and the residual stream (None for the first
    layer) and returns the same pair, so each residual add is fused into the norm that follows it (vLLM
    style). The sums and their rounding are HF's: ``residual + hidden`` in the activation dtype.
    """

    def __init__(self, hf_config: Any, variant: LlamaVariant, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.self_attn = LlamaAttention(hf_config, variant, tp)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.mlp = LlamaMLP(hf_config.hidden_size, hf_config.intermediate_size, variant.mlp_bias, tp)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        lora: LayerLoRA | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata, lora)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, lora), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm (which also adds the last layer's output to the residual)."""

    def __init__(self, hf_config: Any, variant: LlamaVariant, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        vocab, hidden = hf_config.vocab_size, hf_config.hidden_size
        if tp is None:
            self.embed_tokens = nn.Embedding(vocab, hidden)
        else:
            self.embed_tokens = VocabParallelEmbedding(vocab, hidden, tp)
        layers = [LlamaDecoderLayer(hf_config, variant, tp) for _ in range(hf_config.num_hidden_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            layer_lora = lora.layer(i) if lora is not None else None
            hidden, residual = layer(positions, hidden, residual, kv_cache[i], attn_metadata, layer_lora)
        if residual is None:  # a model without layers
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The served model: ``forward`` gives final-norm hidden states, ``compute_logits`` float32 logits.

    ``kv_cache`` is ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; each forward
    writes its tokens' K/V at ``attn_metadata.slot_mapping`` in every layer before reading.
    """

    def __init__(self, hf_config: Any, variant: LlamaVariant, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.config = hf_config
        self.tp = tp
        self.model = LlamaModel(hf_config, variant, tp)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if tp is None:
            self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        else:
            self.lm_head = VocabParallelLMHead(hf_config.hidden_size, hf_config.vocab_size, tp)
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
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` -> hidden states ``[T, hidden]`` after the final norm; ``lora``: the
        step's adapter rows (None: the base model for every row)."""
        return self.model(input_ids, positions, kv_cache, attn_metadata, lora)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> float32 ``[N, vocab]`` (tensor-parallel: on rank 0; the others' result is unused)."""
        return self.lm_head(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into our (partly fused) parameters, casting dtype.

        Raises ValueError on an unknown name, a shape mismatch, or a parameter left unloaded.
        Returns the names of our parameters that were (at least partly) loaded. Tensor-parallel: each tensor may
        also be a lazy safetensors slice, of which only this rank's rows/columns are read.
        """
        params = dict(self.named_parameters())
        shards: dict[str, set[int]] = {}  # our name -> first rows filled, to catch half-loaded fusions
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES) or (self.tie_word_embeddings and hf_name == "lm_head.weight"):
                continue
            if self._load_kv_scale(hf_name, tensor):
                continue
            name, rows, source = self._map_name(hf_name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} matches no parameter of {type(self).__name__}")
            _copy_shard(params[name], tensor, rows, hf_name, source)
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
        value = float(_read(tensor, None).float().max())
        if not value > 0.0:
            raise ValueError(f"checkpoint tensor {hf_name!r}: a KV cache scale must be positive, got {value}")
        for kind in _KV_SCALE_SUFFIXES[suffix]:
            setattr(self.model.layers[layer].self_attn.attn, f"{kind}_scale", value)
        return True

    def _map_name(self, hf_name: str) -> tuple[str, slice | None, Source]:
        """HF name -> (our parameter name, rows of it that the tensor fills (None = all), what of the tensor this
        rank reads (None = all))."""
        attn, mlp = self.model.layers[0].self_attn, self.model.layers[0].mlp
        q, kv, inter = attn.q_size, attn.kv_size, mlp.intermediate
        fused = {
            ".q_proj.": (".qkv_proj.", slice(0, q)),
            ".k_proj.": (".qkv_proj.", slice(q, q + kv)),
            ".v_proj.": (".qkv_proj.", slice(q + kv, q + 2 * kv)),
            ".gate_proj.": (".gate_up_proj.", slice(0, inter)),
            ".up_proj.": (".gate_up_proj.", slice(inter, 2 * inter)),
        }
        for part, (fused_part, rows) in fused.items():
            if part in hf_name:
                return hf_name.replace(part, fused_part), rows, self._source(part, hf_name)
        return hf_name, None, self._source("", hf_name)

    def _source(self, part: str, hf_name: str) -> Source:
        """The rows (dim 0: column-parallel, vocabulary) or columns (dim 1: row-parallel) this rank reads."""
        if self.tp is None:
            return None
        attn, mlp = self.model.layers[0].self_attn, self.model.layers[0].mlp
        shard, dim = attn.shard, attn.head_dim
        total_q, total_kv = self.config.num_attention_heads * dim, _total_kv_heads(self.config) * dim
        heads = {
            ".q_proj.": (0, shard.q_start * dim, shard.q_end * dim, total_q),
            ".k_proj.": (0, shard.kv_start * dim, shard.kv_end * dim, total_kv),
            ".v_proj.": (0, shard.kv_start * dim, shard.kv_end * dim, total_kv),
            ".gate_proj.": (0, *mlp.rows, mlp.total_intermediate),
            ".up_proj.": (0, *mlp.rows, mlp.total_intermediate),
        }
        if part:
            return heads[part]
        if hf_name.endswith(".o_proj.weight"):
            return (1, shard.q_start * dim, shard.q_end * dim, total_q)
        if hf_name.endswith(".down_proj.weight"):
            return (1, *mlp.rows, mlp.total_intermediate)
        if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            embed = self.model.embed_tokens
            return (0, embed.vocab_start, embed.vocab_end, self.config.vocab_size)
        return None  # norms and row-parallel biases: every rank holds them whole


def _total_kv_heads(hf_config: Any) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def _row_parallel(in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup | None) -> nn.Linear:
    """A plain linear layer, or (tensor-parallel) one over this rank's input columns whose output is all-reduced."""
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


def _num_shards(name: str) -> int:
    """How many HF tensors fill one of our parameters (3 for q/k/v, 2 for gate/up, else 1)."""
    return 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 1


@torch.no_grad()
def _copy_shard(param: torch.Tensor, tensor: Any, rows: slice | None, hf_name: str, source: Source = None) -> None:
    """``param[rows] = tensor[source]`` (whole param when rows is None, whole tensor when source is None) with a
    strict shape check. ``tensor``: a torch tensor or a lazy safetensors slice (only ``source`` is read)."""
    target = param if rows is None else param[rows]
    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())
    expected = tuple(target.shape)
    if source is not None:
        dim, start, end, total = source
        expected = (*expected[:dim], total, *expected[dim + 1 :])
    if shape != expected:
        raise ValueError(f"{hf_name}: checkpoint shape {shape} != expected {expected}")
    target.copy_(_read(tensor, source))


def _read(tensor: Any, source: Source) -> torch.Tensor:
    """The part of ``tensor`` that ``source`` names (a lazy slice reads just those bytes)."""
    if source is None:
        return tensor if isinstance(tensor, torch.Tensor) else tensor[:]
    dim, start, end, _ = source
    if isinstance(tensor, torch.Tensor):
        return tensor.narrow(dim, start, end - start)
    return tensor[(slice(None),) * dim + (slice(start, end),)]
