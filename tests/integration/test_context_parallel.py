"""Context parallelism without Transformer Engine (megatron_patch/context_parallel.py).

Fast: the chunk maths against full causal attention with every CP rank simulated in one process, the collectives
in two/four gloo processes. End to end: the real entrypoint at CP2/CP4 (with TP2, PP2, the distributed optimizer
and activation recomputation) against one process per replica, from random weights and from a checkpoint; every
CP rank's parameters hashed at every iteration; a CP2 checkpoint resumed at CP1.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.context_parallel import (
    SimulatedExchange,
    buffer_order,
    buffer_to_sequence,
    causal_chunks_backward,
    causal_chunks_forward,
    chunk_ids,
    context_parallel_attention,
    earlier_chunks,
    packed_attention_mask_rows,
    sequence_to_buffer,
)


def rank_rows(cp_rank: int, cp_size: int, seq: int) -> torch.Tensor:
    """Sequence positions of this rank's tokens, as megatron-core's get_batch_on_this_cp_rank slices them."""
    chunk = seq // (2 * cp_size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunk_ids(cp_rank, cp_size)])


def problem(seq=48, batch=2, heads=4, groups=2, head_dim=8, device="cpu", dtype=torch.float32, seed=0):
    """Random q [s, b, h, d], k/v [s, b, g, d], and an output weighting for a non-trivial loss."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    return (make(seq, batch, heads, head_dim), make(seq, batch, groups, head_dim),
            make(seq, batch, groups, head_dim), make(seq, batch, heads * head_dim))


