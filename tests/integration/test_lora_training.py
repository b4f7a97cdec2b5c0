"""LoRA/DoRA training through the real entrypoint on the CPU, from the converted tiny checkpoint (fp32): other
layouts give one process's losses, a LoRA checkpoint holds the adapters and their optimizer state only and
resumes exactly under another TP after a kill in the middle of its save, and the base is never written.

The TP collectives between A and B (sequence parallelism too, which only TE's spec on a GPU trains with) are
also checked alone in two gloo processes against one.

DoRA at TP2 (its magnitudes, and the weight norms summed over TP for the row-parallel layers) saves every
iteration and is killed (MP_FAULT_INJECT) while writing the tracker of iteration 3, which loses its TensorBoard
events: it is checked through its relaunch at TP1 from iteration 2, whose iteration 3 must be one uninterrupted
process's.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from megatron_patch.lora.targets import LoraSettings
from training_utils import LAYOUT_ITERS, run_entrypoint, starting_weights, tensorboard_losses, tiny_mock_args

pytestmark = pytest.mark.timeout(1200)

LORA = ["--lora-rank", "8", "--lora-alpha", "16"]
DORA = LORA + ["--lora-method", "dora"]
SAVE_EVERY_ITERATION = ["--save-interval", "1"]
RUNS = {
    # name: (processes, flags, environment)
    "lora_tp1": (1, LORA + SAVE_EVERY_ITERATION, {}),
    "lora_tp2": (2, LORA + ["--tensor-model-parallel-size", "2"], {}),
    "lora_pp2": (2, LORA + ["--pipeline-model-parallel-size", "2"], {}),
    "lora_cp2_do": (2, LORA + ["--context-parallel-size", "2", "--use-distributed-optimizer"], {}),
    "dora_tp1": (1, DORA, {}),
    "dora_tp2_killed": (2, DORA + ["--tensor-model-parallel-size", "2"] + SAVE_EVERY_ITERATION,
                        {"MP_FAULT_INJECT": f"tracker-write:{LAYOUT_ITERS}"}),
    # lora_tp2 over the Hugging Face folder the converted base came from (the model provider reads it itself)
    "lora_tp2_hf_base": (2, LORA + ["--tensor-model-parallel-size", "2", "--save-interval", str(LAYOUT_ITERS)], {}),
}
HF_BASE_RUNS = {"lora_tp2_hf_base"}


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lora_runs(converted_tiny, tiny_hf_checkpoint, tmp_path_factory) -> dict[str, dict]:
    """{name: {work, ckpt, losses, grad_norms, log, returncode}} for RUNS and "dora_tp1_resumed" (the killed TP2
    run's folder relaunched at TP1), plus "base_digests": the base checkpoint's files before and after."""
    before = file_digests(converted_tiny)

    def train(name: str, nproc: int, flags: list[str], env: dict, load: Path | None = None) -> dict:
        work = tmp_path_factory.mktemp(name)
        ckpt = load or work / "ckpt"
        saves = ["--save", str(ckpt), "--load", str(ckpt)] if "--save-interval" in flags or load else []
        base = starting_weights(tiny_hf_checkpoint if name in HF_BASE_RUNS else converted_tiny)
        args = tiny_mock_args(iters=LAYOUT_ITERS) + base + saves + flags
        proc = run_entrypoint(work, nproc, args, check=not env, env=env)
        return dict(work=work, ckpt=ckpt, losses=tensorboard_losses(work), log=proc.stdout + proc.stderr,
                    grad_norms=tensorboard_losses(work, "grad-norm"), returncode=proc.returncode)

    def run(name: str) -> dict[str, dict]:
        done = {name: train(name, *RUNS[name])}
        if name == "dora_tp2_killed":
            done[name]["tracker_after_kill"] = (done[name]["ckpt"] / "latest_checkpointed_iteration.txt").read_text()
            done["dora_tp1_resumed"] = train("dora_tp1_resumed", 1, DORA + SAVE_EVERY_ITERATION, {},
                                             load=done[name]["ckpt"])
        return done

    # Two at a time: much of a launch is single-threaded interpreter start-up.
    with ThreadPoolExecutor(max_workers=2) as pool:  # the killed run and its relaunch first: the longest chain
        runs = {name: result for done in pool.map(run, sorted(RUNS, key=lambda n: n != "dora_tp2_killed"))
                for name, result in done.items()}
    runs["base_digests"] = dict(before=before, after=file_digests(converted_tiny))
    return runs


@pytest.mark.parametrize("layout", ["lora_tp2", "lora_pp2", "lora_cp2_do"])
def test_other_layouts_give_one_processs_losses(lora_runs, layout):
    """Every iteration's loss and gradient norm as one process (fp32): iteration 1's gradients are the adapters'
    (B's; A's are zero while B is), later losses follow the adapters' updates."""
    got, want = lora_runs[layout], lora_runs["lora_tp1"]
    assert sorted(got["losses"]) == list(range(1, LAYOUT_ITERS + 1)), got["losses"]
    for it in got["losses"]:
        assert math.isfinite(got["losses"][it])
        assert abs(got["losses"][it] - want["losses"][it]) <= 1e-5, (layout, it, got["losses"], want["losses"])
        assert abs(got["grad_norms"][it] - want["grad_norms"][it]) <= 1e-5, (layout, it, got["grad_norms"],
                                                                             want["grad_norms"])
    assert want["losses"][LAYOUT_ITERS] < want["losses"][1], want["losses"]  # the adapters do train


def test_a_dora_checkpoint_killed_mid_save_resumes_exactly_at_another_tp(lora_runs):
    """The TP2 DoRA run died while writing the tracker for iteration 3 (its iter_0000003 written, the tracker still
    at 2); relaunched at TP1 it resumes from iteration 2 (adapters, magnitudes and optimizer state resharded) and
    trains iteration 3 exactly as the uninterrupted TP1 run did: the two TP2 iterations were TP1's too."""
    killed, resumed, reference = (lora_runs[n] for n in ("dora_tp2_killed", "dora_tp1_resumed", "dora_tp1"))
    assert killed["returncode"] != 0 and (killed["ckpt"] / "iter_0000003").is_dir()
    assert killed["tracker_after_kill"] == "2"
    assert re.search(rf"successfully loaded checkpoint from {re.escape(str(killed['ckpt']))} .*at iteration\s+2\b",
                     resumed["log"]), resumed["log"][-3000:]
    assert sorted(resumed["losses"]) == [3], resumed["losses"]
    for got, want in ((resumed["losses"], reference["losses"]), (resumed["grad_norms"], reference["grad_norms"])):
        assert abs(got[3] - want[3]) <= 1e-5, (got, want)


def test_a_lora_checkpoint_holds_the_adapters_and_their_optimizer_state_only(lora_runs, converted_tiny):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = lora_runs["lora_tp1"]["ckpt"] / f"iter_{LAYOUT_ITERS:07d}"
    tensors = [key for key, meta in FileSystemReader(str(folder)).read_metadata().state_dict_metadata.items()
               if isinstance(meta, TensorStorageMetadata)]
    # 4 adapted layers x (A, B), each with Adam's two moments; layers are stacked into one tensor per name.
    assert len(tensors) == 4 * 2 * 3 and all(".adapter.lora_" in key for key in tensors), tensors
    assert sum(p.stat().st_size for p in folder.rglob("*")) < 0.05 * sum(
        p.stat().st_size for p in converted_tiny.rglob("*"))


def test_the_base_checkpoint_is_never_written(lora_runs):
    digests = lora_runs["base_digests"]
    assert digests["before"] and digests["after"] == digests["before"]


def test_the_log_says_what_trains_as_peft_does(lora_runs):
    from megatron_patch.lora.targets import LoraSettings, adapter_parameter_count, trainable_parameters_line
    from megatron_patch.model_sizes import get_size

    size = get_size("tiny")
    trainable = adapter_parameter_count(LoraSettings(8, 16.0), size.num_layers, size.hidden_size,
                                        size.num_attention_heads, size.num_query_groups, size.ffn_hidden_size)
    line = trainable_parameters_line(trainable, size.parameter_count)
    assert line == "trainable params: 13,312 || all params: 9,811,520 || trainable%: 0.1357"
    for name in ("lora_tp1", "lora_pp2"):
        assert line in lora_runs[name]["log"]
    # megatron's own count of the one process's parameters: the base and the adapters; its gradient buffer (and so
    # the optimizer, which steps what the buffer holds) has the adapters alone
    log = lora_runs["lora_tp1"]["log"]
    assert "model parallel rank (0, 0, 0): 9811520" in log
    assert "Number of buckets for gradient all-reduce / reduce-scatter: 1" in log
    assert f"Params for bucket 1 ({trainable} elements," in log


def test_a_dora_run_exports_as_a_peft_adapter_with_our_models_logits(lora_runs, tiny_hf_checkpoint, tmp_path):
    """The DoRA checkpoint (trained at TP2, then TP1) as peft's use_dora adapter over the HF base: our model's
    logits. (DoRA's merge is peft's: tests/unit/test_lora_adapters.py; the merged export's path: LoRA's test.)"""
    from test_lora_export import LOGITS_TOLERANCE, export

    ckpt = lora_runs["dora_tp1_resumed"]["ckpt"]
    assert export(ckpt, tiny_hf_checkpoint, tmp_path / "adapter") <= LOGITS_TOLERANCE
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


def test_a_hugging_face_base_trains_and_merges_as_its_conversion_does(lora_runs, tiny_hf_checkpoint, tmp_path):
    """LoRA at TP2 over the HF folder itself (each rank reads its shards of the frozen base on every start) trains
    as over its conversion, every iteration to the bit; its checkpoint records the HF folder as its base, and the
    merged export reads the base from there: transformers on it gives our model's logits (base from the HF
    folder, adapters from the checkpoint)."""
    from test_lora_export import LOGITS_TOLERANCE, export

    over_hf, over_converted = lora_runs["lora_tp2_hf_base"], lora_runs["lora_tp2"]
    assert over_hf["losses"] == over_converted["losses"] and over_hf["grad_norms"] == over_converted["grad_norms"]
    assert f"the base weights come from {tiny_hf_checkpoint}" in over_hf["log"]
    assert export(over_hf["ckpt"], tiny_hf_checkpoint, tmp_path / "merged", "--merge-lora") <= LOGITS_TOLERANCE


# ---------------------------------------------------------------- the collectives alone, in two gloo processes

def _adapter_ranks_against_one_process(rank: int, port: int) -> None:
    """One of two gloo processes: each kind of base (column, row) with and without sequence parallelism, against
    the same adapter computed whole in one process (what TP1 computes)."""
    import torch.distributed as dist

    from megatron_patch.lora.adapters import COLUMN, ROW, Adapter

    # megatron-core's sequence-parallel collectives allocate on torch.cuda.current_device(), forward and backward
    torch.cuda.current_device = lambda: torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group, settings = dist.group.WORLD, LoraSettings(rank=4, alpha=8.0)
    seq, fan_in, fan_out = 6, 10, 8
    for kind in (COLUMN, ROW):
        for sequence_parallel in (False, True):
            torch.manual_seed(0)
            x, weight, probe = torch.randn(seq, 2, fan_in), torch.randn(fan_out, fan_in), torch.randn(seq, 2, fan_out)
            base = torch.randn(seq, 2, fan_out)  # the base layer's output, which the adapter's update is added to
            whole = Adapter(settings, kind, weight, None, False)
            whole.initialize(torch.Generator().manual_seed(1), weight)
            with torch.no_grad():
                whole.lora_B.normal_()
            x_whole = x.clone().requires_grad_()
            (whole(x_whole, base, weight, None) * probe).sum().backward()
            # This rank's part: column-parallel B rows (input whole, or its sequence chunk with SP); row-parallel
            # A columns and input columns (output whole, or its sequence chunk with SP).
            sequence = slice(rank * seq // 2, (rank + 1) * seq // 2) if sequence_parallel else slice(None)
            rows = slice(rank * fan_out // 2, (rank + 1) * fan_out // 2) if kind == COLUMN else slice(None)
            columns = slice(rank * fan_in // 2, (rank + 1) * fan_in // 2) if kind == ROW else slice(None)
            local_weight = weight[rows, columns]
            part = Adapter(settings, kind, local_weight, group, sequence_parallel)
            part.initialize(torch.Generator().manual_seed(1), local_weight)  # each rank keeps its part of A
            torch.testing.assert_close(part.lora_A, whole.lora_A[:, columns])
            with torch.no_grad():
                part.lora_B.copy_(whole.lora_B[rows])
            x_part = x[sequence if kind == COLUMN else slice(None), :, columns].clone().requires_grad_()
            out_sequence = sequence if kind == ROW else slice(None)
            output = part(x_part, base[out_sequence, :, rows], local_weight, None)
            (output * probe[out_sequence, :, rows]).sum().backward()
            for param in (part.lora_A, part.lora_B):  # what megatron's finalize_model_grads sums over TP
                if param.sequence_parallel:
                    dist.all_reduce(param.grad, group=group)
            case = f"{kind}, sequence parallel {sequence_parallel}"
            torch.testing.assert_close(part.lora_A.grad, whole.lora_A.grad[:, columns], msg=case)
            torch.testing.assert_close(part.lora_B.grad, whole.lora_B.grad[rows], msg=case)
            x_sequence = sequence if kind == COLUMN else slice(None)
            torch.testing.assert_close(x_part.grad, x_whole.grad[x_sequence, :, columns], msg=case)
            # DoRA's row norms (of a row-parallel weight: summed over TP)
            torch.testing.assert_close(part.weight_norm(local_weight), whole.weight_norm(weight)[rows], msg=case)
    dist.destroy_process_group()


def test_tensor_and_sequence_parallel_adapters_match_one_process():
    """The TP collectives between A and B, in two gloo processes: gradients of A, B and the input, DoRA's norms
    and the initial A of every rank's part as one process computes them whole. Sequence parallelism (TE's spec
    on a GPU only, so no CPU training run covers it) included."""
    import torch.multiprocessing as mp

    from training_utils import free_port

    mp.spawn(_adapter_ranks_against_one_process, args=(free_port(),), nprocs=2)
