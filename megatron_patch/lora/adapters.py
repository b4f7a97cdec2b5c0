"""LoRA and DoRA adapters on megatron-core's tensor-parallel linear layers, local spec and Transformer Engine's.

An adapted layer stays an instance of its own class, so its weights keep their names and checkpoint keys and
megatron's isinstance checks still hold: `adapt` gives it a subclass that adds the adapter's output to its own
(the technique of torch.nn.utils.parametrize). The adapter follows the base layer's tensor-parallel split:

  column-parallel base (linear_qkv, linear_fc1: output rows split): A [r, in] replicated, B [out/TP, r] split.
      h = A x goes through copy-to-TP-region, whose backward sums every rank's partial dL/dh (each rank's B rows
      see part of the output). With sequence parallelism x is this rank's chunk of the sequence: h is
      all-gathered over the sequence instead (backward: reduce-scatter), and A's gradient, from this chunk
      only, is summed over TP by megatron's finalize_model_grads (param.sequence_parallel).
  row-parallel base (linear_proj, linear_fc2: input columns split): A [r, in/TP] split, B [out, r] replicated.
      h = all-reduce(A_local x_local); with sequence parallelism a reduce-scatter over the sequence, and B's
      gradient (from this chunk) summed over TP by megatron.

Only rank-sized tensors (r values per token) cross ranks. Transformer Engine's layer-norm linears
(TELayerNormColumnParallelLinear) are asked for their normalized input (return_layernorm_output), which is
what the adapter reads.

At TP 1, LoRA on megatron's local layers runs as one autograd function with the frozen base
(FrozenLinearWithLora): the layer's output and its input's gradient are each written by the adapter's small GEMM
and completed in place by the base's GEMM, where separate autograd branches would write each twice and sum them.

DoRA (PEFT's use_dora): out = base + (m / n - 1) * base_without_bias + (m / n) * s * B A x, where
n = ||W + s B A|| per output row is detached (DoRA paper, section 4.3) and m is the trained magnitude. A
row-parallel weight's row norms are summed over TP.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from megatron_patch.lora.targets import LoraSettings

COLUMN, ROW = "column", "row"
# Which tensors a base of each kind splits over TP, and along which axis (the rest are replicated).
SPLIT_AXES = {COLUMN: {"lora_B": 0, "magnitude": 0}, ROW: {"lora_A": 1}}


def parallel_kind(module: torch.nn.Module) -> str:
    """'column' or 'row': how the base layer splits its weight over tensor-parallel ranks."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return COLUMN
    if isinstance(module, RowParallelLinear):
        return ROW
    mode = getattr(module, "parallel_mode", None)  # Transformer Engine's linears say it themselves
    if mode in (COLUMN, ROW):
        return mode
    raise TypeError(f"{type(module).__name__} is not a column- or row-parallel linear layer; LoRA cannot adapt it")


class FrozenLinearWithLora(torch.autograd.Function):
    """x W^T (+ bias) + s (x A^T) B^T for a frozen W, TP 1, no dropout. The rank-sized products are bandwidth-bound,
    the base's compute-bound: so the update (with the bias in its epilogue) is written first and the base GEMM adds
    onto it in its epilogue (beta = 1), where reading it costs no time; likewise dL/dx = (s g B) A + g W. Only
    the adapter's gradients are computed."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # as megatron's linears: backward under forward's autocast state
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        flat = x.reshape(-1, x.shape[-1])
        h = torch.mm(flat, lora_A.t()).mul_(scaling)  # s A x, rank-sized
        out = torch.mm(h, lora_B.t()) if bias is None else torch.addmm(bias, h, lora_B.t())
        out.addmm_(flat, weight.t())
        ctx.save_for_backward(x, h, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        x, h, weight, lora_A, lora_B = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = torch.mm(g, lora_B).mul_(ctx.scaling)  # dL/d(A x)
        grad_B = torch.mm(g.t(), h)
        grad_A = torch.mm(grad_h.t(), x.reshape(-1, x.shape[-1]))
        grad_x = torch.mm(grad_h, lora_A).addmm_(g, weight).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_A, grad_B, None


def is_local_linear(module: torch.nn.Module) -> bool:
    """megatron-core's own (not Transformer Engine's) column- or row-parallel linear layer."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return isinstance(module, (ColumnParallelLinear, RowParallelLinear))


