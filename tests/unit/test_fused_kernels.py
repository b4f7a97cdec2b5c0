"""Parity of the fused kernels (megatron_patch/fused) with the plain paths they replace.

On the GPU each kernel is a torch.compile'd function; here the same Python runs eagerly against megatron-core's
and transformers' modules, and a full-graph trace (aot_eager, no C++ compiler needed) proves it compiles whole.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_patch.fused import linear_cross_entropy as lce
from megatron_patch.fused.rms_norm import FusedRMSNorm, rms_norm
from megatron_patch.fused import rope
from megatron_patch.fused.rope import fused_apply_rotary_pos_emb


def _close(a, b, rtol, atol, what):
    assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol), \
        f"{what}: max abs difference {(a.float() - b.float()).abs().max().item():.3g}"


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_matches_transformers_qwen2_norm(dtype, tol):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    reference = Qwen2RMSNorm(96, eps=1e-6).to(dtype)
    torch.nn.init.normal_(reference.weight, 1.0, 0.2)
    x = (torch.randn(7, 3, 96) * 4).to(dtype)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = reference.weight.detach().clone().requires_grad_()

    expected = reference(x_ref)
    got = rms_norm(x_ours, weight, 1e-6)
    _close(got, expected, tol, tol, "forward")
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    _close(x_ours.grad, x_ref.grad, tol, tol, "input gradient")
    _close(weight.grad, reference.weight.grad, tol, tol * 10, "weight gradient")


def test_rms_norm_module_keeps_the_norm_parameter_layout():
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, normalization="RMSNorm",
                               sequence_parallel=False)
    norm = FusedRMSNorm(config, 32, eps=1e-6)
    # One parameter called `weight`, as torch.nn.RMSNorm: the local spec's TE key mapping applies unchanged.
    assert list(norm.state_dict()) == ["weight"]
    torch_norm = torch.nn.RMSNorm(32, eps=1e-6)
    x = torch.randn(5, 2, 32)
    _close(norm(x), torch_norm(x), 1e-6, 1e-6, "module forward")


def test_rms_norm_refuses_layer_norm_configs():
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, normalization="LayerNorm")
    with pytest.raises(ValueError, match="FusedRMSNorm is an RMSNorm"):
        FusedRMSNorm(config, 32)


# ---------------------------------------------------------------- RoPE

def _rope_inputs(dtype, rot_dim=16, seq=11):
    torch.manual_seed(1)
    batch, heads, dim = 2, 3, 16
    # megatron-core's RotaryEmbedding layout: [s, 1, 1, rot_dim], the angles repeated for both halves.
    inv_freq = 1.0 / (1000000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]
    return torch.randn(seq, batch, heads, dim, dtype=dtype), freqs


@pytest.mark.parametrize("dtype,rot_dim", [(torch.float32, 16), (torch.bfloat16, 16), (torch.bfloat16, 8)])
def test_rope_matches_megatron_unfused_rope(dtype, rot_dim):
    # rot_dim 8 of 16: megatron's --rotary-percent 0.5 (the rest of each head passes through).
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    t, freqs = _rope_inputs(dtype, rot_dim)
    t_ref, t_ours = t.clone().requires_grad_(), t.clone().requires_grad_()
    expected = _apply_rotary_pos_emb_bshd(t_ref, freqs)
    got = fused_apply_rotary_pos_emb(t_ours, freqs)
    assert torch.equal(got, expected)  # same operations in the same order when run eagerly
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    assert torch.equal(t_ours.grad, t_ref.grad)


def test_rope_matches_transformers_qwen2_rope():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    t, freqs = _rope_inputs(torch.float32)
    # transformers: [b, heads, s, d] with cos/sin [b, s, d]
    cos, sin = freqs.cos()[:, 0, 0][None], freqs.sin()[:, 0, 0][None]
    q = t.permute(1, 2, 0, 3)
    expected, _ = apply_rotary_pos_emb(q, q, cos.expand(2, -1, -1), sin.expand(2, -1, -1))
    _close(fused_apply_rotary_pos_emb(t, freqs).permute(1, 2, 0, 3), expected, 1e-6, 1e-6, "rope")


def test_rope_refuses_interleaved_layout():
    t, freqs = _rope_inputs(torch.float32)
    with pytest.raises(NotImplementedError, match="interleaved"):
        fused_apply_rotary_pos_emb(t, freqs, interleaved=True)


# ---------------------------------------------------------------- QKV split + RoPE (fused_single_qkv_rope)

def _qkv_inputs(seq, batch, groups, q_per_group, head_dim, dtype=torch.float32):
    torch.manual_seed(5)
    mixed = torch.randn(seq, batch, groups, (q_per_group + 2) * head_dim).to(dtype)
    _, freqs = _rope_inputs(torch.float32, head_dim, seq=seq + 3)  # megatron's table may run longer
    return mixed, freqs, [q_per_group * head_dim, head_dim, head_dim]


def _megatron_split_path(mixed, freqs, split_sizes):
    """megatron-core's own split path: torch.split, q reshaped across the groups, its unfused RoPE on q and k."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    query, key, value = torch.split(mixed, split_sizes, dim=3)
    query = query.reshape(query.size(0), query.size(1), -1, split_sizes[-1])
    seq = mixed.shape[0]
    return _apply_rotary_pos_emb_bshd(query, freqs[:seq]), _apply_rotary_pos_emb_bshd(key, freqs[:seq]), value


