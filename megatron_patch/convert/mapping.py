"""The Qwen2.5 weight-name mapping table: one list of mappings drives HF -> Megatron and Megatron -> HF.

Megatron names are the canonical (Transformer Engine) names that a `torch_dist` checkpoint always holds, with
`{layer}` for the decoder layer index. Each mapping knows how its Megatron tensor is made from its HF tensors
(`to_mcore`) and back (`to_hf`); the two are exact inverses (pure reshapes and concatenations), so a
round trip is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_patch.model_sizes import Qwen25Size

# megatron's local spec keeps the two RMSNorms as modules of their own; its sharded_state_dict maps them onto the
# TE names (TransformerLayer.sharded_state_dict_keys_map), so torch_dist checkpoints only ever hold the TE names.
# Plain state dicts (model.state_dict(), legacy torch checkpoints) of the local spec use these instead.
LOCAL_SPEC_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

# HF entries that are buffers, not weights (older transformers saved them); never converted.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def canonical_mcore_name(name: str) -> str:
    """A Megatron parameter name in TE naming, whichever spec's plain state dict it came from."""
    for local, te in LOCAL_SPEC_NAMES.items():
        if name.endswith("." + local):
            return name[: -len(local)] + te
    return name


@dataclass(frozen=True)
class Mapping:
    """Base: one Megatron tensor <-> one or more HF tensors. Names may contain `{layer}`."""

    mcore: str
    hf: tuple[str, ...]

    def bind(self, layer: int | None) -> "Mapping":
        if layer is None:
            return self
        return type(self)(self.mcore.format(layer=layer), tuple(n.format(layer=layer) for n in self.hf))

    @property
    def layer(self) -> int | None:
        parts = self.mcore.split(".")
        return int(parts[2]) if parts[:2] == ["decoder", "layers"] else None

    def to_mcore(self, tensors: list[torch.Tensor], size: Qwen25Size) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, size: Qwen25Size) -> list[torch.Tensor]:
        raise NotImplementedError


class OneToOne(Mapping):
    def to_mcore(self, tensors, size):
        return tensors[0]

    def to_hf(self, tensor, size):
        return [tensor]


class QKVFused(Mapping):
    """HF q/k/v -> Megatron linear_qkv: per query group, [that group's q heads | its k head | its v head].

    Works for weights ([rows, hidden]) and biases ([rows]) alike: only the first dimension is regrouped.
    """

    def to_mcore(self, tensors, size):
        q, k, v = tensors
        groups, d = size.num_query_groups, size.head_dim
        rest = q.shape[1:]
        q = q.reshape(groups, -1, *rest)  # heads_per_group * head_dim rows per group
        k = k.reshape(groups, d, *rest)
        v = v.reshape(groups, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, tensor, size):
        groups, d = size.num_query_groups, size.head_dim
        q_rows = size.num_attention_heads // groups * d
        rest = tensor.shape[1:]
        q, k, v = tensor.reshape(groups, q_rows + 2 * d, *rest).split([q_rows, d, d], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


class GateUpFused(Mapping):
    """HF gate_proj and up_proj -> Megatron linear_fc1 = [gate; up] (SwiGLU's two halves, gate first)."""

    def to_mcore(self, tensors, size):
        return torch.cat(tensors, dim=0)

    def to_hf(self, tensor, size):
        return list(tensor.chunk(2, dim=0))


class TiedLMHead(Mapping):
    """Tied embeddings: Megatron has no output_layer and HF has no (or an identical) lm_head.weight.

    Only validates; contributes no tensor either way.
    """

    def to_mcore(self, tensors, size):
        return None

    def to_hf(self, tensor, size):
        return []


LAYER_MAPPINGS: tuple[Mapping, ...] = (
    OneToOne("decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
             ("model.layers.{layer}.input_layernorm.weight",)),
    QKVFused("decoder.layers.{layer}.self_attention.linear_qkv.weight",
             ("model.layers.{layer}.self_attn.q_proj.weight",
              "model.layers.{layer}.self_attn.k_proj.weight",
              "model.layers.{layer}.self_attn.v_proj.weight")),
    QKVFused("decoder.layers.{layer}.self_attention.linear_qkv.bias",
             ("model.layers.{layer}.self_attn.q_proj.bias",
              "model.layers.{layer}.self_attn.k_proj.bias",
              "model.layers.{layer}.self_attn.v_proj.bias")),
    OneToOne("decoder.layers.{layer}.self_attention.linear_proj.weight",
             ("model.layers.{layer}.self_attn.o_proj.weight",)),
    OneToOne("decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
             ("model.layers.{layer}.post_attention_layernorm.weight",)),
    GateUpFused("decoder.layers.{layer}.mlp.linear_fc1.weight",
                ("model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight")),
    OneToOne("decoder.layers.{layer}.mlp.linear_fc2.weight",
             ("model.layers.{layer}.mlp.down_proj.weight",)),
)


def qwen2_5_mappings(size: Qwen25Size) -> list[Mapping]:
    """The full table for one model, in checkpoint order (embedding, layers, final norm, output)."""
    table: list[Mapping] = [OneToOne("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    for layer in range(size.num_layers):
        table += [m.bind(layer) for m in LAYER_MAPPINGS]
    table.append(OneToOne("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if size.tie_word_embeddings:
        table.append(TiedLMHead("output_layer.weight", ("lm_head.weight",)))
    else:
        table.append(OneToOne("output_layer.weight", ("lm_head.weight",)))
    return table


def hf_shapes(size: Qwen25Size) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor a Qwen2ForCausalLM of this size has (lm_head only when untied)."""
    h, d = size.hidden_size, size.head_dim
    q, kv, ffn = size.num_attention_heads * d, size.num_query_groups * d, size.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (size.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(size.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        }
    if not size.tie_word_embeddings:
        shapes["lm_head.weight"] = (size.vocab_size, h)
    return shapes


def mcore_shapes(size: Qwen25Size) -> dict[str, tuple[int, ...]]:
    """The shape of every Megatron tensor, derived through the table itself (on the meta device)."""
    hf = hf_shapes(size)
    shapes = {}
    for m in qwen2_5_mappings(size):
        if isinstance(m, TiedLMHead):
            continue
        t = m.to_mcore([torch.empty(hf[n], device="meta") for n in m.hf], size)
        shapes[m.mcore] = tuple(t.shape)
    return shapes


def stacked_key(mcore_name: str) -> tuple[str, int | None]:
    """The torch_dist key of a Megatron tensor and its layer: decoder layers are saved stacked, one global
    tensor per name with the layer as a leading axis ('decoder.layers.3.x' -> 'decoder.layers.x', 3)."""
    parts = mcore_name.split(".")
    if parts[:2] == ["decoder", "layers"] and len(parts) > 2 and parts[2].isdigit():
        return ".".join(parts[:2] + parts[3:]), int(parts[2])
    return mcore_name, None
