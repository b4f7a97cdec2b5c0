"""Tokenize pre-training text into a Megatron idxmap (.bin/.idx), or merge several idxmaps into one.

  python toolkits/pretrain_data_preprocessing/preprocess_data.py \\
      --input corpus.jsonl more.jsonl --output-prefix data/corpus --tokenizer TOKENIZER_DIR --workers 8
  -> data/corpus_text_document.{bin,idx}; train with --data-path data/corpus_text_document

  python toolkits/pretrain_data_preprocessing/preprocess_data.py \\
      --merge data/a_text_document data/b_text_document --output-prefix data/ab_text_document

Inputs: files or folders of files (a folder gives its .jsonl/.json/.txt files by name), each optionally
compressed (.gz, .zst: upstream's WuDao recipe makes NN.jsonl.zst pieces). .jsonl/.ndjson/.json files hold one
JSON object per line, or one JSON array of objects (text under --json-key); any other file is plain UTF-8 text,
one document per blank-line-separated paragraph (--text-mode line: one per line). Every document ends with
<|endoftext|> (151643) unless --no-append-eod. Outputs appear only when complete, and replace an older idxmap at
the same prefix as one unit. A bad line (malformed JSON, not UTF-8, ...) stops with its file:line unless
--skip-bad-lines; a blank input file or no document at all writes nothing. Errors exit with status 2; Ctrl-C (or SIGTERM) stops with one line, writing nothing, status 130 (143).

Pai-Megatron-Patch's preprocess_data_megatron.py flags work too (--patch-tokenizer-type Qwen2Tokenizer, --load,
--json-keys, --append-eod, --partitions, --keep-sequential-samples, ...): see their help group below.
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
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", nargs="+", metavar="PATH", help="files or folders of files, in order")
    mode.add_argument("--merge", nargs="+", metavar="PREFIX", help="idxmap prefixes (no .bin/.idx) to concatenate")
    parser.add_argument("--output-prefix", required=True,
                        help="with --input: P gives P_<json-key>_document.{bin,idx}; with --merge: the exact prefix")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer folder (python -m megatron_patch.tokenizer "
                                            "--write-default DIR writes Qwen2.5's)")
    parser.add_argument("--json-key", default="text", help="field of each JSON line holding the text (default: text)")
    parser.add_argument("--text-mode", choices=["paragraph", "line"], default="paragraph",
                        help="plain-text inputs: one document per blank-line-separated paragraph, or per line")
    parser.add_argument("--workers", type=workers_arg, default=1,
                        help="tokenizer processes (default 1: in this process), or auto: one per core, at most one "
                             "per 4 MiB of input")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with <|endoftext|> (default: on)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count bad lines (malformed JSON, not UTF-8, no text field) instead of "
                             "stopping at the first one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_upstream_flags(parser, "pretrain")
    args = parser.parse_args(argv)
    notes = settle_upstream_flags(parser, args, "pretrain")
    if args.input and not args.tokenizer:
        parser.error("--tokenizer (or --load) is required with --input")
    if args.workers == "auto" and args.input:
        args.workers = auto_workers(args.input)
    return args, notes


@report_user_errors(stopped=IDXMAP_NOT_WRITTEN)
def main(argv: list[str] | None = None) -> int:
    args, notes = parse_args(argv)
    if notes_and_dry_run(__file__, argv, notes):
        return 0
    # Imported here, not at the top: spawned workers re-import this script and must stay light.
    if args.merge:
        from megatron_patch.data.indexed_writer import merge_indexed_datasets

        documents = merge_indexed_datasets(args.merge, args.output_prefix)
        print(f"merged {len(args.merge)} idxmaps, {documents:,} documents -> {args.output_prefix}.{{bin,idx}}")
        return 0
    from megatron_patch.data.pretrain_preprocess import preprocess_pretrain_corpus

    # Upstream's --json-keys a b writes one idxmap per field, each from its own pass over the inputs.
    for json_key in args.json_keys or [args.json_key]:
        out, stats = preprocess_pretrain_corpus(
            args.input, args.output_prefix, args.tokenizer, json_key=json_key, workers=args.workers,
            append_eod=args.append_eod, skip_bad_lines=args.skip_bad_lines, text_mode=args.text_mode,
            show_progress=not args.no_progress,
        )
        if stats.left_out_files:
            print(f"note: left out {len(stats.left_out_files)} file(s) of another kind in the input folder(s): "
                  f"{', '.join(stats.left_out_files[:5])}{', ...' if len(stats.left_out_files) > 5 else ''}",
                  file=sys.stderr)
        for message in stats.bad_line_messages:
            print(f"skipped: {message}", file=sys.stderr)
        print(stats.summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
