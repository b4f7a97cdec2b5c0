"""SDPA core attention (the local spec's fast path) against megatron-core's plain DotProductAttention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training_utils import free_port

# Without a GPU the fixture's CPU backend runs megatron-core on the CPU; with one, megatron-core keeps its buffers
# on the GPU, so the parity tests run there (fp32: SDPA's memory-efficient kernel, so a looser tolerance).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEVICE == "cuda" else 1e-5


@pytest.fixture(scope="module")
def model_parallel():
    from megatron_patch.megatron_startup import importing_megatron

    with importing_megatron():  # on a CPU: the CPU backend, as in training
        from megatron.core import parallel_state
    import torch.distributed as dist

    # tcp:// init instead of MASTER_* variables: the environment leaks into every later test's subprocesses.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)  # the plain attention draws its dropout from this tracker
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def attention_pair(heads: int, groups: int, head_dim: int):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patch.attention import SDPACoreAttention

    config = TransformerConfig(num_layers=2, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=groups, attention_dropout=0.0, masked_softmax_fusion=False)
    args = (config, 2, AttnMaskType.causal, "self")
    return DotProductAttention(*args), SDPACoreAttention(*args)


def qkv(seq: int, batch: int, heads: int, groups: int, head_dim: int):
    torch.manual_seed(0)
    make = lambda n: torch.randn(seq, batch, n, head_dim, device=DEVICE, requires_grad=True)  # noqa: E731
    return make(heads), make(groups), make(groups)


@pytest.mark.parametrize("heads,groups", [(14, 2), (28, 4), (4, 4)])
def test_causal_gqa_matches_plain_attention_with_gradients(model_parallel, heads, groups):
    plain, sdpa = attention_pair(heads, groups, 16)
    q, k, v = qkv(32, 2, heads, groups, 16)
    out_plain = plain(q, k, v, None)
    grads_plain = torch.autograd.grad(out_plain.sum(), (q, k, v))
    out_sdpa = sdpa(q, k, v, None)
    grads_sdpa = torch.autograd.grad(out_sdpa.sum(), (q, k, v))
    assert out_sdpa.shape == out_plain.shape == (32, 2, heads * 16)
    torch.testing.assert_close(out_sdpa, out_plain, atol=TOL, rtol=TOL)
    for a, b in zip(grads_sdpa, grads_plain):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_packed_mask_matches_plain_attention_and_isolates_samples(model_parallel):
    from megatron_patch.data.providers import packed_attention_mask

    plain, sdpa = attention_pair(4, 2, 8)
    q, k, v = qkv(12, 1, 4, 2, 8)
    segments = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3])
    mask = packed_attention_mask(segments).to(DEVICE)
    out = sdpa(q, k, v, mask)
    torch.testing.assert_close(out, plain(q, k, v, mask), atol=TOL, rtol=TOL)
    # The second sample alone gives the same output as inside the pack.
    alone = sdpa(q[5:9], k[5:9], v[5:9], None)
    torch.testing.assert_close(out[5:9], alone, atol=TOL, rtol=TOL)


@pytest.mark.gpu
def test_cuda_bf16_attention_takes_cudnn_and_matches_fp32_plain_attention(model_parallel):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    plain, sdpa = attention_pair(12, 2, 128)
    q, k, v = (t.detach() for t in qkv(256, 2, 12, 2, 128))
    reference = plain(q, k, v, None)  # fp32, S x S scores
    bf16 = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = sdpa(*bf16, None)
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
    # The module's output is bit for bit cuDNN's: cuDNN takes this layout (permuted [s, b, heads, d]) and GQA,
    # so the first backend of our order is the one used.
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in bf16), is_causal=True,
                                               enable_gqa=True)
    torch.testing.assert_close(cudnn.permute(2, 0, 1, 3).reshape(out.shape), out, atol=0, rtol=0)
    grads = torch.autograd.grad(out.float().square().sum(), bf16)
    qf, kf, vf = (t.requires_grad_() for t in (q.clone(), k.clone(), v.clone()))
    grads_ref = torch.autograd.grad(plain(qf, kf, vf, None).square().sum(), (qf, kf, vf))
    for name, got, want in zip("qkv", grads, grads_ref):
        # bf16 inputs and kernel: single elements stray by a few bf16 steps, the whole gradient stays close.
        relative_error = ((got.float() - want).norm() / want.norm()).item()
        assert relative_error < 1e-2, f"d{name}: relative error {relative_error:.3g} against fp32 attention"


def test_packed_seq_params_count_samples_row_by_row():
    from megatron_patch.data.providers import packed_seq_params_for

    # Two rows: samples of 2 and 3 tokens and 1 padding token; samples of 4 and 2 tokens.
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    params = packed_seq_params_for(segments, "cpu")
    assert params.qkv_format == "sbhd"
    assert params.cu_seqlens_q.tolist() == [0, 2, 5, 6, 10, 12] and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 6  # the row: GPTModel sizes its rotary table by it
    assert params.longest_sample == 4
    # A row whose last sample has the same id as the next row's first still splits at the row boundary.
    assert packed_seq_params_for(torch.tensor([[0, 0, 0], [0, 1, 1]]), "cpu").cu_seqlens_q.tolist() == [0, 3, 4, 6]


def test_static_boundaries_cut_the_padding_and_end_in_empty_samples():
    """The boundaries a CUDA graph replays: the eager ones, plus a cut every `longest` tokens of padding, then the
    total repeated up to rows x segments entries; a row with more segments than the bounds fails, never merges."""
    from megatron_patch.data.providers import packed_seq_params_for, static_packed_seq_params
    from megatron_patch.data.sft_providers import PackedRowBounds

    # Row 1: samples of 3 and 2 tokens, 7 of padding; row 2: samples of 5 and 7 tokens, no padding.
    segments = torch.tensor([[0] * 3 + [1] * 2 + [2] * 7, [0] * 5 + [1] * 7])
    positions = torch.tensor([[0, 1, 2, 0, 1, *range(7)], [*range(5), *range(7)]])
    eager = packed_seq_params_for(segments, "cpu")
    assert eager.cu_seqlens_q.tolist() == [0, 3, 5, 12, 17, 24] and eager.longest_sample == 7
    static = static_packed_seq_params(segments, positions, PackedRowBounds(longest=7, segments=4))
    assert static.cu_seqlens_q.tolist() == [0, 3, 5, 12, 17, 24, 24, 24, 24] and static.cu_seqlens_q.dtype == torch.int32
    assert (static.max_seqlen_q, static.longest_sample) == (12, 7)
    # Samples of at most 5 tokens elsewhere in the data would make runs of 7 impossible: the padding is cut at 5.
    assert static_packed_seq_params(segments[:1], positions[:1], PackedRowBounds(5, 4)).cu_seqlens_q.tolist() == \
        [0, 3, 5, 10, 12]  # one row: 4 segments, all used
    with pytest.raises(RuntimeError, match="out of bounds"):
        static_packed_seq_params(segments, positions, PackedRowBounds(longest=7, segments=2))


def test_packed_row_bounds_cover_the_rows_and_their_padding_runs():
    from megatron_patch.data.sft_dataset import EpochShuffledRows
    from megatron_patch.data.sft_providers import BlendedSFTDataset, packed_row_bounds

    class Rows(EpochShuffledRows):
        def __init__(self, rows, lengths, seq_length):
            self.rows, self.lengths = rows, lengths
            super().__init__(len(rows), seq_length, None, 0, packing=True)

        def sample_length(self, i):
            return self.lengths[i]

    # Rows of 10: [5, 3] + 2 padding, [8] + 2, [2, 2, 2] + 4, and [9, 4 -> cut to 1]: longest 9
    first = Rows([[0, 1], [2], [3, 4, 5], [6, 7]], [5, 3, 8, 2, 2, 2, 9, 4], 10)
    assert first.row_lengths(3) == [9, 1]
    bounds = packed_row_bounds([first])
    assert (bounds.longest, bounds.segments) == (9, 4)
    # Another dataset of the run: samples of 3 at most, rows of 12 of which 11 padding: 1 + ceil(11 / 9) segments.
    second = Rows([[0]], [1], 12)
    blend = BlendedSFTDataset.__new__(BlendedSFTDataset)
    blend.datasets = [first, second]
    assert (packed_row_bounds([blend]).longest, packed_row_bounds([blend]).segments) == (9, 4)
    assert packed_row_bounds([Rows([[0]], [1], 40)]).segments == 1 + 39
    assert packed_row_bounds([Rows([[0]], [0], 10)]) is None  # no sample token anywhere


@pytest.mark.gpu
def test_cuda_packed_samples_through_varlen_match_fp32_block_mask(model_parallel):
    from megatron_patch import attention
    from megatron_patch.data.providers import packed_attention_mask, packed_seq_params_for

    assert attention.varlen_available()
    plain, sdpa = attention_pair(12, 2, 128)
    segments = torch.tensor([[0] * 150 + [1] * 70 + [2] * 36, [0] * 256])  # the last 36: padding
    q, k, v = (t.detach() for t in qkv(256, 2, 12, 2, 128))
    mask = packed_attention_mask(segments).to(DEVICE)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    reference = plain(qf, kf, vf, mask)  # fp32, S x S scores with the block mask
    grads_ref = torch.autograd.grad(reference.square().sum(), (qf, kf, vf))
    bf16 = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = sdpa(*bf16, None, packed_seq_params=packed_seq_params_for(segments, DEVICE))
    assert out.shape == reference.shape
    grads = torch.autograd.grad(out.float().square().sum(), bf16)
    for name, got, want in [("output", out, reference)] + list(zip(("dq", "dk", "dv"), grads, grads_ref)):
        relative_error = ((got.float() - want).norm() / want.norm()).item()
        assert relative_error < 1e-2, f"{name}: relative error {relative_error:.3g} against the fp32 block mask"


def _reference_varlen_flash_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """attention.varlen_flash_attention on the CPU, one causal SDPA call per sample: lets the CPU test the
    model's packed-sample wiring (the kernel itself is tested on the GPU above)."""
    assert torch.equal(cu_q, cu_k) and max_q == max_k
    bounds = cu_q.tolist()
    assert max_q >= max(b - a for a, b in zip(bounds, bounds[1:]))
    out = []
    for start, end in zip(bounds, bounds[1:]):
        if start == end:  # an empty sample (the fixed-size boundaries a CUDA graph replays end with them)
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)[0]
                   .transpose(0, 1))
    return torch.cat(out)


