"""SDPA core attention (the local spec's fast path) against megatron-core's plain DotProductAttention."""

from __future__ import annotations

import pytest
import torch

from training_utils import free_port


@pytest.fixture(scope="module")
def model_parallel():
    from megatron_patch import cpu_backend

    cpu_backend.enable()
    import torch.distributed as dist
    from megatron.core import parallel_state

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
    make = lambda n: torch.randn(seq, batch, n, head_dim, requires_grad=True)  # noqa: E731
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
    torch.testing.assert_close(out_sdpa, out_plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_sdpa, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_mask_matches_plain_attention_and_isolates_samples(model_parallel):
    from megatron_patch.data.providers import packed_attention_mask

    plain, sdpa = attention_pair(4, 2, 8)
    q, k, v = qkv(12, 1, 4, 2, 8)
    segments = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3])
    mask = packed_attention_mask(segments)
    out = sdpa(q, k, v, mask)
    torch.testing.assert_close(out, plain(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # The second sample alone gives the same output as inside the pack.
    alone = sdpa(q[5:9], k[5:9], v[5:9], None)
    torch.testing.assert_close(out[5:9], alone, atol=1e-5, rtol=1e-5)
