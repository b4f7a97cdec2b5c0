"""Every change megatron_patch makes to torch's and megatron-core 0.19.2's behaviour, in one list.

Each `Patch` says what it changes (dotted names a test resolves against the installed packages), why (the upstream
bug or limitation), when it can go, and the tests that show it is still needed and still works
(tests/unit/test_patches.py checks that every named test exists, every target resolves and that megatron-core is
the release pinned here). `python -m megatron_patch.patches` prints the table. Every process of ours brings
Megatron up through megatron_patch.megatron_startup, which applies them in two calls around Megatron's argument
parsing:

    patches.prepare(device)             # before Megatron is imported and parses: process-wide and CPU entries
    args = parse_and_validate_args(...)
    patches.apply(args, device)         # everything else, then the argument changes

Why two: without a GPU, validate_args itself calls torch.cuda (get_device_properties, for TP or CP > 1), so the CPU
backend must be in place first; the other patches depend on the parsed arguments (--plain-kernels, the optimizer,
--gradient-accumulation-fusion). The CPU and PROCESS entries need nothing but the device. An entry with `remove`
holds only while Megatron's modules are imported (megatron_startup.importing_megatron ends it).

Kinds: PROCESS (how the process and its children live and die; every run), FIX (an upstream bug; every run), CPU
(the CPU backend; only without a GPU), FUSED (our faster kernels; none under --plain-kernels, which gives exactly
megatron-core's plain modules), RELIABILITY (checkpoint and error-message hardening; every run), LOGGING (what
megatron's log line lacks; every run), OPTION (a choice megatron-core has no flag for; only when its flag of ours
is given).

Arguments are changed in one place only, `settle_args`, after the patches: it returns (and `apply` prints) each
change with its reason (flags whose kernel is absent go off; --fused-single-qkv-rope goes on where ours fits).
The model's own module choices (SDPA attention, fused RMSNorm, the chunked linear + cross-entropy) are not
patches: megatron_patch/model.py and pretrain_qwen.forward_step pick them, by the same --plain-kernels switch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from megatron_patch import process_lifetime
from megatron_patch.fused import grad_accumulation, linear_bias, optimizer_step, rope, swiglu
from megatron_patch.fused.compile import triton_kernels_run_here
from megatron_patch.patches import cpu_backend, fp8_accumulation, megatron_fixes, replica_check

PROCESS, FIX, CPU, FUSED, RELIABILITY, LOGGING, OPTION = (
    "process", "fix", "cpu", "fused", "reliability", "logging", "option")
PINNED_MEGATRON_CORE = "0.19.2"  # the release every entry was written against (pyproject pins it too)
MEGATRON_CORE = f"megatron-core {PINNED_MEGATRON_CORE}"


@dataclass(frozen=True)
class Patch:
    name: str
    kind: str
    # What it replaces, by dotted name ({a,b} for several siblings; a note may follow in parentheses; "(a slot: ...)"
    # names a module attribute that exists only where an optional package fills it).
    changes: tuple[str, ...]
    why: str  # the upstream bug or limitation
    until: str  # when it can go
    tests: tuple[str, ...]  # "tests/<file>.py::<test>": still needed, still works
    install: Callable[[], None]
    applies: Callable[[object, str], bool] = lambda args, device: True  # (args, device) -> wanted here
    remove: Callable[[], None] | None = None  # set: the entry holds only while Megatron's modules are imported


def _rope_slot_empty(args, device) -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is None


MANIFEST: tuple[Patch, ...] = (
    # ---- the process (megatron_patch/process_lifetime.py)
    Patch(
        "children-die-with-parent", PROCESS,
        ("multiprocessing.process.BaseProcess.start",),
        f"{MEGATRON_CORE}'s torch_dist writer and the data loaders start helper processes that outlived a killed "
        "rank: they kept the launcher's output pipe open (a hang) and held ~0.9 GB each. Each child now dies with "
        "its parent and leaves stop signals to it.",
        "when multiprocessing children can be told to die with their parent (never in the standard library: keep)",
        ("tests/integration/test_faults.py::test_a_killed_process_ends_the_whole_run_and_keeps_its_checkpoint",),
        process_lifetime.children_die_with_this_process),

    # ---- the CPU backend (megatron_patch/patches/cpu_backend.py); the first one must come first
    Patch(
        "cpu-eager-fusions-at-import", CPU,
        ("torch.compile (while Megatron's modules are imported)",),
        f"{MEGATRON_CORE} decorates its small fusions with torch.compile as its modules are imported: the decorator "
        "alone loads inductor, about 3 s of every process's start on a 2-core CPU, for fusions a CPU run does not "
        "use.",
        "when megatron-core compiles its fusions lazily (keep)",
        ("tests/unit/test_patches.py::test_torch_compile_is_eager_only_while_megatron_is_imported",),
        cpu_backend.keep_fusions_eager_at_import, remove=cpu_backend.restore_torch_compile),
    Patch(
        "cpu-torch-cuda-functions", CPU,
        ("torch.cuda.{device_count,current_device,set_device,synchronize,empty_cache,Stream,ExternalStream,Event,"
         "current_stream,default_stream,stream,set_stream,is_current_stream_capturing,memory_allocated,"
         "max_memory_allocated,memory_reserved,max_memory_reserved,reset_peak_memory_stats,memory_stats,"
         "get_device_properties,get_device_capability,get_device_name,get_rng_state,set_rng_state,manual_seed,"
         "manual_seed_all}", "torch.cuda.nvtx.{range_push,range_pop}",
         "torch.cuda.random.{get_rng_state,set_rng_state,manual_seed,manual_seed_all}"),
        f"{MEGATRON_CORE} and megatron.training assume CUDA (streams, events, RNG states, memory stats) with no "
        "CPU path; without these a run on a machine without a GPU fails at its first torch.cuda call.",
        "when megatron-core trains on the CPU (no such plan upstream: keep)",
        ("tests/integration/test_training.py::test_every_layout_trains_three_iterations_with_finite_loss",),
        cpu_backend.replace_torch_cuda_functions),
    Patch(
        "cpu-megatron-rng-state", CPU,
        ("megatron.core.tensor_parallel.random._get_cuda_rng_state",
         "megatron.core.tensor_parallel.random._set_cuda_rng_state"),
        "the model-parallel RNG tracker reads and writes CUDA generator states through these helpers (not "
        "torch.cuda's), which need a CUDA device.",
        "when megatron-core trains on the CPU (keep)",
        ("tests/integration/test_training.py::test_every_layout_follows_one_process_at_every_iteration",),
        cpu_backend.keep_megatron_rng_state_on_cpu),
    Patch(
        "cpu-initialize-without-cuda", CPU,
        ("megatron.training.initialize.initialize_megatron", "megatron.training.training.initialize_megatron"),
        "pretrain() calls initialize_megatron without allow_no_cuda, which asserts 'Megatron requires CUDA.'",
        "when pretrain() takes allow_no_cuda (not in 0.19.2)",
        ("tests/integration/test_training.py::test_every_layout_trains_three_iterations_with_finite_loss",),
        cpu_backend.let_megatron_initialize_without_cuda),
    Patch(
        "cpu-no-jit-warmup", CPU,
        ("megatron.training.initialize._warmup_jit_function",),
        "pretrain() warms its fusions up on torch.rand(..., device='cuda') tensors sized by CP and TP; on the CPU "
        "those draws come from the generator --use-cpu-initialization builds the weights from, so from random "
        "weights CP2 built other weights than CP1 (and the fusions it warms are off on the CPU).",
        "when megatron-core trains on the CPU (keep)",
        ("tests/integration/test_context_parallel.py::test_context_parallel_matches_one_process",),
        cpu_backend.skip_jit_warmup),
    Patch(
        "cpu-cuda-placement-onto-cpu", CPU,
        ("torch.Tensor.{cuda,to,pin_memory,record_stream} (and every torch call's device='cuda', through a "
         "TorchFunctionMode)", "torch.Tensor.type (the torch.cuda.*Tensor names)"),
        f"{MEGATRON_CORE} places tensors on 'cuda' throughout, and its optimizer and grad clipping accept only "
        "'torch.cuda.*Tensor' parameters.",
        "when megatron-core trains on the CPU (keep)",
        ("tests/integration/test_training.py::test_every_layout_trains_three_iterations_with_finite_loss",),
        cpu_backend.place_cuda_tensors_on_cpu),

    # ---- upstream bugs (megatron_patch/patches/megatron_fixes.py)
    Patch(
        "sync-save-results-in-process", FIX,
        ("megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue",),
        f"{MEGATRON_CORE}'s synchronous torch_dist save passes its writer threads' results through a "
        "multiprocessing Manager queue started with 'spawn', which re-imports the training script at the first "
        "save (11.4 s of a tiny model's 11.4 s save on a 2-core CPU).",
        "when megatron-core uses an in-process queue for synchronous saves",
        ("tests/unit/test_patches.py::test_a_synchronous_save_starts_no_manager_process",),
        megatron_fixes.keep_sync_save_results_in_process,
        applies=lambda args, device: not getattr(args, "async_save", False)),
    Patch(
        "dataset-helpers-shipped-compiled", FIX,
        ("megatron.core.datasets.utils.compile_helpers",),
        f"the {MEGATRON_CORE} wheel ships the compiled helpers_cpp but no Makefile, so the `make` Megatron runs "
        "at start-up fails and it exits 1.",
        "when the wheel ships its Makefile or skips `make` for an installed extension",
        ("tests/unit/test_patches.py::test_dataset_helpers_need_no_make",),
        megatron_fixes.skip_dataset_helper_compilation),
    Patch(
        "loss-average-reset-on-log-boundaries", FIX,
        ("megatron.training.training.training_log",),
        f"{MEGATRON_CORE} does not reset the loss accumulators after logging the first iteration, so with "
        "--log-interval 1 the second logged loss is the mean of iterations 1 and 2.",
        "when training_log resets on is_first_iteration too (megatron-core > 0.19.2: check)",
        ("tests/integration/test_best_practice_commands.py::test_kill_9_and_relaunch_continues_exactly",),
        megatron_fixes.reset_loss_average_on_log_boundaries),
    Patch(
        "distributed-optimizer-loads-without-grad", FIX,
        ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",),
        f"{MEGATRON_CORE}: an fp32 DistributedOptimizer cannot resume: its loader copies into views of leaf "
        "parameters with autograd on ('a view of a leaf Variable that requires grad is being used in an in-place "
        "operation').",
        "when the dp_reshardable loader runs under no_grad upstream",
        ("tests/integration/test_checkpoint_resume.py::"
         "test_kill_while_writing_the_tracker_resumes_from_the_previous_one",
         "tests/integration/test_best_practice_commands.py::test_kill_9_and_relaunch_continues_exactly"),
        megatron_fixes.load_distributed_optimizer_without_grad),
    Patch(
        "distributed-optimizer-torch-adam-step", FIX,
        ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.state_dict",
         "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_state_dict"),
        f"{MEGATRON_CORE} with torch's Adam (no Apex/TE): resuming asserts len(steps) == 1 on the empty "
        "optimizer state, and once past that every parameter shares one 'step' tensor that torch Adam "
        "increments once per parameter (wrong bias correction after each resume).",
        "when DistributedOptimizer supports torch Adam's per-parameter step upstream",
        ("tests/integration/test_checkpoint_resume.py::"
         "test_kill_while_writing_the_tracker_resumes_from_the_previous_one",
         "tests/integration/test_best_practice_commands.py::test_kill_9_and_relaunch_continues_exactly"),
        megatron_fixes.resume_torch_adam_step_in_distributed_optimizer,
        lambda args, device: not _distributed_optimizer_has_apex_or_te()),

    Patch(
        "weight-hash-check-across-context-parallel", FIX,
        ("megatron.training.training.check_param_hashes_across_dp_replicas",),
        f"{MEGATRON_CORE}'s --check-weight-hash-across-dp-replicas-interval compares hashes over the data-parallel "
        "group alone, though context-parallel ranks hold the same replicas (their gradients are all-reduced over "
        "data x context parallel): CP replicas that drifted apart went unseen.",
        "when megatron-core's check gathers over the data- and context-parallel group",
        ("tests/integration/test_context_parallel.py::test_the_replica_check_compares_context_parallel_ranks",
         "tests/integration/test_context_parallel.py::test_context_parallel_ranks_hold_bit_identical_replicas"),
        replica_check.install),

    # ---- reliability
    Patch(
        "checkpoint-tracker-written-atomically", RELIABILITY,
        ("megatron.training.checkpointing.maybe_msc (its open() of latest_checkpointed_iteration.txt for writing)",),
        f"{MEGATRON_CORE}'s save_checkpoint writes the tracker in place (open 'w', then write): a kill in "
        "between leaves it empty, and the relaunch prints 'Invalid metadata file' and exits 0 without training.",
        "when save_checkpoint writes the tracker through a temporary file and a rename",
        ("tests/unit/test_patches.py::test_megatron_still_writes_the_tracker_in_place",
         "tests/integration/test_checkpoint_resume.py::test_kill_while_writing_the_tracker_resumes_from_the_previous_one"),
        megatron_fixes.write_checkpoint_tracker_atomically),
    Patch(
        "nan-message-names-likely-causes", RELIABILITY,
        ("megatron.core.rerun_state_machine.RerunStateMachine.validate_result",),
        f"{MEGATRON_CORE}'s NaN/Inf checks say where the value was found ('found NaN in local grad norm for "
        "bucket #0 ...'), not what usually causes it.",
        "when the rerun state machine's messages name causes (keep: ours are Qwen2.5 launcher advice)",
        ("tests/unit/test_patches.py::test_nan_and_inf_checks_name_likely_causes",),
        megatron_fixes.name_likely_causes_of_nan),

    # ---- logging
    Patch(
        "tokens-per-second-and-memory-line", LOGGING,
        ("megatron.training.training.training_log",),
        f"{MEGATRON_CORE}'s log line has no tokens/s/GPU and no memory figures (the launcher's users compare "
        "throughput across runs).",
        "when megatron's log line reports throughput in tokens",
        ("tests/integration/test_training.py::test_log_reports_tokens_per_second_and_memory",),
        megatron_fixes.log_tokens_and_memory),

    # ---- options megatron-core has no flag for
    Patch(
        "fp8-forward-fp32-accumulation", OPTION,
        ("megatron.core.fp8_utils.get_fp8_recipe",
         "transformer_engine.pytorch.module.{linear,layernorm_linear,layernorm_mlp}._2X_ACC_FPROP"),
        "Transformer Engine accumulates fp8 forward GEMMs in the Hopper tensor cores' reduced precision (its "
        "backward GEMMs promote to fp32); megatron-core 0.19.2 has no flag to change it "
        "(--fp8-fprop-fp32-accumulation, MP_FP8_FPROP_ACCUMULATION=fp32).",
        "when megatron-core exposes TE's fp8_gemm_fprop",
        ("tests/unit/test_launcher.py::test_fp8_knobs_reach_megatron_cores_parser",
         "tests/unit/test_patches.py::test_the_fp8_accumulation_entry_is_taken_only_for_fp8_with_its_flag",
         "tests/unit/test_fp8_gpu.py::test_fp32_forward_accumulation_is_closer_to_the_exact_product"),
        fp8_accumulation.install,
        lambda args, device: bool(getattr(args, "fp8", None)) and getattr(args, "fp8_fprop_fp32_accumulation", False)),

    # ---- our kernels in megatron-core's slots (megatron_patch/fused)
    Patch(
        "fused-rope", FUSED,
        ("megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb",),
        "only Transformer Engine fills megatron-core's fused-RoPE slot; without TE the unfused RoPE runs about "
        "ten elementwise kernels per q and k per layer.",
        "when megatron-core ships a fused RoPE that needs no TE",
        ("tests/unit/test_fused_kernels.py::test_rope_matches_megatron_unfused_rope",
         "tests/unit/test_patches.py::test_plain_kernels_apply_no_fused_patch"),
        rope.install,
        _rope_slot_empty),
    Patch(
        "fused-qkv-split-rope", FUSED,
        ("megatron.core.transformer.attention.apply_fused_qkv_rotary_pos_emb (a slot: set where TE imports)",
         "megatron.core.transformer.attention.HAVE_FUSED_QKV_ROPE"),
        "megatron-core's split path copies q across the QKV groups, rotates q and k in separate kernels and "
        "concatenates their gradients back; its one-call alternative (--fused-single-qkv-rope) needs Transformer "
        "Engine's function (ours also replaces TE's).",
        "when megatron-core ships a single-QKV RoPE that needs no TE",
        ("tests/unit/test_fused_kernels.py::test_qkv_split_rope_kernel_matches_the_split_path_in_triton_interpreter",
         "tests/unit/test_fused_kernels.py::test_fused_single_qkv_rope_is_switched_on_only_where_it_applies"),
        rope.install_qkv,
        lambda args, device: device == "cuda" and triton_kernels_run_here()),
    Patch(
        "qkv-bias-in-gemm", FUSED,
        ("megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication.forward",),
        "megatron-core adds a linear layer's bias after its GEMM (`output + bias`: one more pass over the QKV "
        "projection's output, 9.9 ms of a 1.155 s 1.5B step on an H200); cuBLASLt adds it inside the GEMM.",
        "when megatron-core's linear adds its bias through addmm",
        ("tests/unit/test_fused_kernels.py::test_linear_bias_in_gemm_leaves_megatron_cores_context_and_gradients",),
        linear_bias.install,
        lambda args, device: device == "cuda" and getattr(args, "add_qkv_bias", False)),
    Patch(
        "gradient-accumulation-gemm", FUSED,
        ("megatron.core.tensor_parallel.layers.fused_weight_gradient_mlp_cuda (a slot: set where Apex imports)",
         "megatron.core.tensor_parallel.layers._grad_accum_fusion_available"),
        "--gradient-accumulation-fusion needs Apex's fused_weight_gradient_mlp_cuda; without it each weight "
        "gradient is written in bf16 and added to the fp32 main_grad afterwards (~5% of a 0.5B step).",
        "when megatron-core accumulates into main_grad without Apex (torch's addmm out_dtype)",
        ("tests/unit/test_fused_kernels.py::test_gradient_accumulation_gemm_adds_into_fp32_main_grad",),
        grad_accumulation.install,
        lambda args, device: (args.gradient_accumulation_fusion and not grad_accumulation.apex_available()
                              and grad_accumulation.supported_here())),
    Patch(
        "multi-tensor-optimizer-maths", FUSED,
        ("megatron.core.optimizer.clip_grads.l2_norm_impl", "megatron.core.optimizer.clip_grads.multi_tensor_scale_impl",
         "megatron.core.optimizer.optimizer.multi_tensor_scale_impl"),
        "without Apex/TE megatron-core's gradient norm is per-tensor Python with one device-to-host sync per "
        "parameter (~290 at 0.5B).",
        "when megatron-core's local fallbacks use torch._foreach_*",
        ("tests/unit/test_fused_kernels.py::test_multi_tensor_norm_and_scale_match_per_tensor_maths",
         "tests/unit/test_fused_kernels.py::test_optimizer_patches_make_megatron_build_fused_adamw"),
        optimizer_step.install_multi_tensor_maths,
        lambda args, device: optimizer_step.megatron_falls_back_to_per_tensor_maths()),
    Patch(
        "gradient-scaling-foreach", FUSED,
        ("megatron.core.distributed.param_and_grad_buffer._ParamAndGradBuffer.scale_gradients",),
        "with --calculate-per-token-loss megatron-core divides the whole fp32 gradient buffer by the token count "
        "through an unvectorized broadcast kernel (4.6 ms of a 1.5B step on an H200; one foreach pass: about 2.7).",
        "when megatron-core scales its gradient buffer with a vectorized kernel",
        ("tests/unit/test_fused_kernels.py::test_gradient_buffer_scaling_matches_megatron_cores",),
        optimizer_step.install_gradient_scaling,
        lambda args, device: device == "cuda"),
    Patch(
        "fused-adamw", FUSED,
        ("megatron.core.optimizer.Adam", "megatron.core.optimizer.USING_PYTORCH_OPTIMIZER"),
        "without Apex/TE megatron-core builds torch's multi-kernel foreach AdamW; torch's fused=True AdamW is "
        "one kernel (CUDA, and the CPU since torch 2.4).",
        "when megatron-core builds torch's fused AdamW itself",
        ("tests/unit/test_fused_kernels.py::test_optimizer_patches_make_megatron_build_fused_adamw",),
        optimizer_step.install_fused_adam,
        lambda args, device: optimizer_step.megatron_builds_torch_adam(args)),
    Patch(
        "swiglu-backward-kernel", FUSED,
        ("megatron.core.fusions.fused_bias_swiglu.SwiGLUFunction.backward",),
        "megatron-core's torch.compile'd SwiGLU backward makes one kernel that reloads both halves per output "
        "element (2.4 TB/s on an H200, 5.7% of a 1.5B step).",
        "when inductor (or megatron-core) emits a one-pass SwiGLU backward",
        ("tests/unit/test_fused_kernels.py::test_swiglu_function_backward_takes_the_kernel_and_matches_float64_autograd",
         "tests/unit/test_fused_kernels.py::test_swiglu_backward_kernel_matches_autograd_in_triton_interpreter"),
        swiglu.install,
        lambda args, device: device == "cuda" and args.bias_swiglu_fusion and triton_kernels_run_here()),
)


def _distributed_optimizer_has_apex_or_te() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return distrib_optimizer.HAVE_APEX_OR_TE


_installed: set[str] = set()


def _install(patch: Patch) -> None:
    if patch.name not in _installed:
        patch.install()
        _installed.add(patch.name)


def installed() -> list[str]:
    """Names of the patches installed in this process, in manifest order."""
    return [p.name for p in MANIFEST if p.name in _installed]


def device_here() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def wanted(args, device: str) -> list[Patch]:
    """The manifest entries this run takes once its arguments are parsed."""
    chosen = []
    for patch in MANIFEST:
        if patch.remove is not None or (patch.kind == CPU and device != "cpu"):
            continue
        if patch.kind == FUSED and args.plain_kernels:
            continue
        if patch.applies(args, device):
            chosen.append(patch)
    return chosen


def settle_args(args) -> list[str]:
    """The one place arguments change: switch off what megatron-core would otherwise ask of a kernel that is
    not here (after the patches, which may have supplied it), and switch on the one megatron-core route our
    kernels need a flag for (--fused-single-qkv-rope). Returns one line per change, with the reason."""
    from megatron.core.tensor_parallel import layers

    changes = []
    if getattr(args, "position_embedding_type", "rope") == "yarn":
        changes += _unfused_rope_for_yarn(args)
    if args.apply_rope_fusion and _rope_slot_empty(args, None):
        args.apply_rope_fusion = False
        changes.append("--apply-rope-fusion off: no fused RoPE here (Transformer Engine's is absent"
                       + (" and --plain-kernels leaves ours out)" if args.plain_kernels else ")"))
    if getattr(args, "fused_single_qkv_rope", False) and not rope.qkv_slot_is_ours():
        args.fused_single_qkv_rope = False
        changes.append("--fused-single-qkv-rope off: it needs our QKV split + RoPE kernel (a GPU and triton, no "
                       "--plain-kernels)")
    elif rope.qkv_slot_is_ours() and not getattr(args, "fused_single_qkv_rope", False) \
            and _fused_single_qkv_rope_fits(args):
        args.fused_single_qkv_rope = True
        changes.append("--fused-single-qkv-rope on: one kernel splits the QKV projection and applies RoPE")
    if args.gradient_accumulation_fusion and not layers._grad_accum_fusion_available:
        args.gradient_accumulation_fusion = False
        changes.append("--gradient-accumulation-fusion off: Apex's GEMM is absent and "
                       + ("--plain-kernels leaves ours out" if args.plain_kernels
                          else "ours needs a GPU and torch >= 2.8"))
    return changes


def _unfused_rope_for_yarn(args) -> list[str]:
    """YaRN multiplies cos and sin by its attention factor: megatron-core's unfused RoPE does, the fused kernels
    (ours, Transformer Engine's, the single-QKV one) do not (its packed-sequence kernel would drop it silently)."""
    args.apply_rope_fusion = False  # megatron-core's validate_args turns it off for any non-'rope' type too
    args.fused_single_qkv_rope = False
    if args.plain_kernels:
        return []
    return ["RoPE unfused for YaRN (--apply-rope-fusion and --fused-single-qkv-rope off): the fused RoPE kernels "
            "leave out YaRN's attention scaling of cos and sin, which megatron-core's unfused RoPE applies"]


def _fused_single_qkv_rope_fits(args) -> bool:
    """Whether megatron-core's single-QKV RoPE call can take this run (it asserts where it must split)."""
    return not (
        getattr(args, "sft_packing", False)  # packed samples' boundaries make megatron-core split q, k, v itself
        or getattr(args, "position_embedding_type", "rope") != "rope"  # the kernel applies plain RoPE only,
        or getattr(args, "rotary_interleaved", False)  # in halves, not interleaved
        or getattr(args, "qk_layernorm", False) or getattr(args, "multi_latent_attention", False)
        # megatron-core's unsplit path returns before it picks this rank's q heads out of a KV group that TP
        # ranks share
        or getattr(args, "tensor_model_parallel_size", 1) > (getattr(args, "num_query_groups", None) or 1 << 30))


def prepare(device: str) -> None:
    """Before Megatron is imported and parses its arguments: the process's entries, and on a machine without a GPU
    the CPU backend's (the import-time one first)."""
    for patch in MANIFEST:
        if patch.kind == PROCESS or (patch.kind == CPU and device == "cpu"):
            _install(patch)


def end_import_time_entries() -> None:
    """Undo the entries that hold only while Megatron's modules are imported."""
    for patch in MANIFEST:
        if patch.remove is not None and patch.name in _installed:
            patch.remove()
            _installed.discard(patch.name)


def apply(args, device: str | None = None) -> list[str]:
    """Install this run's patches (once per process), settle the arguments, and on the CPU share the cores.
    Prints what it did on rank 0; returns the argument changes."""
    device = device or device_here()
    chosen = wanted(args, device)
    for patch in chosen:
        _install(patch)
    changes = settle_args(args)
    if device == "cpu":
        cpu_backend.share_cores(args)
    if int(os.environ.get("RANK", "0")) == 0:
        kernels = "plain megatron-core kernels" if args.plain_kernels else "fused kernels"
        print(f"megatron_patch: {kernels}; patches: {', '.join(p.name for p in chosen)}", flush=True)
        for change in changes:
            print(f"megatron_patch: {change}", flush=True)
    return changes