def tiny_gpt(core_attention=None, **config_changes):
    """A two-layer GPTModel of Qwen2.5's shape on DEVICE (the local spec with our fused modules, its core attention
    replaced if given), seed 5."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patch.model import qwen2_5_layer_spec

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=96, normalization="RMSNorm", gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
                               attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False,
                               bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                               **config_changes)
    spec = qwen2_5_layer_spec(use_te=False, fused_kernels=True)
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    torch.manual_seed(5)
    return GPTModel(config, spec, vocab_size=96, max_sequence_length=64, position_embedding_type="rope",
                    rotary_base=1000000).to(DEVICE)


class PackedBatch:
    """Two rows of packed samples: 9, 20 and 3 tokens then 8 of padding; 37 tokens and a short last sample."""

    def __init__(self):
        from megatron_patch.data.providers import packed_attention_mask, packed_seq_params_for, \
            static_packed_seq_params
        from megatron_patch.data.sft_providers import PackedRowBounds

        self.segments = torch.tensor([[0] * 9 + [1] * 20 + [2] * 3 + [3] * 8, [0] * 37 + [1] * 3])
        torch.manual_seed(7)
        self.tokens = torch.randint(0, 96, self.segments.shape, device=DEVICE)
        self.labels = torch.randint(0, 96, self.segments.shape, device=DEVICE)
        self.position_ids = torch.arange(40, device=DEVICE).expand(2, 40)
        self.mask = packed_attention_mask(self.segments).to(DEVICE)
        self.bounds = packed_seq_params_for(self.segments, DEVICE)
        # As a CUDA graph replays them: positions restarting in each sample and the padding, samples of at most 37
        # tokens, at most 5 segments a row (the padding of 8 cut into runs of at most 37: one).
        restart = [list(range(n)) for n in (9, 20, 3, 8)], [list(range(37)), list(range(3))]
        self.restarting_positions = torch.tensor([sum(row, []) for row in restart], device=DEVICE)
        self.static_bounds = static_packed_seq_params(self.segments.to(DEVICE), self.restarting_positions,
                                                      PackedRowBounds(longest=37, segments=5))

    def losses(self, model, attention: str) -> torch.Tensor:
        """Per-token losses [2, 40] with the block mask, the samples' boundaries (variable-length attention), the
        same in fixed shapes, or plain causal attention across the samples."""
        mask = self.mask if attention == "block mask" else None
        bounds = {"boundaries": self.bounds, "static boundaries": self.static_bounds}.get(attention)
        return model(self.tokens, self.position_ids, mask, labels=self.labels, packed_seq_params=bounds)


def test_model_with_packed_seq_params_matches_block_mask(model_parallel, monkeypatch):
    """The whole GPTModel (rotary table, attention, loss) given the samples' boundaries, as get_batch hands them
    over on a GPU, computes the losses the block mask gives (the kernel replaced by its CPU reference here; the
    GPU test below runs the kernel itself)."""
    from megatron_patch import attention

    monkeypatch.setattr(attention, "varlen_flash_attention", _reference_varlen_flash_attention)
    model, batch = tiny_gpt(), PackedBatch()
    with_mask, with_bounds = batch.losses(model, "block mask"), batch.losses(model, "boundaries")
    assert with_bounds.shape == with_mask.shape == (2, 40)
    torch.testing.assert_close(with_bounds, with_mask, atol=TOL, rtol=TOL)
    # The fixed-size boundaries (a CUDA graph's): the same samples; the padding's own losses are never counted.
    real = batch.segments.to(DEVICE) != torch.tensor([[3], [1]], device=DEVICE)
    torch.testing.assert_close(batch.losses(model, "static boundaries")[real], with_mask[real], atol=TOL, rtol=TOL)
    # ... and not what plain causal attention across the samples gives.
    assert (batch.losses(model, "causal") - with_mask).abs().max() > 1e-3


@pytest.mark.gpu
def test_cuda_model_with_varlen_flash_matches_the_fp32_block_mask(model_parallel, monkeypatch):
    """The same GPTModel in bf16 on the GPU, packed samples through torch's variable-length flash kernel (as packed
    SFT trains there): its per-token losses and first-layer QKV gradient are as close to the fp32 model with the
    block mask as the bf16 model with the block mask is (bf16's own rounding), and attention across the samples is
    far outside that (emulated on a CPU with the kernel's reference, relative to fp32: losses 1.7e-4 through the
    boundaries, 1.6e-4 with the bf16 block mask, 9.7e-3 across the samples; the gradient 6.2e-3, 6.4e-3, 0.77)."""
    from megatron_patch import attention

    calls = []
    kernel = attention.varlen_flash_attention
    monkeypatch.setattr(attention, "varlen_flash_attention", lambda *args: calls.append(1) or kernel(*args))
    model, batch, results = tiny_gpt(), PackedBatch(), {}
    for name, dtype, how in [("fp32 block mask", torch.float32, "block mask"),
                             ("bf16 block mask", torch.bfloat16, "block mask"),
                             ("bf16 varlen", torch.bfloat16, "boundaries"),
                             ("bf16 across samples", torch.bfloat16, "causal")]:
        model.to(dtype).zero_grad(set_to_none=True)  # the fp32 weights, rounded to bf16 after the reference
        losses = batch.losses(model, how).float()
        losses.sum().backward()
        results[name] = (losses.detach(), model.decoder.layers[0].self_attention.linear_qkv.weight.grad.float())
    assert len(calls) == 2  # one call per layer: the kernel itself, no stand-in

    for which, what in enumerate(("per-token losses", "QKV weight gradient")):
        error = {name: ((got[which] - results["fp32 block mask"][which]).norm()
                        / results["fp32 block mask"][which].norm()).item() for name, got in results.items()}
        assert error["bf16 varlen"] <= 3 * error["bf16 block mask"] + 1e-4, (what, error)
        assert error["bf16 across samples"] > 10 * max(error["bf16 varlen"], error["bf16 block mask"]), (what, error)


def test_thd_packed_seq_params_mark_each_sample_of_the_micro_batch_as_one_row():
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_patch.data.providers import thd_batch

    # Two rows: samples of 2 and 3 tokens and 1 padding token; samples of 4 and 2 tokens.
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    batch = {"tokens": torch.arange(12).view(2, 6), "labels": torch.arange(12).view(2, 6) + 1,
             "loss_mask": torch.ones(2, 6), "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]])}
    flat = thd_batch(batch, segments, "cpu")
    params = flat.pop("packed_seq_params")
    assert type(params) is PackedSeqParams and params.qkv_format == "thd"  # TE takes PackedSeqParams' own fields
    assert params.cu_seqlens_q.tolist() == [0, 2, 5, 6, 10, 12] and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 4  # the longest sample: it sizes the rotary table
    assert {key: value.tolist() for key, value in flat.items()} == \
        {key: value.reshape(1, 12).tolist() for key, value in batch.items()}


def test_model_with_thd_packed_seq_params_matches_block_mask(model_parallel):
    """megatron-core's thd path (the batch as one row of b * s tokens, RoPE restarting in every sample, attention
    on [t, heads, d]) as get_batch feeds it to the Transformer Engine spec gives the block mask's losses. TE's
    attention is stood in for by one causal SDPA call per sample over the cumulative lengths it is given."""
    from megatron_patch.attention import SDPACoreAttention
    from megatron_patch.data.providers import thd_batch

    seen = []

    class ThdReference(SDPACoreAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            p = packed_seq_params
            if p is None:  # the block-mask run
                return super().forward(query, key, value, attention_mask, attn_mask_type)
            assert p.qkv_format == "thd" and query.dim() == 3 and attention_mask is None
            seen.append(p.cu_seqlens_q.tolist())
            return _reference_varlen_flash_attention(query, key, value, p.cu_seqlens_q, p.cu_seqlens_kv,
                                                     p.max_seqlen_q, p.max_seqlen_kv, self.softmax_scale).flatten(1)

    model, batch = tiny_gpt(core_attention=ThdReference), PackedBatch()
    with_mask = batch.losses(model, "block mask")
    flat = thd_batch({"tokens": batch.tokens, "labels": batch.labels, "position_ids": batch.position_ids},
                     batch.segments, DEVICE)
    with_thd = model(flat["tokens"], flat["position_ids"], None, labels=flat["labels"],
                     packed_seq_params=flat["packed_seq_params"])
    assert with_thd.shape == (1, 80)
    torch.testing.assert_close(with_thd.view(2, 40), with_mask, atol=TOL, rtol=TOL)
    assert seen == [[0, 9, 29, 32, 40, 77, 80]] * 2  # both layers, the samples' boundaries (padding its own)


def test_model_with_fused_single_qkv_rope_matches_the_split_path(model_parallel, monkeypatch):
    """megatron-core's --fused-single-qkv-rope route through our function (its slot filled as the manifest does
    on a GPU) gives the split path's losses and gradients: exactly on the CPU (the function's CPU branch), to
    rounding through the Triton kernel on a GPU."""
    from megatron.core.transformer import attention as megatron_attention

    from megatron_patch.fused import rope

    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return rope.fused_qkv_split_rope(*args)

    monkeypatch.setattr(megatron_attention, "apply_fused_qkv_rotary_pos_emb", counted, raising=False)
    monkeypatch.setattr(megatron_attention, "HAVE_FUSED_QKV_ROPE", True)
    losses, grads, weights = [], [], None
    for fused in (False, True):
        model = tiny_gpt(fused_single_qkv_rope=fused)
        weights = weights or model.state_dict()
        model.load_state_dict(weights)
        torch.manual_seed(6)
        tokens, labels = torch.randint(0, 96, (2, 40), device=DEVICE), torch.randint(0, 96, (2, 40), device=DEVICE)
        loss = model(tokens, torch.arange(40, device=DEVICE).expand(2, 40), None, labels=labels)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(model.decoder.layers[0].self_attention.linear_qkv.weight.grad)
    assert calls == [(40, 2, 2, 4 * 16)] * 2  # [s, b, groups, (2 q heads + k + v) * head dim], once per layer
    tol = TOL if DEVICE == "cuda" else 0  # the CPU branch runs the split path's own operations; a GPU the kernel
    torch.testing.assert_close(losses[1], losses[0], atol=tol, rtol=tol)
    torch.testing.assert_close(grads[1], grads[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("changes,expected", [
    ({}, True),
    ({"bf16": False}, False),  # fp32: the flash kernel takes bf16/fp16 only
    ({"transformer_impl": "transformer_engine"}, False),
    ({"attention_dropout": 0.1}, False),  # the kernel has no dropout
    ({"cuda_graph_impl": "full_iteration"}, True),  # in fixed shapes (static_packed_seq_params)
    ({"plain_kernels": True}, False),  # megatron-core's DotProductAttention takes masks only
])
def test_packed_samples_take_varlen_only_where_it_runs(model_parallel, monkeypatch, changes, expected):
    from types import SimpleNamespace

    from megatron_patch.data import providers

    monkeypatch.setattr(providers, "varlen_available", lambda: True)
    args = SimpleNamespace(**{"transformer_impl": "local", "bf16": True, "fp16": False, "attention_dropout": 0.0,
                              "cuda_graph_impl": "none", "plain_kernels": False, **changes})
    assert providers.packed_attention_by_varlen(args) is expected
    monkeypatch.setattr(providers, "varlen_available", lambda: False)  # a CPU, or a GPU before Ampere
    assert providers.packed_attention_by_varlen(args) is False


def _packed_rows(lengths_per_row: list[list[int]], seq: int = 40) -> dict[str, torch.Tensor]:
    """Rows of packed samples of these lengths, padded to `seq` (its own segment; positions restart in each
    sample and in the padding), random tokens and labels, on DEVICE; `real` marks the samples' tokens."""
    rows = {"segments": [], "positions": [], "real": []}
    for lengths in lengths_per_row:
        padding = seq - sum(lengths)
        rows["segments"].append(sum(([k] * n for k, n in enumerate(lengths + [padding])), []))
        rows["positions"].append(sum((list(range(n)) for n in lengths + [padding]), []))
        rows["real"].append([True] * sum(lengths) + [False] * padding)
    out = {key: torch.tensor(value, device=DEVICE) for key, value in rows.items()}
    out["tokens"] = torch.randint(0, 96, out["segments"].shape, device=DEVICE)
    out["labels"] = torch.randint(0, 96, out["segments"].shape, device=DEVICE)
    return out