class Adapter(torch.nn.Module):
    """A base layer's low-rank update: lora_A [r, in_local], lora_B [out_local, r] (local: this rank's part of the
    base weight's shape) and, for DoRA, the magnitude [out_local]. `fused_halves` = 2 for SwiGLU's [gate; up]
    linear_fc1, whose B rows (and magnitude) each rank holds as [its gate rows; its up rows]."""

    def __init__(self, settings: LoraSettings, kind: str, weight: torch.Tensor, tp_group, sequence_parallel: bool,
                 fused_halves: int = 1):
        from megatron.core.utils import get_pg_rank, get_pg_size

        super().__init__()
        self.kind, self.scaling, self.tp_group, self.fused_halves = kind, settings.scaling, tp_group, fused_halves
        self.tp_size, self.tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        out_local, in_local = weight.shape
        like = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = torch.nn.Parameter(torch.zeros(settings.rank, in_local, **like))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, settings.rank, **like))
        self.magnitude = torch.nn.Parameter(torch.ones(out_local, **like)) if settings.dora else None
        self.dropout = torch.nn.Dropout(settings.dropout) if settings.dropout > 0 else torch.nn.Identity()
        # FrozenLinearWithLora's case (local layer, TP 1, LoRA), set by `adapt`; AdaptedLinear adds the rest
        self.inside_base = False
        for name, param in self.named_parameters():
            axis = SPLIT_AXES[kind].get(name)
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = \
                axis is not None, -1 if axis is None else axis, 1
            # Replicated, but computed from this rank's chunk of the sequence: megatron sums it over TP.
            param.sequence_parallel = axis is None and self.sequence_parallel

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, weight: torch.Tensor) -> None:
        """PEFT's initial values: A kaiming-uniform (a=sqrt(5), i.e. uniform within 1/sqrt(fan_in)), B zero, DoRA's
        magnitude the weight's row norms. A is drawn whole from `generator` and this rank keeps its part, so every
        TP layout starts from the same adapter."""
        rank, fan_in = self.lora_A.shape[0], self.lora_A.shape[1] * (self.tp_size if self.kind == ROW else 1)
        bound = 1 / math.sqrt(fan_in)
        whole = torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)
        if self.kind == ROW:
            whole = whole.chunk(self.tp_size, dim=1)[self.tp_rank]
        self.lora_A.copy_(whole)
        self.lora_B.zero_()
        if self.magnitude is not None:
            self.magnitude.copy_(self.weight_norm(weight))

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| of each output row, in fp32, no gradient."""
        squares = (weight.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())).square().sum(dim=1)
        if self.kind == ROW and self.tp_size > 1:
            torch.distributed.all_reduce(squares, group=self.tp_group)
        return squares.sqrt().to(weight.dtype)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """h = A dropout(x), combined over TP as B needs it: rank-sized values per token."""
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        if self.training and isinstance(self.dropout, torch.nn.Dropout):
            # Inputs that differ between TP ranks (split columns, sequence chunks) take TP's own dropout stream.
            split_input = self.tp_size > 1 and (self.kind == ROW or self.sequence_parallel)
            with get_cuda_rng_tracker().fork() if split_input else contextlib.nullcontext():
                x = self.dropout(x)
        return self.combine_over_tp(F.linear(x, self.lora_A))

    def combine_over_tp(self, h: torch.Tensor) -> torch.Tensor:
        """A x as B needs it (the module docstring says why each)."""
        from megatron.core.tensor_parallel import mappings

        if self.tp_size == 1:
            return h
        if self.kind == COLUMN:
            if self.sequence_parallel:
                return mappings.gather_from_sequence_parallel_region(h, True, self.tp_group)
            return mappings.copy_to_tensor_model_parallel_region(h, self.tp_group)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(h, self.tp_group)
        return mappings.reduce_from_tensor_model_parallel_region(h, self.tp_group)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, weight: torch.Tensor,
                added_bias: torch.Tensor | None) -> torch.Tensor:
        """The adapted output, given the base layer's input `x` (normalized for TE's layer-norm linears), its output
        and weight, and the bias its output includes (None when it returns the bias apart)."""
        h = self.down(x)
        if self.magnitude is None:
            # base + s B h as one GEMM whose epilogue adds the base's output (cuBLAS's beta = 1): the scaling and
            # the sum take no passes of their own over the layer's output, forward or backward.
            out = torch.addmm(base_output.reshape(-1, base_output.shape[-1]), h.reshape(-1, h.shape[-1]),
                              self.lora_B.t(), alpha=self.scaling)
            return out.view(base_output.shape)
        update = F.linear(h, self.lora_B)
        scale = self.magnitude / self.weight_norm(weight)
        without_bias = base_output if added_bias is None else base_output - added_bias
        return base_output + (scale - 1) * without_bias + scale * (self.scaling * update)

    def sharded_state_dict(self, prefix: str, sharded_offsets: tuple, metadata: dict | None) -> dict:
        """The adapter's tensors for torch_dist, split as the base splits (and as SwiGLU's halves for fc1), so a
        checkpoint resumes under another TP/PP layout."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                      SPLIT_AXES[self.kind], sharded_offsets, tp_group=self.tp_group,
                                                      dp_cp_group=metadata["dp_cp_group"])
        if self.fused_halves == 2:
            for key in (f"{prefix}lora_B", f"{prefix}magnitude"):
                if key in sharded:
                    sharded[key] = apply_swiglu_sharded_factory(
                        sharded[key], sharded_offsets, metadata.get("singleton_local_shards", False),
                        tp_group=self.tp_group, dp_group=metadata["dp_cp_group"])
        return sharded


