"""Command line of the Qwen2.5 convertor (the toolkit's shell scripts build this command).

    python -m megatron_patch.convert --model-size auto --load-dir HF --save-dir MCORE --precision bf16
    python -m megatron_patch.convert --mg2hf --model-size 7B --load-dir MCORE --save-dir HF_OUT --hf-dir HF
    (a LoRA run's MCORE: a PEFT adapter folder over HF; add --merge-lora for merged full weights)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from functools import partial
from pathlib import Path

from megatron_patch import process_lifetime
from megatron_patch.atomic_write import recover_interrupted
from megatron_patch.convert.staging import check_save_dir
from megatron_patch.errors import dry_run_requested, parse_bool, report_user_errors


def _bytes(value: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", value, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB or 500MB, got '{value}'")
    unit = (m.group(2) or "B").upper().rstrip("B")
    scale = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "KI": 1024, "MI": 1024**2, "GI": 1024**3}[unit]
    return int(float(m.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_patch.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", required=True,
                   help="size-table name (tiny, 0.5B, ..., 72B) or 'auto' to take the shape from config.json")
    p.add_argument("--load-dir", required=True, help="HF folder (HF->Megatron) or Megatron checkpoint folder")
    p.add_argument("--save-dir", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--mg2hf", type=partial(parse_bool, "MG2HF (--mg2hf)"), nargs="?", const=True, default=False,
                   help="true: Megatron -> HF; false (default): HF -> Megatron")
    p.add_argument("--hf-dir", default=None, help="Megatron -> HF: reference HF folder (config.json, tokenizer)")
    p.add_argument("--precision", default="bf16", help="fp32, bf16 or fp16: dtype of the written weights")
    p.add_argument("--use-cuda", type=partial(parse_bool, "USE_CUDA (--use-cuda)"), default=False,
                   help="true: build the Megatron model on the GPU (error if none); false: CPU only")
    p.add_argument("--tp", type=int, default=1, help="checked only: torch_dist loads with any TP")
    p.add_argument("--pp", type=int, default=1, help="checked only: torch_dist loads with any PP")
    p.add_argument("--use-te", type=partial(parse_bool, "USE_TE (--use-te)"), default=None, help="informational (older script's USE_TE)")
    p.add_argument("--max-shard-size", type=_bytes, default="5GB", help="Megatron -> HF: max bytes per shard")
    p.add_argument("--check-logits", action="store_true",
                   help="after converting, run HF transformers and the Megatron model on the same tokens (fp32) "
                        "and print the max abs logit difference and both losses")
    p.add_argument("--logits-tolerance", type=float, default=None,
                   help="with --check-logits: fail if the max abs logit difference is larger")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty SAVE_DIR (only on success)")
    p.add_argument("--merge-lora", action="store_true",
                   help="Megatron -> HF of a LoRA run: full HF weights with the adapters merged into the base the run "
                        "recorded, instead of a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    return p


@report_user_errors(stopped="SAVE_DIR was not written (what it held before is unchanged); run the same command "
                            "to convert again")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if dry_run_requested():  # the toolkit scripts turn their older DRY_RUN=true into this
        print(shlex.join([sys.executable, "-m", "megatron_patch.convert", *map(str, argv)]))
        return 0
    if not args.use_cuda:
        # Before anything touches CUDA: a CPU conversion must not see the GPU, so megatron_patch.patches.cpu_backend
        # takes over exactly as it does for CPU training.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # Before torch loads (seconds): a SAVE_DIR that would destroy an input is refused at once.
    recover_interrupted(args.save_dir)
    inputs = {"LOAD_DIR": Path(args.load_dir), **({"HF_DIR": Path(args.hf_dir)} if args.mg2hf and args.hf_dir else {})}
    check_save_dir(Path(args.save_dir), args.overwrite, inputs)
    # megatron-core's torch_dist writer starts helper processes at the first save: a killed convertor must not leave
    # them running (each holds the model's memory, and the caller's output pipe open: a hang).
    process_lifetime.children_die_with_this_process()
    from megatron_patch.convert.convertor import hf_to_mcore, mcore_to_hf

    try:
        if args.mg2hf:
            check = mcore_to_hf(args.model_size, args.load_dir, args.save_dir, args.hf_dir, args.precision,
                                args.use_cuda, args.check_logits, args.max_shard_size, args.tp, args.pp,
                                args.overwrite, args.merge_lora)
        else:
            if args.use_te and not args.use_cuda:
                print("note: USE_TE=true is informational here; the checkpoint uses the TE key names either way "
                      "and loads into a Transformer Engine model.", file=sys.stderr)
            check = hf_to_mcore(args.model_size, args.load_dir, args.save_dir, args.precision, args.use_cuda,
                                args.check_logits, args.tp, args.pp, args.overwrite)
    finally:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if check is not None and args.logits_tolerance is not None and check.max_abs_logit_diff > args.logits_tolerance:
        print(f"error: max abs logit difference {check.max_abs_logit_diff:.3e} exceeds --logits-tolerance "
              f"{args.logits_tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