@pytest.mark.gpu
def test_cuda_graph_replays_the_fixed_size_boundaries_of_each_batch(model_parallel):
    """Forward and backward of the bf16 GPTModel on packed rows through the variable-length kernel, captured once
    in a CUDA graph with the boundaries computed inside it (as MP_CUDA_GRAPH trains packed SFT), then replayed on
    batches of other sample layouts copied into its inputs: every replay gives the losses and the QKV weight's
    gradient of an eager step on that batch with its own boundaries. A replay that kept the captured boundaries,
    or attended across samples, would not."""
    from megatron_patch.data.providers import packed_seq_params_for, static_packed_seq_params
    from megatron_patch.data.sft_providers import PackedRowBounds

    model = tiny_gpt().bfloat16()
    weight = model.decoder.layers[0].self_attention.linear_qkv.weight
    bounds = PackedRowBounds(longest=20, segments=6)
    torch.manual_seed(11)
    batches = [_packed_rows(rows) for rows in ([[9, 20, 3], [20, 17]], [[5, 5, 5, 5], [20, 20]], [[1], [12, 12, 12]])]

    def step(batch, params):
        # Logits, and the loss from them here: the model's own loss all-reduces over its (gloo) group, which a
        # capture cannot hold; training's graph holds NCCL's.
        logits = model(batch["tokens"], batch["positions"], None, packed_seq_params=params)
        losses = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        (grad,) = torch.autograd.grad((losses.view(batch["real"].shape) * batch["real"]).sum(), [weight])
        return losses.view(batch["real"].shape), grad

    static = {key: value.clone() for key, value in batches[0].items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as megatron-core's graph does
        for _ in range(2):
            step(static, static_packed_seq_params(static["segments"], static["positions"], bounds))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        losses, grad = step(static, static_packed_seq_params(static["segments"], static["positions"], bounds))
    for batch in batches[1:] + batches[:1]:
        for key in static:
            static[key].copy_(batch[key])
        graph.replay()
        want_losses, want_grad = step(batch, packed_seq_params_for(batch["segments"].cpu(), DEVICE))
        real = batch["real"]
        # The replay runs the kernel over more (empty) samples and another grid than the eager step: bf16 noise at
        # most, where attention across samples moves these losses by ~1e-2 (the varlen test above)
        error = ((losses[real] - want_losses[real]).norm() / want_losses[real].norm()).item()
        assert error <= 1e-3, error
        torch.testing.assert_close(grad, want_grad, atol=1e-3, rtol=1e-2)


def test_varlen_call_matches_this_torchs_public_api():
    """Our call into torch.nn.attention.varlen (argument names, causal window, GQA keyword), run on fake CUDA
    tensors: shapes and dtypes as the op's registered fake says, without a GPU (its kernels are tested on one)."""
    import inspect

    from torch._subclasses.fake_tensor import FakeTensorMode

    from megatron_patch import attention

    parameters = inspect.signature(attention.varlen_attn).parameters
    assert list(parameters)[:7] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"]
    assert {"scale", "window_size"} <= set(parameters)  # window (-1, 0): causal, in torch 2.11 and 2.14 alike
    with FakeTensorMode():
        q = torch.empty(12, 4, 16, device="cuda", dtype=torch.bfloat16)
        k = v = torch.empty(12, 2, 16, device="cuda", dtype=torch.bfloat16)
        cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32, device="cuda")
        out = attention.varlen_flash_attention(q, k, v, cu_seqlens, cu_seqlens, 7, 7, 0.25)
        assert out.shape == q.shape and out.dtype == q.dtype  # (the CPU backend, once up, maps "cuda" to the CPU)


