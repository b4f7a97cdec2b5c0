"""Tokenize SFT data (alpaca JSON array or JSONL, messages, ShareGPT) into an idxmap pair for fine-tuning.

  python toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py \\
      --input alpaca_zh.json --output-prefix data/sft --tokenizer TOKENIZER_DIR --seq-length 2048 --packing
  -> data/sft_text_document.{bin,idx}   token ids, one sequence per sample
     data/sft_label_document.{bin,idx}  answer mask (1 = trained token), same layout
     data/sft_sft_meta.json             seq_length, packing and counts
  train with --dataset-type idxmap --data-path data/sft (or data/sft_text_document, as upstream's README names it)

Each conversation is rendered with the tokenizer's chat template; only assistant answers and their <|im_end|>
are trained. Samples longer than --seq-length are cut (and counted); samples left with no answer token are
kept and counted. With --packing, several samples share one row of --seq-length tokens, boundaries kept.

A record with nothing to train on (no "output", no assistant turn), two user or two assistant turns in a row,
malformed JSON or bytes that are not UTF-8 stops with its file:line, or is skipped and counted with
--skip-bad-lines. An empty input writes nothing. Outputs replace older ones at the same prefix as one unit.
Errors exit with status 2; Ctrl-C (or SIGTERM) stops with one line, writing nothing, status 130 (143).

Inputs may be folders of JSON/JSONL files, and any file may be .gz or .zst compressed. An item that is a list of
records (Pai-Megatron-Patch's form for "pack these together") puts them in one row (several rows if they pass
--seq-length), trained together with MP_SFT_PACKING=true. Pai-Megatron-Patch's flags work too
(--patch-tokenizer-type Qwen2Tokenizer, --load, --sequence-packing, --partitions, ...): see their help group.
"""

from __future__ import annotations

import argparse
import sys

from megatron_patch.data import IDXMAP_NOT_WRITTEN
from megatron_patch.data.parallel import auto_workers, workers_arg
from megatron_patch.data.upstream_flags import add_upstream_flags, notes_and_dry_run, settle_upstream_flags
from megatron_patch.errors import report_user_errors


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The arguments, and the note lines for upstream flags that change nothing here."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="JSON array or JSONL files of SFT records, or folders of them")
    parser.add_argument("--output-prefix", required=True, help="P gives P_text_document / P_label_document")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer folder with a chat template")
    parser.add_argument("--seq-length", type=int, required=True, help="training sequence length (tokens)")
    parser.add_argument("--packing", action="store_true", help="pack several samples per row of --seq-length")
    parser.add_argument("--workers", type=workers_arg, default=1,
                        help="tokenizer processes (default 1: in this process), or auto: one per core, at most one "
                             "per 4 MiB of input")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count bad records (see above) instead of stopping at the first one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_upstream_flags(parser, "sft")
    args = parser.parse_args(argv)
    notes = settle_upstream_flags(parser, args, "sft")
    if not args.tokenizer:
        parser.error("--tokenizer (or --load) is required")
    if args.seq_length < 2:
        parser.error("--seq-length must be at least 2")
    if args.workers == "auto" and args.input:
        args.workers = auto_workers(args.input)
    return args, notes


@report_user_errors(stopped=IDXMAP_NOT_WRITTEN)
def main(argv: list[str] | None = None) -> int:
    args, notes = parse_args(argv)
    if notes_and_dry_run(__file__, argv, notes):
        return 0
    # Imported here, not at the top: spawned workers re-import this script and must stay light.
    from megatron_patch.data.sft_preprocess import build_sft_idxmap

    stats = build_sft_idxmap(
        args.input, args.output_prefix, args.tokenizer, args.seq_length, packing=args.packing,
        workers=args.workers, skip_bad_lines=args.skip_bad_lines, show_progress=not args.no_progress,
    )
    for message in stats.bad_record_messages:
        print(f"skipped: {message}", file=sys.stderr)
    print(stats.summary(args.output_prefix, args.seq_length, args.packing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