def split_linear_output(result: tuple, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(output, returned bias, the input the adapter reads) from what a megatron linear returns: (out, bias), or
    for TE's layer-norm linears with return_layernorm_output ((out, normed), None) or (out, bias, normed)."""
    if len(result) == 3:
        return result
    output, bias = result
    if isinstance(output, tuple):
        output, normed = output
        return output, bias, normed
    return output, bias, x


def bias_inside_output(module: torch.nn.Module, returned_bias) -> torch.Tensor | None:
    """The bias the base layer added to its output itself (None when it returned it apart, or has none; TE keeps
    an empty tensor for no bias)."""
    bias = getattr(module, "bias", None)
    if returned_bias is not None or bias is None or bias.numel() == 0:
        return None
    return bias


class AdaptedLinear:
    """Placed in front of a megatron linear class by `adapt`: the base's forward plus the adapter's update, and
    the adapter's tensors beside the base's in the checkpoint (under `<layer>.adapter.`)."""

    adapter: Adapter

    def _update_inside_base(self) -> bool:
        """Whether this forward's update runs inside the base layer's GEMMs (FrozenLinearWithLora)."""
        adapter = self.adapter
        return adapter.inside_base and not self.weight.requires_grad \
            and not (adapter.training and isinstance(adapter.dropout, torch.nn.Dropout))

    def _forward_impl(self, input, weight, *args, **kwargs):  # megatron's local layers' GEMM, at TP 1 only
        if not self._update_inside_base():
            return super()._forward_impl(input, weight, *args, **kwargs)
        adapter = self.adapter
        return FrozenLinearWithLora.apply(input, weight, kwargs.get("bias"), adapter.lora_A, adapter.lora_B,
                                          adapter.scaling)

    def forward(self, x, *args, **kwargs):
        if self._update_inside_base():
            return super().forward(x, *args, **kwargs)
        output, bias, adapter_input = split_linear_output(super().forward(x, *args, **kwargs), x)
        return self.adapter(adapter_input, output, self.weight, bias_inside_output(self, bias)), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # The base's own method lists the adapter's tensors as replicated; these entries replace them.
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        sharded.update(self.adapter.sharded_state_dict(f"{prefix}adapter.", sharded_offsets, metadata))
        return sharded


_ADAPTED_CLASSES: dict[type, type] = {}


def adapt(module: torch.nn.Module, settings: LoraSettings, fused_halves: int = 1) -> Adapter:
    """Give a megatron linear layer (ColumnParallelLinear, RowParallelLinear, or TE's TELayerNormColumnParallelLinear,
    TEColumnParallelLinear, TERowParallelLinear) an adapter; returns it (zero-initialised: see Adapter.initialize)."""
    base_class = type(module)
    if issubclass(base_class, AdaptedLinear):
        raise ValueError(f"{base_class.__name__} already has an adapter")
    kind = parallel_kind(module)
    if hasattr(module, "return_layernorm_output"):  # TE's layer-norm linear: the adapter reads the normed input
        module.return_layernorm_output = True
        module.return_layernorm_output_gathered = False  # with SP, h (rank-sized) is gathered instead
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    # megatron's local layers keep their group as tp_group, its TE wrappers as _tp_group
    tp_group = getattr(module, "tp_group", None)
    if tp_group is None:
        tp_group = getattr(module, "_tp_group", None)
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    module.adapter = Adapter(settings, kind, module.weight, tp_group, module.config.sequence_parallel, fused_halves)
    module.adapter.inside_base = is_local_linear(module) and module.adapter.tp_size == 1 and not settings.dora
    if base_class not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[base_class] = type(f"Adapted{base_class.__name__}", (AdaptedLinear, base_class), {})
    module.__class__ = _ADAPTED_CLASSES[base_class]
    return module.adapter