def test_private_flash_calls_keep_their_pinned_signatures():
    """context_parallel.FlashBlock calls aten's private flash kernels by position; their schemas (the same in torch
    2.11 and 2.14) are pinned here, so a torch whose arguments moved fails this test, not a GPU run."""
    def arguments(op):
        schema = op.default._schema
        return [a.name for a in schema.arguments if not a.kwarg_only], \
            [a.name for a in schema.arguments if a.kwarg_only], len(schema.returns)

    positional, keyword, returns = arguments(torch.ops.aten._flash_attention_forward)
    assert positional == ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
                          "is_causal", "return_debug_mask"] and "scale" in keyword and returns == 5
    positional, keyword, returns = arguments(torch.ops.aten._flash_attention_backward)
    assert positional == ["grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q",
                          "max_k", "dropout_p", "is_causal", "rng_state", "unused"] and "scale" in keyword
    assert returns == 3


def test_get_batch_hands_packed_samples_to_te_as_thd_and_refuses_what_thd_cannot_take(model_parallel, monkeypatch):
    from types import SimpleNamespace

    from megatron_patch.data import providers
    from megatron_patch.errors import UserError

    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    item = {"tokens": torch.arange(12).view(2, 6), "labels": torch.arange(12).view(2, 6),
            "loss_mask": torch.ones(2, 6), "position_ids": torch.arange(6).expand(2, 6), "segment_ids": segments}
    args = SimpleNamespace(transformer_impl="transformer_engine", pipeline_model_parallel_size=1, micro_batch_size=2)
    monkeypatch.setattr(providers, "get_args", lambda: args)
    batch = providers.get_batch(iter([item]))
    assert batch["tokens"].shape == (1, 12) and "attention_mask" not in batch
    assert batch["packed_seq_params"].qkv_format == "thd"
    assert batch["packed_seq_params"].cu_seqlens_q.tolist() == [0, 2, 5, 6, 10, 12]
    args.pipeline_model_parallel_size = 2  # a stage's activations are [s, b, h], not one row of b x s
    with pytest.raises(UserError, match="need --transformer-impl local"):
        providers.get_batch(iter([item]))


