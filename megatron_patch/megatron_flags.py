"""Every Megatron flag list we write, in one place: a Qwen2.5 model's (a checkpoint's config.json or a size-table
entry), a machine's (CPU, GPU without Transformer Engine), the convertor's one-process run, and the extra
arguments our entrypoint adds to megatron-core's parser. (The launcher maps the 25 positionals onto flags in
launch/flags.py; megatron_startup.start_megatron puts a machine's flags in front of any command line.)"""

from __future__ import annotations

import argparse

from megatron_patch.errors import UserError
from megatron_patch.lora.targets import add_lora_args
from megatron_patch.model_sizes import Qwen25Size, get_size


# A GPU without Transformer Engine has no Apex either: megatron-core's persistent layer norm and masked-softmax
# kernels are Apex's, so they go; the gradient-accumulation GEMM stays (megatron_patch.fused supplies it).
NO_TE_GPU_FLAGS = ["--transformer-impl", "local", "--no-persist-layer-norm", "--no-masked-softmax-fusion"]

# A CPU run: gloo, weights built on the host, and none of the CUDA-only fused kernels.
CPU_FLAGS = [
    "--distributed-backend", "gloo",
    "--use-cpu-initialization",
    "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion",
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
    "--no-masked-softmax-fusion",
    "--no-persist-layer-norm",
]

# The weights' dtype of a one-process run (the convertor's PR).
DTYPE_FLAGS = {"float32": [], "bfloat16": ["--bf16"], "float16": ["--fp16"]}


def machine_flags(device: str, has_te: bool) -> list[str]:
    """What a command line needs on this machine, put in front of it (flags given later still win)."""
    if device == "cpu":
        return list(CPU_FLAGS)
    return [] if has_te else list(NO_TE_GPU_FLAGS)


def single_process_flags(size: Qwen25Size, dtype: str, seq_length: int) -> list[str]:
    """A one-process TP=1/PP=1 run that builds `size` to load or save its weights (the convertor's, the tests')."""
    return qwen2_5_model_flags(size) + [
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--micro-batch-size", "1", "--global-batch-size", "1",
        "--seq-length", str(seq_length), "--max-position-embeddings", str(max(seq_length, size.positions)),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(size.vocab_size - 1),
        "--ckpt-format", "torch_dist", "--no-save-optim", "--no-save-rng",
        "--train-iters", "1", "--lr", "0.0", "--seed", "1234",
        *DTYPE_FLAGS[dtype],
    ]


def qwen2_5_model_flags(size: Qwen25Size) -> list[str]:
    """The megatron-core architecture flags that make GPTModel this Qwen2.5 model (shape, RoPE base and scaling,
    positions, norm epsilon, vocabulary, tying)."""
    flags = [
        "--num-layers", str(size.num_layers),
        "--hidden-size", str(size.hidden_size),
        "--num-attention-heads", str(size.num_attention_heads),
        "--group-query-attention",
        "--num-query-groups", str(size.num_query_groups),
        "--ffn-hidden-size", str(size.ffn_hidden_size),
        "--max-position-embeddings", str(size.positions),
        *rope_flags(size),
        "--rotary-base", str(int(size.rope_theta)),
        "--rotary-percent", "1.0",
        "--normalization", "RMSNorm",
        "--norm-epsilon", str(size.rms_norm_eps),
        "--swiglu",
        # Qwen2.5: no bias anywhere except q/k/v.
        "--disable-bias-linear",
        "--add-qkv-bias",
        "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0",
        "--padded-vocab-size", str(size.vocab_size),
    ]
    if not size.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    return flags


def rope_flags(size: Qwen25Size) -> list[str]:
    """RoPE, or megatron-core's YaRN (GPTModel's `yarn` position embedding: the same inverse frequencies and
    correction range as transformers' YaRN, and its attention applies the same 0.1 ln(factor) + 1 scaling to cos
    and sin, from --mscale 1 and --mscale-all-dim 0, megatron-core's defaults)."""
    yarn = size.rope_scaling
    if yarn is None:
        return ["--position-embedding-type", "rope"]
    return ["--position-embedding-type", "yarn", "--rotary-scaling-factor", str(yarn.factor),
            "--yarn-original-max-position-embeddings", str(yarn.original_max_position_embeddings),
            "--yarn-beta-fast", str(yarn.beta_fast), "--yarn-beta-slow", str(yarn.beta_slow)]


def expand_model_size(argv: list[str]) -> list[str]:
    """Replace `--model-size NAME` in a command line by the Qwen2.5 flags of that size.

    Flags given explicitly after it still win (argparse keeps the last value).
    """
    if "--model-size" not in argv:
        return argv
    i = argv.index("--model-size")
    if i + 1 >= len(argv):
        raise UserError("error: --model-size needs a value, e.g. --model-size 0.5B")
    return argv[:i] + qwen2_5_model_flags(get_size(argv[i + 1])) + argv[i + 2:]


def add_extra_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("Qwen2.5 (megatron_patch)")
    group.add_argument("--dataset-type", choices=["mock", "idxmap", "raw"], default="idxmap",
                       help="mock: random tokens; idxmap: Megatron .bin/.idx; raw: JSON SFT tokenized on the fly")
    # Not megatron's own --sft: that one averages validation loss per micro-batch, we average per answer token.
    group.add_argument("--instruction-tuning", action="store_true",
                       help="SFT data: loss on answer tokens only, averaged over all answer tokens of the global batch")
    group.add_argument("--sft-packing", action="store_true",
                       help="pack several SFT samples into one sequence, never attending across them")
    group.add_argument("--max-padding-length", type=int, default=None,
                       help="raw JSON SFT: pad or truncate each sample to this many tokens")
    group.add_argument("--plain-kernels", action="store_true",
                       help="exactly megatron-core's modules and paths (for comparison): its local spec's "
                            "DotProductAttention and RMSNorm without TE, unfused RoPE, logits + cross-entropy, its "
                            "optimizer maths; none of the FUSED entries of megatron_patch.patches")
    group.add_argument("--fp8-fprop-fp32-accumulation", action="store_true",
                       help="fp8 on Hopper: forward GEMMs promote their partial sums to fp32 (TE's split "
                            "accumulator, which its backward GEMMs use already) instead of accumulating in the fp8 "
                            "tensor cores' reduced precision")
    group.add_argument("--replica-digests-dir", default=None,
                       help="with --check-weight-hash-across-dp-replicas-interval: each rank also writes the SHA-1 "
                            "of every parameter at each check to DIR/rank<N>.jsonl, to compare replicas offline")
    group.add_argument("--pretrained-hf", default=None, metavar="DIR",
                       help="start from a Hugging Face Qwen2.5 folder (config.json + safetensors): each rank reads its "
                            "own TP/PP shards into the model before the optimizer copies it; not read when --load holds "
                            "a checkpoint (a resumed run continues from its own)")
    group.add_argument("--cpu-threads", type=int, default=None,
                       help="CPU runs: torch threads per process (default: OMP_NUM_THREADS where set, as the launcher sets "
                            "it; else cores / processes)")
    add_lora_args(parser)
    return parser