def test_qkv_split_rope_falls_back_to_megatron_cores_split_path_off_the_gpu():
    mixed, freqs, sizes = _qkv_inputs(5, 2, 2, 3, 16)
    ours_in, ref_in = mixed.clone().requires_grad_(), mixed.clone().requires_grad_()
    got = rope.fused_qkv_split_rope(ours_in, freqs[:5], freqs[:5], sizes)
    want = _megatron_split_path(ref_in, freqs, sizes)
    upstream = [torch.randn_like(w) for w in want]
    torch.autograd.backward(got, upstream)
    torch.autograd.backward(want, upstream)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape and torch.equal(g, w), name
    assert torch.equal(ours_in.grad, ref_in.grad)


def test_qkv_split_rope_kernel_matches_the_split_path_in_triton_interpreter():
    # The CUDA kernel run by Triton's interpreter: Qwen2.5-1.5B's grouping (2 groups of 6 q heads: 8 rows per
    # group, a power of two) and 7B's (4 of 7: 9 rows, padded to 16), an incoming q gradient in the permuted
    # layout attention hands back, forward and backward against megatron-core's split path in fp32.
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from test_fused_kernels import _megatron_split_path, _qkv_inputs
        from megatron_patch.fused import rope
        for groups, q_per_group in ((2, 6), (4, 7)):
            mixed, freqs, sizes = _qkv_inputs(6, 3, groups, q_per_group, 16)
            ours_in, ref_in = mixed.clone().requires_grad_(), mixed.clone().requires_grad_()
            got = rope._QkvRope.apply(ours_in, freqs, q_per_group)
            want = _megatron_split_path(ref_in, freqs, sizes)
            assert all(g.shape == w.shape and g.is_contiguous() for g, w in zip(got, want))
            upstream = [torch.randn_like(w) for w in want]
            permuted_q = upstream[0].permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
            torch.autograd.backward(got, [permuted_q] + upstream[1:])
            torch.autograd.backward(want, upstream)
            forward = max((g - w).abs().max().item() for g, w in zip(got, want))
            backward = (ours_in.grad - ref_in.grad).abs().max().item()
            print(groups, q_per_group, forward, backward, ours_in.grad.abs().min().item() > 0)
    """)
    for line in _run_in_triton_interpreter(script).strip().splitlines():
        groups, q_per_group, forward, backward, every_element_written = line.split()
        assert float(forward) < 1e-5 and float(backward) < 1e-5, line
        assert every_element_written == "True", line


def test_fused_single_qkv_rope_is_switched_on_only_where_it_applies(monkeypatch):
    from types import SimpleNamespace

    from megatron.core.transformer import attention

    from megatron_patch import patches

    def settle(**overrides):
        args = SimpleNamespace(**{**dict(gradient_accumulation_fusion=False, apply_rope_fusion=False,
                                         plain_kernels=False, sft_packing=False, position_embedding_type="rope",
                                         rotary_interleaved=False, qk_layernorm=False,
                                         multi_latent_attention=False), **overrides})
        return args, patches.settle_args(args)

    monkeypatch.setattr(attention, "apply_fused_qkv_rotary_pos_emb", rope.fused_qkv_split_rope, raising=False)
    args, changes = settle()
    assert args.fused_single_qkv_rope is True and changes == [
        "--fused-single-qkv-rope on: one kernel splits the QKV projection and applies RoPE"]
    args, changes = settle(tensor_model_parallel_size=2, num_query_groups=2)  # one KV group per TP rank
    assert args.fused_single_qkv_rope is True
    # megatron-core splits q, k, v itself for packed samples (and asserts if the flag is on), and its unsplit path
    # skips picking a rank's q heads when TP ranks share a KV group: left off
    for unfit in (dict(sft_packing=True), dict(rotary_interleaved=True), dict(position_embedding_type="yarn"),
                  dict(qk_layernorm=True), dict(tensor_model_parallel_size=4, num_query_groups=2)):
        args, changes = settle(**unfit)
        said = ["RoPE unfused for YaRN"] if unfit.get("position_embedding_type") == "yarn" else []  # the only line
        assert not getattr(args, "fused_single_qkv_rope", False) and [c[:21] for c in changes] == said, unfit
    # our kernel not in the slot (no GPU, or --plain-kernels): a user's flag is switched off, saying why
    monkeypatch.setattr(attention, "apply_fused_qkv_rotary_pos_emb", None, raising=False)
    args, changes = settle(fused_single_qkv_rope=True)
    assert args.fused_single_qkv_rope is False
    assert changes == ["--fused-single-qkv-rope off: it needs our QKV split + RoPE kernel (a GPU and triton, no "
                       "--plain-kernels)"]


# ---------------------------------------------------------------- bias inside the GEMM

class _RecordingContext:
    def save_for_backward(self, *tensors):
        self.saved = tensors


def test_linear_bias_in_gemm_leaves_megatron_cores_context_and_gradients(monkeypatch):
    from megatron.core.tensor_parallel import layers

    from megatron_patch.fused import linear_bias

    linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    monkeypatch.setattr(linear, "forward", inspect.getattr_static(linear, "forward"))  # restored afterwards
    monkeypatch.setattr(linear_bias, "_megatron_forward", None)
    torch.manual_seed(6)
    x, weight, bias = torch.randn(7, 3, 24), torch.randn(40, 24), torch.randn(40)
    rest = (False, False, False, None, 0, None, 1)  # no grad-accumulation fusion, all-reduce, SP, deferral, GTP

    def gradients():
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = linear.apply(*leaves, *rest)
        out.backward(torch.ones_like(out))
        return out.detach(), [leaf.grad for leaf in leaves]

    megatron_forward = linear.forward
    want_out, want_grads = gradients()
    linear_bias.install()
    assert linear.forward is not megatron_forward and linear_bias._megatron_forward is megatron_forward
    got_out, got_grads = gradients()  # megatron-core's backward on our forward's context
    _close(got_out, want_out, 1e-6, 1e-5, "output")
    for name, a, b in zip(("input", "weight", "bias"), got_grads, want_grads):
        _close(a, b, 1e-6, 1e-5, f"{name} gradient")

    theirs, ours = _RecordingContext(), _RecordingContext()
    megatron_forward(theirs, x, weight, bias, *rest)
    linear.forward(ours, x, weight, bias, *rest)
    assert set(vars(ours)) == set(vars(theirs))
    for name, value in vars(theirs).items():
        if name == "saved":
            assert len(value) == len(ours.saved) and all(a is b for a, b in zip(value, ours.saved))
        else:
            assert getattr(ours, name) == value, name
    # a layer without bias, or sequence parallel, still takes megatron-core's forward
    plain = _RecordingContext()
    _close(linear.forward(plain, x, weight, None, *rest), x @ weight.t(), 1e-6, 1e-5, "no bias")
    assert plain.use_bias is False


# ---------------------------------------------------------------- linear + cross-entropy

def _plain_loss(hidden, weight, labels, mask):
    logits = hidden @ weight.t()
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    return (losses * mask).sum()


def _ce_inputs(dtype, tokens=37, hidden_size=24, vocab=101):
    torch.manual_seed(2)
    hidden = (torch.randn(tokens, hidden_size) * 2).to(dtype)
    weight = (torch.randn(vocab, hidden_size) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,))
    mask = (torch.rand(tokens) > 0.3).float()  # prompt tokens of SFT data are masked out
    return hidden, weight, labels, mask


# The CPU's in-place chunk maths, and the CUDA path's kernels run eagerly here.
CHUNK_MATHS = {"in_place": lce._chunk_loss_and_grad_in_place, "cuda_kernels": lce._chunk_loss_and_grad_kernels}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_tokens", [5, 64])  # several chunks, one chunk
@pytest.mark.parametrize("maths", sorted(CHUNK_MATHS))
def test_linear_cross_entropy_matches_logits_then_cross_entropy(dtype, tol, chunk_tokens, maths, monkeypatch):
    assert lce._chunk_maths(torch.device("cpu")) is lce._chunk_loss_and_grad_in_place
    monkeypatch.setattr(lce, "_chunk_maths", lambda device: CHUNK_MATHS[maths])
    hidden, weight, labels, mask = _ce_inputs(dtype)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h_ours, w_ours = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    expected = _plain_loss(h_ref, w_ref, labels, mask)
    got = lce.linear_cross_entropy(h_ours, w_ours, labels, mask, chunk_tokens=chunk_tokens)
    _close(got, expected, tol, tol, "loss")
    with torch.no_grad():  # evaluation: the loss alone, without the gradient GEMMs
        _close(lce.linear_cross_entropy(h_ours, w_ours, labels, mask, chunk_tokens=chunk_tokens), got, 1e-6, 1e-6,
               "loss without gradients")
    (expected * 0.37).backward()  # the incoming gradient scales both gradients
    (got * 0.37).backward()
    _close(h_ours.grad, h_ref.grad, tol, tol, "hidden gradient")
    _close(w_ours.grad, w_ref.grad, tol, tol, "weight gradient")
    assert h_ours.grad.dtype == dtype and w_ours.grad.dtype == dtype


@pytest.mark.parametrize("chunk_tokens", [5, 64])
def test_a_frozen_output_layer_takes_no_weight_gradient(chunk_tokens, monkeypatch):
    """LoRA freezes the output layer: the loss and the hidden states' gradient are as before, and none of the
    weight-gradient GEMMs runs (at 7B they cost a 152,064 x 3,584 product per token chunk and a 2.2 GB fp32 sum)."""
    hidden, weight, labels, mask = _ce_inputs(torch.float32)
    calls = []
    add = lce._add_weight_gradient
    monkeypatch.setattr(lce, "_add_weight_gradient", lambda *args: calls.append(1) or add(*args))
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone()
    h_ours, w_ours = hidden.clone().requires_grad_(), weight.clone()
    expected = _plain_loss(h_ref, w_ref, labels, mask)
    got = lce.linear_cross_entropy(h_ours, w_ours, labels, mask, chunk_tokens=chunk_tokens)
    _close(got, expected, 1e-5, 1e-5, "loss")
    got.backward()
    expected.backward()
    _close(h_ours.grad, h_ref.grad, 1e-5, 1e-5, "hidden gradient")
    assert calls == [] and w_ours.grad is None
    w_trained = weight.clone().requires_grad_()  # the same call with a trained weight does run them
    lce.linear_cross_entropy(hidden.clone().requires_grad_(), w_trained, labels, mask, chunk_tokens=chunk_tokens)
    assert len(calls) == -(-37 // chunk_tokens)


def test_linear_cross_entropy_chunks_by_logit_bytes():
    # 0.5B at micro-batch 8 x 2048: chunks keep one chunk's bf16 logits near 1 GiB.
    chunk = lce.chunk_tokens_for(151936, 2)
    assert 3000 < chunk < 4000
    assert chunk * 151936 * 2 <= lce.CHUNK_LOGIT_BYTES


def _tensor_parallel_worker(rank, world, port, maths, hidden, weight, labels, mask, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    lce._chunk_maths = lambda device: CHUNK_MATHS[maths]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shard = weight.shape[0] // world
    h = hidden.clone().requires_grad_()
    w = weight[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    loss = lce.linear_cross_entropy(h, w, labels, mask, tp_group=dist.group.WORLD, chunk_tokens=8)
    loss.backward()
    with torch.no_grad():  # evaluation's loss-only path reduces across the shards too
        eval_loss = lce.linear_cross_entropy(h, w, labels, mask, tp_group=dist.group.WORLD, chunk_tokens=8)
    out[rank] = (loss.detach(), h.grad, w.grad, eval_loss)
    dist.destroy_process_group()


@pytest.mark.parametrize("maths", sorted(CHUNK_MATHS))
def test_linear_cross_entropy_over_two_vocabulary_shards_matches_one(maths):
    from megatron_patch.hardware import free_port

    hidden, weight, labels, mask = _ce_inputs(torch.float32, vocab=100)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = _plain_loss(h_ref, w_ref, labels, mask)
    expected.backward()

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_tensor_parallel_worker, args=(2, free_port(), maths, hidden, weight, labels, mask, out), nprocs=2)
        results = [out[r] for r in range(2)]
    for loss, _, _, eval_loss in results:
        _close(loss, expected, 1e-5, 1e-5, "loss on each rank")
        _close(eval_loss, expected, 1e-5, 1e-5, "loss without gradients on each rank")
    # Each rank's hidden gradient is its shard's part; megatron's copy-to-TP region all-reduces them.
    _close(results[0][1] + results[1][1], h_ref.grad, 1e-5, 1e-5, "hidden gradient")
    _close(torch.cat([results[0][2], results[1][2]]), w_ref.grad, 1e-5, 1e-5, "weight gradient")


# ---------------------------------------------------------------- each kernel compiles as one graph

def test_kernels_trace_as_single_graphs():
    t, freqs = _rope_inputs(torch.bfloat16)
    torch._dynamo.reset()
    cos, sin = rope._cos_sin.eager(freqs, t.dtype)
    for kernel in (rope._rotate, rope._rotate_backward):
        traced = torch.compile(kernel.eager, backend="aot_eager", fullgraph=True)
        assert torch.equal(traced(t, cos, sin), kernel.eager(t, cos, sin))

    x, w = torch.randn(4, 3, 32, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16)
    traced = torch.compile(rms_norm.eager, backend="aot_eager", fullgraph=True)
    assert torch.equal(traced(x, w, 1e-6), rms_norm.eager(x, w, 1e-6))

    hidden, weight, labels, mask = _ce_inputs(torch.bfloat16)
    logits = hidden @ weight.t()
    inside = labels < 80
    traced = torch.compile(lce._target_logit.eager, backend="aot_eager", fullgraph=True)
    assert torch.equal(traced(logits, labels, inside), lce._target_logit.eager(logits, labels, inside))

    from megatron_patch import context_parallel as cp  # the CP attention's block merge and dQ sum

    outs = [torch.randn(1, 4, 16, 8, dtype=torch.bfloat16) for _ in range(2)]
    lses = [torch.randn(1, 4, 16) for _ in range(2)]
    traced = torch.compile(cp.merge_two_blocks.eager, backend="aot_eager", fullgraph=True)
    for got, want in zip(traced(outs[0], lses[0], outs[1], lses[1]), cp.merge_two_blocks.eager(outs[0], lses[0],
                                                                                                 outs[1], lses[1])):
        assert torch.equal(got, want)
    traced = torch.compile(cp.sum_in_fp32.eager, backend="aot_eager", fullgraph=True)
    assert torch.equal(traced(*outs), cp.sum_in_fp32.eager(*outs))


# ---------------------------------------------------------------- gradient-accumulation GEMM

@pytest.mark.skipif(torch.cuda.is_available(), reason="the case of a machine without a GPU")
def test_gradient_accumulation_fusion_is_switched_off_where_its_gemm_cannot_run():
    from types import SimpleNamespace

    from megatron_patch import patches

    # This machine has neither Apex nor a GPU: the manifest leaves the GEMM out and settle_args says so.
    args = SimpleNamespace(gradient_accumulation_fusion=True, apply_rope_fusion=False, plain_kernels=False,
                           bias_swiglu_fusion=False, optimizer="adam")
    assert "gradient-accumulation-gemm" not in [p.name for p in patches.wanted(args, "cpu")]
    changes = patches.settle_args(args)
    # Megatron's ColumnParallelLinear would refuse to build with the flag on and no GEMM for it.
    assert args.gradient_accumulation_fusion is False
    assert changes == ["--gradient-accumulation-fusion off: Apex's GEMM is absent and ours needs a GPU and "
                       "torch >= 2.8"]


# ---------------------------------------------------------------- SwiGLU backward (Triton)

def _swiglu_reference_grad(grad_output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Autograd of silu(y1) * y2 in float64."""
    y64 = y.double().requires_grad_()
    gate, up = y64.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad_output.double())
    return y64.grad