def test_get_batch_under_a_cuda_graph_hands_over_fixed_size_boundaries(model_parallel, monkeypatch):
    """Under MP_CUDA_GRAPH the packed samples still take the variable-length kernel, their boundaries in the fixed
    shapes a replay can refill; without the run's bounds (no packed SFT dataset built) the block mask instead."""
    from types import SimpleNamespace

    from megatron_patch.data import providers, sft_providers

    segments = torch.tensor([[0] * 3 + [1] * 2 + [2] * 7, [0] * 5 + [1] * 7])
    item = {"tokens": torch.arange(24).view(2, 12), "labels": torch.arange(24).view(2, 12),
            "loss_mask": torch.ones(2, 12), "segment_ids": segments,
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, *range(7)], [*range(5), *range(7)]])}
    args = SimpleNamespace(transformer_impl="local", bf16=True, fp16=False, attention_dropout=0.0,
                           plain_kernels=False, cuda_graph_impl="full_iteration")
    monkeypatch.setattr(providers, "get_args", lambda: args)
    monkeypatch.setattr(providers, "varlen_available", lambda: True)
    monkeypatch.setattr(sft_providers, "packed_row_bounds_of_this_run", lambda: sft_providers.PackedRowBounds(7, 4))
    batch = providers.get_batch(iter([item]))
    assert "attention_mask" not in batch and batch["packed_seq_params"].longest_sample == 7
    assert batch["packed_seq_params"].cu_seqlens_q.tolist() == [0, 3, 5, 12, 17, 24, 24, 24, 24]
    args.cuda_graph_impl = "none"  # eager: this batch's own boundaries, read on the host
    assert providers.get_batch(iter([item]))["packed_seq_params"].cu_seqlens_q.tolist() == [0, 3, 5, 12, 17, 24]
    args.cuda_graph_impl = "full_iteration"
    monkeypatch.setattr(sft_providers, "packed_row_bounds_of_this_run", lambda: None)
    batch = providers.get_batch(iter([item]))
    assert "packed_seq_params" not in batch and batch["attention_mask"].shape == (2, 1, 12, 12)
