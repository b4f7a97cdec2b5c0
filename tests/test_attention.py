"""SDPA core attention (the local spec's fast path) against megatron-core's plain DotProductAttention."""

from __future__ import annotations

import pytest
import torch

from training_utils import free_port

# Without a GPU the fixture's CPU backend runs megatron-core on the CPU; with one, megatron-core keeps its buffers
# on the GPU, so the parity tests run there (fp32: SDPA's memory-efficient kernel, so a looser tolerance).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEVICE == "cuda" else 1e-5


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_attention_takes_cudnn_and_matches_fp32_plain_attention(model_parallel):
    import torch.nn.functional as F
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