def full_attention(q, k, v, weight, forbidden=None, scale=0.3):
    """Reference: one SDPA over the whole sequence in fp32; output [s, b, h*d] and dQ, dK, dV."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), scale=scale, enable_gqa=True,
                                         is_causal=forbidden is None,
                                         attn_mask=None if forbidden is None else ~forbidden)
    out = out.permute(2, 0, 1, 3).flatten(2)
    return (out.detach(), *torch.autograd.grad((out * weight.float()).sum(), (q, k, v)))


def simulated_ranks(q, k, v, weight, cp_size, scale, kernel=None):
    """Every CP rank's causal_chunks_forward/backward in turn, each with the whole sequence's K/V as its gather
    would bring them: the output and dQ in sequence order, and dK/dV summed over the ranks as the reduce-scatter
    sums them (the ranks' own-chunk gradients plus their shares of the gathered keys')."""
    key_value = torch.stack([k, v], dim=2)
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2] * q.shape[3], dtype=q.dtype, device=q.device)
    grad_query = torch.empty_like(q)
    grad_key_value = torch.zeros(key_value.shape, dtype=torch.float32, device=q.device)
    for rank in range(cp_size):
        rows = rank_rows(rank, cp_size, q.shape[0]).to(q.device)
        exchange = SimulatedExchange(key_value, cp_size)
        out[rows], saved = causal_chunks_forward(q[rows], key_value[rows], exchange, rank, cp_size, scale, kernel)
        grad_query[rows], grad_own = causal_chunks_backward(weight[rows], q[rows], key_value[rows], exchange, rank,
                                                            cp_size, scale, saved)
        grad_key_value[rows] += grad_own
        grad_key_value += buffer_to_sequence(exchange.buffer_grad, cp_size)
    return out, grad_query, grad_key_value[:, :, 0], grad_key_value[:, :, 1]


@pytest.mark.parametrize("cp_size", [2, 4])
def test_simulated_ranks_match_full_causal_attention(cp_size):
    """Every rank's share of the work (its own chunks' blocks from local keys, the rest from the gathered
    buffer) adds up to full causal attention: outputs and dQ row by row, dK/dV as the sum over ranks."""
    q, k, v, weight = problem()
    for what, got, want in zip(("out", "dq", "dk", "dv"), simulated_ranks(q, k, v, weight, cp_size, 0.3),
                               full_attention(q, k, v, weight)):
        torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def test_the_backward_keeps_no_second_copy_of_the_output():
    """What the forward saves of each chunk's output lies in the layer's output itself (at 7B/32k a second copy
    would hold 117 MB per layer and micro-batch)."""
    q, k, v, _ = problem()
    key_value = torch.stack([k, v], dim=2)
    rows = rank_rows(1, 2, q.shape[0])
    out, (_, outs, _, _) = causal_chunks_forward(q[rows], key_value[rows], SimulatedExchange(key_value, 2), 1, 2, 0.3)
    for position, saved in enumerate(outs):
        assert saved.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
        chunk = out[position * 12:(position + 1) * 12].view(12, 2, 4, 8)
        assert torch.equal(saved, chunk.permute(1, 2, 0, 3))


def test_the_gathered_buffer_holds_each_query_chunks_earlier_keys_in_one_range():
    """Buffer order for CP4: ranks' second chunks (7, 6, 5, 4), then their first (0, 1, 2, 3); every chunk's
    earlier chunks are one slice of it."""
    cp_size, chunk_len = 4, 3
    assert buffer_order(cp_size) == [7, 6, 5, 4, 0, 1, 2, 3]
    held = torch.tensor(buffer_order(cp_size)).repeat_interleave(chunk_len)  # each row's sequence chunk
    assert earlier_chunks(0, chunk_len, cp_size) is None
    for chunk in range(1, 2 * cp_size):
        assert sorted(held[earlier_chunks(chunk, chunk_len, cp_size)].unique().tolist()) == list(range(chunk))
    assert buffer_to_sequence(torch.arange(24).view(8, 3)[buffer_order(cp_size)].flatten(), cp_size).tolist() == \
        list(range(24))


def test_a_block_kernel_that_strays_from_the_reference_is_refused():
    """The fused kernels are chosen by checking them against the fp32 reference first: a wrong log-sum-exp
    (which the merged output hides, the backward does not) or a kernel that raises is named, not used."""
    from megatron_patch.context_parallel import ReferenceBlock, kernel_error

    class ShiftedLogSumExp(ReferenceBlock):
        @classmethod
        def forward(cls, q, k, v, causal, scale):
            out, lse, state = super().forward(q, k, v, causal, scale)
            return out, lse + 0.5, state

    class Raises(ReferenceBlock):
        @classmethod
        def forward(cls, *args):
            raise RuntimeError("no kernel for this layout")

    assert kernel_error(ReferenceBlock, "cpu", torch.float32, 4, 2) is None
    assert kernel_error(ShiftedLogSumExp, "cpu", torch.float32, 4, 2).startswith("dQ differs from the fp32 reference")
    assert kernel_error(Raises, "cpu", torch.float32, 4, 2) == "RuntimeError: no kernel for this layout"


def test_the_gathered_buffer_round_trip_puts_chunks_in_sequence_order():
    cp_size, seq = 4, 16
    held = torch.cat([rank_rows(r, cp_size, seq) for r in range(cp_size)])  # each rank's tokens, rank after rank
    assert held.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    per_rank = held.view(cp_size, 2, seq // (2 * cp_size))
    gathered = torch.cat([per_rank[:, 1].flatten(), per_rank[:, 0].flatten()])  # the two all-gathers' halves
    assert torch.equal(sequence_to_buffer(torch.arange(seq), cp_size), gathered)
    assert buffer_to_sequence(gathered, cp_size).tolist() == list(range(seq))


def test_packed_mask_rows_are_the_block_masks_rows():
    from megatron_patch.data.providers import packed_attention_mask

    segments = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    full = packed_attention_mask(segments)
    for rank in range(2):
        assert torch.equal(packed_attention_mask_rows(segments, rank, 2), full[:, :, rank_rows(rank, 2, 16)])


def _ranks_against_full_attention(rank: int, world: int, port: int, device: str) -> None:
    """One process of the collective test: CP over all processes, causal and packed."""
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dtype, tol = (torch.bfloat16, 2e-2) if device == "cuda" else (torch.float32, 1e-5)
    segments = torch.tensor([[0] * 13 + [1] * 20 + [2] * 15, [0] * 30 + [1] * 18])
    group = dist.group.WORLD
    cp_rank, cp_size = group.rank(), group.size()
    for packed in (False, True):
        q, k, v, weight = problem(device=device, dtype=dtype)
        forbidden = packed_attention_mask_rows(segments, 0, 1).to(device) if packed else None
        out_ref, *grads_ref = full_attention(q, k, v, weight, forbidden)
        rows = rank_rows(cp_rank, cp_size, q.shape[0]).to(device)
        local = [t[rows].clone().requires_grad_() for t in (q, k, v)]
        out = context_parallel_attention(
            *local, packed_attention_mask_rows(segments, cp_rank, cp_size).to(device) if packed else None,
            group, 0.3)
        (out.float() * weight[rows].float()).sum().backward()
        for what, got, want in [("out", out, out_ref)] + list(zip(("dq", "dk", "dv"), local, grads_ref)):
            got = got if what == "out" else got.grad
            error = ((got.float() - want[rows]).norm() / want[rows].norm()).item()
            assert error < tol, f"CP{cp_size} rank {cp_rank} packed={packed}: {what} relative error {error}"
    dist.destroy_process_group()


def test_gloo_ranks_match_full_attention_causal_and_packed():
    """Two gloo processes at CP2 (the collectives and the autograd around them; CP4's chunk maths above),
    against one SDPA over the sequence."""
    import torch.multiprocessing as mp

    from training_utils import free_port

    mp.spawn(_ranks_against_full_attention, args=(2, free_port(), "cpu"), nprocs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_block_kernels_simulated_ranks_match_fp32_attention(dtype):
    """On one GPU: the cuDNN/flash block kernels, merged by log-sum-exp, against fp32 full causal attention."""
    from megatron_patch import context_parallel

    q, k, v, weight = problem(seq=1024, batch=2, heads=12, groups=2, head_dim=128, device="cuda")
    reference = full_attention(q, k, v, weight, scale=128 ** -0.5)
    q, k, v, weight = (t.to(dtype) for t in (q, k, v, weight))
    for kernel in (context_parallel.CudnnBlock, context_parallel.FlashBlock):
        got = simulated_ranks(q, k, v, weight, 2, 128 ** -0.5, kernel)
        for what, mine, want in zip(("out", "dq", "dk", "dv"), got, reference):
            error = ((mine.float() - want).norm() / want.norm()).item()
            assert error < 1e-2, f"{kernel.__name__}: {what} relative error {error}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_nccl_ranks_match_full_attention_causal_and_packed():
    import torch.multiprocessing as mp

    from training_utils import free_port

    mp.spawn(_ranks_against_full_attention, args=(2, free_port(), "cuda"), nprocs=2)


# ---- End to end: the real entrypoint, iterations 1 and 2 of conftest.layout_runs' schedule. From random weights
# (PRETRAIN_CHECKPOINT_PATH=none) against CP1 or TP2 from random weights; from the converted tiny checkpoint against
# layout_runs' "tp1" (one process, the same flags). Every CP run also checks its replicas at every iteration.
TWO_ITERATIONS = ["--exit-interval", "2"]
CHECK_REPLICAS = ["--check-weight-hash-across-dp-replicas-interval", "1"]
FROM_CHECKPOINT = "tp1"  # the reference of runs that start from the converted checkpoint
CP_LAYOUTS = {
    # name: (processes, flags, reference)
    "cp2": (2, ["--context-parallel-size", "2", "--save-interval", "1"], "cp1"),
    "cp4": (4, ["--context-parallel-size", "4"], "cp1"),
    "cp2_tp2_ac_sel": (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                           "--recompute-activations"], "tp2"),
    "cp2_pp2_do_ac_full": (4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                               "--use-distributed-optimizer", "--recompute-granularity", "full",
                               "--recompute-method", "uniform", "--recompute-num-layers", "1"], FROM_CHECKPOINT),
}
# One-process-per-model-replica references from random weights (seeds depend on the PP and TP ranks only).
REFERENCES = {"cp1": (1, []), "tp2": (2, ["--tensor-model-parallel-size", "2"])}


@pytest.fixture(scope="module")
def cp_runs(converted_tiny, layout_runs, tmp_path_factory) -> dict[str, dict]:
    """{name: {losses, grad_norms, digests}} for CP_LAYOUTS, REFERENCES, "tp1" (layout_runs) and "cp1_from_cp2"
    (CP2's iteration-1 checkpoint resumed at CP1 for iteration 2). digests: the folder of the run's replica
    hashes (--replica-digests-dir)."""
    from concurrent.futures import ThreadPoolExecutor

    from training_utils import LAYOUT_ITERS, run_entrypoint, tensorboard_losses, tiny_mock_args

    cp2_checkpoint = tmp_path_factory.mktemp("cp2_checkpoint")

    def train(name: str, nproc: int, flags: list[str]) -> dict[str, dict]:
        work = tmp_path_factory.mktemp(name)
        run_entrypoint(work, nproc, tiny_mock_args(iters=LAYOUT_ITERS) + TWO_ITERATIONS + flags
                       + ["--replica-digests-dir", str(work / "digests")])
        done = {name: dict(losses=tensorboard_losses(work), grad_norms=tensorboard_losses(work, "grad-norm"),
                           digests=work / "digests")}
        if name == "cp2":  # its checkpoint resumed at CP1, in the same worker
            done.update(train("cp1_from_cp2", 1, ["--load", str(cp2_checkpoint), "--ckpt-step", "1"]))
        return done

    runs = {name: (nproc, flags) for name, (nproc, flags) in REFERENCES.items()}
    for name, (nproc, flags, reference) in CP_LAYOUTS.items():
        weights = ["--pretrained-checkpoint", str(converted_tiny)] if reference == FROM_CHECKPOINT else []
        saves = ["--save", str(cp2_checkpoint)] if name == "cp2" else []
        runs[name] = (nproc, flags + weights + saves + CHECK_REPLICAS)
    # Two at a time: much of a launch is single-threaded interpreter start-up.
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {name: run for result in pool.map(lambda item: train(item[0], *item[1]), runs.items())
                for name, run in result.items()}
    tp1 = layout_runs["tp1"]
    done["tp1"] = dict(losses=tp1["losses"], grad_norms=tensorboard_losses(tp1["work"], "grad-norm"))
    return done


def _reference(layout: str) -> str:
    return CP_LAYOUTS[layout][2]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("layout", list(CP_LAYOUTS))
def test_context_parallel_matches_one_process(cp_runs, layout):
    """Same losses and gradient norms at iterations 1 and 2 as one process per replica (fp32): from random
    weights every CP size builds CP1's weights, and the attention, RoPE, the loss's token count, the gradients'
    reduction and the optimizer step are all right under CP (with TP, PP, DO, AC)."""
    got, want = cp_runs[layout], cp_runs[_reference(layout)]
    for what in ("losses", "grad_norms"):
        for iteration in (1, 2):
            assert math.isfinite(got[what][iteration]), (layout, got)
            assert abs(got[what][iteration] - want[what][iteration]) <= 1e-5, (layout, what, iteration, got, want)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("layout", list(CP_LAYOUTS))
def test_context_parallel_ranks_hold_bit_identical_replicas(cp_runs, layout):
    """Each rank's own SHA-1 of every parameter (read back from its --replica-digests-dir file), at
    initialization and after iterations 1 and 2: the ranks of one CP group hold bit-identical replicas."""
    cp_size = int(CP_LAYOUTS[layout][1][CP_LAYOUTS[layout][1].index("--context-parallel-size") + 1])
    groups: dict[tuple, dict[int, dict[str, str]]] = {}  # (check, tp, pp, dp) -> {cp rank: digests}
    for path in sorted(cp_runs[layout]["digests"].glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            groups.setdefault((record["check"], record["tp"], record["pp"], record["dp"]), {})[record["cp"]] = \
                record["digests"]
    assert {key[0] for key in groups} == {0, 1, 2}, sorted(groups)
    for key, by_cp_rank in groups.items():
        assert sorted(by_cp_rank) == list(range(cp_size)), (key, sorted(by_cp_rank))
        first = by_cp_rank[0]
        assert len(first) >= 8, first  # every parameter of this stage, not an empty dump
        for cp_rank, digests in by_cp_rank.items():
            differ = sorted(name for name in first if digests.get(name) != first[name])
            assert digests.keys() == first.keys() and not differ, (layout, key, cp_rank, differ)


@pytest.mark.timeout(1800)
def test_cp2_checkpoint_resumes_at_cp1(cp_runs):
    """CP2's iteration-1 checkpoint (weights and optimizer) loaded at CP1 trains iteration 2 as CP2 itself and
    an uninterrupted single process did."""
    resumed = cp_runs["cp1_from_cp2"]["losses"]
    assert sorted(resumed) == [2], resumed
    assert abs(resumed[2] - cp_runs["cp2"]["losses"][2]) <= 1e-5, cp_runs
    assert abs(resumed[2] - cp_runs["cp1"]["losses"][2]) <= 1e-5, cp_runs


def _replica_check_in_a_cp_group(rank: int, world: int, port: int) -> None:
    """One of two gloo processes at CP2 (megatron-core's groups): rank 1's second parameter drifts."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_patch.patches import replica_check

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    model = [torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))]
    torch.manual_seed(0)
    for param in model[0].parameters():
        param.data.copy_(torch.randn_like(param))
    assert replica_check.check_param_hashes_across_replicas(model, cross_check=True)
    if rank == 1:
        model[0][1].weight.data[0, 0] += 1e-6
    assert not replica_check.check_param_hashes_across_replicas(model, cross_check=True)
    dist.destroy_process_group()


def test_the_replica_check_compares_context_parallel_ranks(capfd):
    """megatron's weight-hash check, as patched, gathers over data x context parallel: a parameter one CP rank
    holds differently fails it on both ranks, named (megatron-core's own check sees no difference here: its
    data-parallel group at CP2 is each rank alone)."""
    import megatron.core.parallel_state  # noqa: F401  (imported once, here: the ranks are forked)
    import torch.multiprocessing as mp

    from training_utils import free_port

    mp.start_processes(_replica_check_in_a_cp_group, args=(2, free_port()), nprocs=2, start_method="fork")
    assert capfd.readouterr().err.count("1 parameter(s) differ from their replicas on other data- or "
                                        "context-parallel ranks: 1.weight") == 2