def _run_in_triton_interpreter(script: str) -> str:
    """Runs `script` in a fresh interpreter with Triton's interpreter on (it must be switched on before triton is
    imported; it runs the kernels themselves on the CPU) from the repository root; returns its stdout."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # The script imports this file's helpers (tests/unit) and the package (the repository root).
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="1",
                                     PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests", "unit")])),
                            cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_swiglu_backward_kernel_matches_autograd_in_triton_interpreter():
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from test_fused_kernels import _swiglu_reference_grad
        from megatron_patch.fused.swiglu import BLOCK, swiglu_backward
        torch.manual_seed(0)
        half = BLOCK + 76  # one full column block and a masked tail
        y, grad = torch.randn(3, 2 * half) * 3, torch.randn(3, half)
        got = swiglu_backward(grad, y)
        want = _swiglu_reference_grad(grad, y)
        assert got.dtype == y.dtype and got.shape == y.shape
        print("max_abs_diff", (got.double() - want).abs().max().item())
    """)
    stdout = _run_in_triton_interpreter(script)
    difference = float(stdout.split("max_abs_diff")[-1])
    assert difference < 1e-4, f"kernel differs from autograd by {difference}"


def test_swiglu_backward_rejects_mismatched_shapes():
    pytest.importorskip("triton")
    from megatron_patch.fused.swiglu import swiglu_backward

    with pytest.raises(ValueError, match=r"grad_output \[tokens, n\] and y \[tokens, 2n\] expected, got \(4, 6\)"):
        swiglu_backward(torch.zeros(4, 6), torch.zeros(4, 10))


