"""The Qwen2.5 weight-name mapping table: one list of mappings drives HF -> Megatron and Megatron -> HF.

Megatron names are the canonical (Transformer Engine) names that a `torch_dist` checkpoint always holds, with
`{layer}` for the decoder layer index. Each mapping knows how its Megatron tensor is made from its HF tensors
(`to_mcore`) and back (`to_hf`); the two are exact inverses (pure reshapes and concatenations), so a
round trip is bit-exact.

Every Megatron tensor splits over tensor-parallel ranks along one dimension, and its HF tensors split along the
same one: a rank's shard of linear_qkv is the fusion of its query groups' q, k and v rows, its shard of
linear_fc1 is [its gate rows; its up rows] (megatron-core's per-rank SwiGLU layout), and a one-to-one tensor's
shard is the HF tensor's. So `to_mcore` of each HF tensor's TP-th part is the rank's shard (what
megatron_patch.convert.hf_direct loads).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


# The size-table quantities a Megatron tensor's dimensions are given in (the `dims` column of the table).
DIMS = {
    "vocab": lambda s: s.vocab_size,
    "hidden": lambda s: s.hidden_size,
    "q": lambda s: s.num_attention_heads * s.head_dim,
    "qkv": lambda s: (s.num_attention_heads + 2 * s.num_query_groups) * s.head_dim,
    "gate_up": lambda s: 2 * s.ffn_hidden_size,
    "ffn": lambda s: s.ffn_hidden_size,
}


@dataclass(frozen=True)
class Mapping:
    """Base: one Megatron tensor <-> one or more HF tensors. Names may contain `{layer}`; `dims` is the Megatron
    tensor's shape in DIMS names, from which every shape on both sides is derived (`mcore_shapes`, `hf_shapes`)."""

    mcore: str
    hf: tuple[str, ...]
    dims: tuple[str, ...]

    def bind(self, layer: int | None) -> "Mapping":
        if layer is None:
            return self
        return replace(self, mcore=self.mcore.format(layer=layer), hf=tuple(n.format(layer=layer) for n in self.hf))

    def mcore_shape(self, size: Qwen25Size) -> tuple[int, ...]:
        return tuple(DIMS[d](size) for d in self.dims)

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

    Works for weights ([rows, hidden]) and biases ([rows]) alike: only the first dimension is regrouped. The group
    count is read off k's rows, so a TP rank's slice of q, k and v (its query groups) fuses into its own rows.
    """

    def to_mcore(self, tensors, size):
        q, k, v = tensors
        d = size.head_dim
        groups = k.shape[0] // d
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


# A tied model trained with PP > 1: its last pipeline stage (without the embedding) holds a copy of the embedding
# as its output layer (megatron-core fills it from the first stage's once, at construction; a torch_dist checkpoint
# stores it under the embedding's key). Loaded straight from a HF folder, it is embed_tokens.
TIED_OUTPUT = OneToOne("output_layer.weight", ("model.embed_tokens.weight",), ("vocab", "hidden"))


LAYER_MAPPINGS: tuple[Mapping, ...] = (
    OneToOne("decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
             ("model.layers.{layer}.input_layernorm.weight",), ("hidden",)),
    QKVFused("decoder.layers.{layer}.self_attention.linear_qkv.weight",
             ("model.layers.{layer}.self_attn.q_proj.weight",
              "model.layers.{layer}.self_attn.k_proj.weight",
              "model.layers.{layer}.self_attn.v_proj.weight"), ("qkv", "hidden")),
    QKVFused("decoder.layers.{layer}.self_attention.linear_qkv.bias",
             ("model.layers.{layer}.self_attn.q_proj.bias",
              "model.layers.{layer}.self_attn.k_proj.bias",
              "model.layers.{layer}.self_attn.v_proj.bias"), ("qkv",)),
    OneToOne("decoder.layers.{layer}.self_attention.linear_proj.weight",
             ("model.layers.{layer}.self_attn.o_proj.weight",), ("hidden", "q")),
    OneToOne("decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
             ("model.layers.{layer}.post_attention_layernorm.weight",), ("hidden",)),
    GateUpFused("decoder.layers.{layer}.mlp.linear_fc1.weight",
                ("model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"),
                ("gate_up", "hidden")),
    OneToOne("decoder.layers.{layer}.mlp.linear_fc2.weight",
             ("model.layers.{layer}.mlp.down_proj.weight",), ("hidden", "ffn")),
)


def qwen2_5_mappings(size: Qwen25Size) -> list[Mapping]:
    """The full table for one model, in checkpoint order (embedding, layers, final norm, output)."""
    table: list[Mapping] = [OneToOne("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                                     ("vocab", "hidden"))]
    for layer in range(size.num_layers):
        table += [m.bind(layer) for m in LAYER_MAPPINGS]
    table.append(OneToOne("decoder.final_layernorm.weight", ("model.norm.weight",), ("hidden",)))
    head = TiedLMHead if size.tie_word_embeddings else OneToOne
    table.append(head("output_layer.weight", ("lm_head.weight",), ("vocab", "hidden")))
    return table


def mcore_shapes(size: Qwen25Size) -> dict[str, tuple[int, ...]]:
    """The shape of every Megatron tensor (output_layer only when untied), from the table's `dims`."""
    return {m.mcore: m.mcore_shape(size) for m in qwen2_5_mappings(size) if not isinstance(m, TiedLMHead)}


def hf_shapes(size: Qwen25Size) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor a Qwen2ForCausalLM of this size has (lm_head only when untied): each
    Megatron shape split by the table itself, on the meta device."""
    shapes = {}
    for m in qwen2_5_mappings(size):
        tensors = m.to_hf(torch.empty(m.mcore_shape(size), device="meta"), size)
        shapes |= {name: tuple(t.shape) for name, t in zip(m.hf, tensors)}
    return shapes


def stacked_key(mcore_name: str) -> tuple[str, int | None]:
    """The torch_dist key of a Megatron tensor and its layer: decoder layers are saved stacked, one global
    tensor per name with the layer as a leading axis ('decoder.layers.3.x' -> 'decoder.layers.x', 3)."""
    parts = mcore_name.split(".")
    if parts[:2] == ["decoder", "layers"] and len(parts) > 2 and parts[2].isdigit():
        return ".".join(parts[:2] + parts[3:]), int(parts[2])
    return mcore_name, None