def test_cross_entropy_kernels_match_torch_in_triton_interpreter():
    # The CUDA path's logsumexp and logit-gradient kernels, run by Triton's interpreter on the CPU, against the
    # eager maths: two column blocks with a masked tail, tokens outside the vocabulary shard, masked tokens.
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from megatron_patch.fused import linear_cross_entropy as lce
        torch.manual_seed(0)
        rows, vocab = 5, lce.VOCAB_BLOCK + 37
        logits = (torch.randn(rows, vocab) * 4).to(torch.bfloat16)
        target = torch.randint(0, vocab, (rows,))
        target[3] = vocab - 1  # in the masked tail's block
        in_shard = torch.tensor([True, True, False, True, True])
        weight = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.0])
        lse = lce._logsumexp_triton(logits)
        want_lse = torch.logsumexp(logits.float(), dim=-1)
        want_grad = lce.logit_grad(logits, want_lse, target, in_shard, weight)  # eager on the CPU
        grad = lce._logit_grad_triton_(logits.clone(), lse, target, in_shard, weight)
        assert grad.dtype == torch.bfloat16 and grad.shape == logits.shape
        print("lse", (lse - want_lse).abs().max().item())
        print("grad", (grad.float() - want_grad.float()).abs().max().item())
        print("onehot", grad[0, target[0]].item(), grad[2, target[2]].item() >= 0)
    """)
    stdout = _run_in_triton_interpreter(script)
    report = dict(line.split(" ", 1) for line in stdout.strip().splitlines())
    assert float(report["lse"]) < 1e-5, report
    assert float(report["grad"]) <= 2 ** -8, report  # one bf16 rounding of values below 1
    onehot_grad, outside_shard_nonnegative = report["onehot"].split()
    assert float(onehot_grad) < 0 and outside_shard_nonnegative == "True", report


# ---------------------------------------------------------------- multi-tensor optimizer step

def test_multi_tensor_norm_and_scale_match_per_tensor_maths():
    from megatron_patch.fused import optimizer_step

    torch.manual_seed(4)
    grads = [torch.randn(shape) for shape in [(64, 32), (32,), (7, 5, 3), (1,)]]
    norm, _ = optimizer_step.multi_tensor_l2_norm(65536, None, [grads], False)
    assert norm.shape == (1,) and norm.dtype == torch.float32
    _close(norm, torch.cat([g.flatten() for g in grads]).norm().reshape(1), 1e-6, 1e-6, "total norm")

    scaled = [g.clone() for g in grads]
    optimizer_step.multi_tensor_scale(65536, None, [scaled, scaled], 0.25)  # in place: clipping
    for got, g in zip(scaled, grads):
        assert torch.equal(got, g * 0.25)
    bf16 = [torch.empty_like(g, dtype=torch.bfloat16) for g in grads]
    optimizer_step.multi_tensor_scale(65536, None, [grads, bf16], 1.0)  # fp32 main params -> bf16 model params
    for got, g in zip(bf16, grads):
        assert torch.equal(got, g.bfloat16())


def test_gradient_buffer_scaling_matches_megatron_cores(monkeypatch):
    """megatron-core's scale_gradients is `grad_data *= factor` (and each extra main grad): the same products."""
    from types import SimpleNamespace

    from megatron_patch.fused import optimizer_step

    monkeypatch.setattr(optimizer_step, "_SCALE_VIEW_ELEMENTS", 7)  # several views, the last one short
    torch.manual_seed(5)
    grad_data, extra = torch.randn(50), torch.randn(3, 4)
    for factor in (torch.tensor(1 / 37.0), 0.125):
        buffer = SimpleNamespace(grad_data=grad_data.clone(), extra_main_grads=[extra.clone()])
        optimizer_step.scale_gradient_buffer(buffer, factor)
        assert torch.equal(buffer.grad_data, grad_data * factor)
        assert torch.equal(buffer.extra_main_grads[0], extra * factor)


def test_optimizer_patches_make_megatron_build_fused_adamw(monkeypatch):
    from types import SimpleNamespace

    from megatron.core import optimizer as mcore_optimizer
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from megatron_patch import patches
    from megatron_patch.fused import optimizer_step

    for module, name in [(clip_grads, "l2_norm_impl"), (clip_grads, "multi_tensor_scale_impl"),
                         (mcore_optimizer.optimizer, "multi_tensor_scale_impl"),
                         (mcore_optimizer, "USING_PYTORCH_OPTIMIZER"), (mcore_optimizer, "Adam")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    assert clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm  # this venv has neither Apex nor TE

    def optimizer_patches(plain_kernels: bool) -> list:
        args = SimpleNamespace(plain_kernels=plain_kernels, optimizer="adam", gradient_accumulation_fusion=False,
                               bias_swiglu_fusion=False)
        return [p for p in patches.wanted(args, "cpu") if p.name in ("multi-tensor-optimizer-maths", "fused-adamw")]

    assert optimizer_patches(plain_kernels=True) == []
    chosen = optimizer_patches(plain_kernels=False)
    assert [p.name for p in chosen] == ["multi-tensor-optimizer-maths", "fused-adamw"]
    for patch in chosen:
        patch.install()  # not through patches.apply: monkeypatch undoes these installs after the test
    assert clip_grads.l2_norm_impl is optimizer_step.multi_tensor_l2_norm
    assert mcore_optimizer.optimizer.multi_tensor_scale_impl is optimizer_step.multi_tensor_scale
    # megatron-core's own builder, called the way it calls Apex's FusedAdam.
    weight = torch.nn.Parameter(torch.randn(4, 4))
    built = mcore_optimizer.Adam(params=[weight], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                                 capturable=False, adam_w_mode=True)
    assert isinstance(built, torch.optim.AdamW) and built.param_groups[0]["fused"] is True
    reference = torch.optim.AdamW([torch.nn.Parameter(weight.detach().clone())], lr=1e-3, weight_decay=0.1,
                                  betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for opt in (built, reference):
        opt.param_groups[0]["params"][0].grad = torch.ones(4, 4)
        opt.step()
    _close(weight.detach(), reference.param_groups[0]["params"][0].detach(), 1e-6, 1e-6, "fused AdamW step")


# ---------------------------------------------------------------- on a GPU (make test-gpu; skipped without one)

@pytest.mark.gpu
def test_gradient_accumulation_gemm_adds_into_fp32_main_grad():
    from megatron_patch.fused import grad_accumulation

    assert grad_accumulation.supported_here()
    torch.manual_seed(3)
    main_grad = torch.randn(96, 64, device="cuda")
    expected = main_grad.clone()
    for _ in range(3):  # three micro-batches accumulate
        total_input = torch.randn(200, 64, device="cuda", dtype=torch.bfloat16)
        grad_output = torch.randn(200, 96, device="cuda", dtype=torch.bfloat16)
        expected += grad_output.float().t() @ total_input.float()
        grad_accumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    _close(main_grad, expected, 1e-4, 1e-3, "accumulated weight gradient")


@pytest.mark.gpu
def test_compiled_kernels_on_cuda_match_the_fp32_reference():
    # The compiled bf16 kernels round once where eager bf16 rounds at every step: compare both with fp32.
    t, freqs = _rope_inputs(torch.bfloat16)
    t_gpu = t.cuda().requires_grad_()
    t_ref = t.float().requires_grad_()
    got, expected = fused_apply_rotary_pos_emb(t_gpu, freqs.cuda()), fused_apply_rotary_pos_emb(t_ref, freqs)
    _close(got.cpu(), expected, 2e-2, 2e-2, "rope")
    upstream = torch.randn_like(expected)
    got.backward(upstream.to(got))
    expected.backward(upstream)
    _close(t_gpu.grad.cpu(), t_ref.grad, 2e-2, 2e-2, "rope backward")
    x, w = torch.randn(4, 3, 32, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16)
    _close(rms_norm(x.cuda(), w.cuda(), 1e-6).cpu(), rms_norm.eager(x.float(), w.float(), 1e-6), 2e-2, 2e-2,
           "rms_norm")
    hidden, weight, labels, mask = _ce_inputs(torch.bfloat16)
    h_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_()
    expected = _plain_loss(h_ref, w_ref, labels, mask)
    expected.backward()
    h, w = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_()
    got = lce.linear_cross_entropy(h, w, labels.cuda(), mask.cuda(), chunk_tokens=5)
    got.backward()
    _close(got.cpu(), expected, 2e-2, 2e-2, "linear + cross-entropy loss")
    # bf16 gradients of the logits, as in the plain path: compare whole tensors with fp32 autograd. The weight
    # gradient's eight chunks accumulate in fp32 inside the GEMM.
    for name, ours, want in [("hidden", h.grad, h_ref.grad), ("weight", w.grad, w_ref.grad)]:
        relative_error = ((ours.cpu().float() - want).norm() / want.norm()).item()
        assert relative_error < 1e-2, f"{name} gradient: relative error {relative_error:.3g} against fp32"


@pytest.mark.gpu
def test_qkv_split_rope_kernel_on_cuda_matches_the_fp32_split_path():
    # Qwen2.5-7B's grouping at a real head size, bf16 on the GPU against megatron-core's split path in fp32.
    mixed, freqs, sizes = _qkv_inputs(64, 2, 4, 7, 128, torch.bfloat16)
    assert rope.qkv_kernel_takes(mixed.cuda(), freqs.cuda(), freqs.cuda(), sizes) is False  # two tables
    gpu_freqs = freqs.cuda()
    assert rope.qkv_kernel_takes(mixed.cuda(), gpu_freqs, gpu_freqs, sizes)
    ours_in, ref_in = mixed.cuda().requires_grad_(), mixed.float().requires_grad_()
    got = rope.fused_qkv_split_rope(ours_in, gpu_freqs, gpu_freqs, sizes)
    want = _megatron_split_path(ref_in, freqs, sizes)
    upstream = [torch.randn_like(w) for w in want]
    torch.autograd.backward(got, [u.cuda().to(torch.bfloat16) for u in upstream])
    torch.autograd.backward(want, upstream)
    for name, g, w in zip("qkv", got, want):
        _close(g.cpu(), w, 2e-2, 2e-2, name)
    _close(ours_in.grad.cpu(), ref_in.grad, 2e-2, 2e-2, "projection gradient")


@pytest.mark.gpu
def test_swiglu_function_backward_takes_the_kernel_and_matches_float64_autograd():
    from megatron.core.fusions.fused_bias_swiglu import SwiGLUFunction, bias_swiglu_impl

    from megatron_patch.fused import swiglu
    from megatron_patch.fused.compile import triton_kernels_run_here

    assert triton_kernels_run_here()
    swiglu.install()
    assert SwiGLUFunction.backward is not swiglu._megatron_backward
    torch.manual_seed(4)
    y = (torch.randn(2, 300, 2 * 1400, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(2, 300, 1400, device="cuda", dtype=torch.bfloat16)
    bias_swiglu_impl(y, None).backward(grad)  # megatron-core's MLP call: [s, b, 2n] viewed as [s * b, 2n]
    want = _swiglu_reference_grad(grad.reshape(600, 1400), y.detach().reshape(600, 2 * 1400))
    _close(y.grad.reshape(600, -1).double(), want, 1e-2, 1e-2, "SwiGLU input gradient")
