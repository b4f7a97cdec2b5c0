"""Pai-Megatron-Patch's flag spellings on our two preprocessing tools, so its commands (and the flags its shell
scripts pass: run_make_pretraining_dataset_megatron.sh, run_build_idxmap_sft_dataset.sh) run unchanged.

Each spelling either maps onto ours (--load is --tokenizer, --sequence-packing is --packing, --json-keys names the
fields) or changes nothing here; those are accepted with one note line saying so. Only a choice we cannot honour
is refused: another model's tokenizer, sentence splitting.
"""

from __future__ import annotations

import argparse
import shlex
import sys

QWEN_TOKENIZER_TYPES = ("Qwen2Tokenizer",)

# flag -> why it changes nothing here (the note printed when it is given)
_NO_EFFECT = {
    "partitions": "one pass reads the inputs in order and --workers sets the parallelism",
    "keep_sequential_samples": "documents are always written in input order",
    "log_interval": "the progress bar updates every second",
    "extra_vocab_size": "the tokenizer comes from --load as it is",
    "padded_vocab_size": "the tokenizer comes from --load as it is",
    "keep_newlines": "text is kept as it is (no sentence splitting)",
    "debug": "errors already name the file and line",
}
_NO_EFFECT_PRETRAIN = {"seq_length": "pre-training documents are not cut at preprocessing"}
_NO_EFFECT_SFT = {"append_eod": "every answer already ends with <|im_end|>"}


def add_upstream_flags(parser: argparse.ArgumentParser, tool: str) -> None:
    """Pai-Megatron-Patch's spellings for `tool` ("pretrain" or "sft"), in their own help group."""
    group = parser.add_argument_group("Pai-Megatron-Patch's spellings, accepted so its commands run unchanged")
    group.add_argument("--patch-tokenizer-type", metavar="TYPE",
                       help="Qwen2Tokenizer (the only one for Qwen2.5; the tokenizer files come from --load)")
    group.add_argument("--load", metavar="DIR", help="the same as --tokenizer: a folder with the tokenizer files "
                                                     "(a Hugging Face checkpoint folder has them)")
    for flag, kind in (("--partitions", int), ("--log-interval", int), ("--extra-vocab-size", int)):
        group.add_argument(flag, type=kind, help="accepted, changes nothing here")
    group.add_argument("--keep-sequential-samples", action="store_true", help="accepted: input order is always kept")
    group.add_argument("--keep-newlines", action="store_true", help="accepted, changes nothing here")
    if tool == "pretrain":
        group.add_argument("--json-keys", nargs="+", metavar="KEY",
                           help="the fields to tokenize, one idxmap P_<KEY>_document each (--json-key for one)")
        group.add_argument("--seq-length", type=int, help="accepted, changes nothing here")
        group.add_argument("--split-sentences", action="store_true", help="refused: documents are kept whole")
    else:
        group.add_argument("--sequence-packing", action="store_true", help="the same as --packing")
        group.add_argument("--json-keys", nargs="+", metavar="KEY", help="text (the only SFT output)")
        group.add_argument("--append-eod", action="store_true", help="accepted, changes nothing here")
        group.add_argument("--padded-vocab-size", type=int, help="accepted, changes nothing here")
        group.add_argument("--debug", action="store_true", help="accepted, changes nothing here")


def settle_upstream_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, tool: str) -> list[str]:
    """Fold upstream's spellings into ours (args.tokenizer, args.packing); returns the note lines for flags that
    change nothing. A choice that cannot be honoured stops with parser.error (exit status 2)."""
    if args.patch_tokenizer_type is not None and args.patch_tokenizer_type not in QWEN_TOKENIZER_TYPES:
        parser.error(f"--patch-tokenizer-type {args.patch_tokenizer_type}: these tools write Qwen2.5 data; pass "
                     f"{' or '.join(QWEN_TOKENIZER_TYPES)} (the tokenizer files come from --load).")
    if args.load and args.tokenizer and args.load != args.tokenizer:
        parser.error(f"--load {args.load} and --tokenizer {args.tokenizer} name two tokenizers; pass one of them.")
    args.tokenizer = args.tokenizer or args.load
    if tool == "pretrain" and args.split_sentences:
        parser.error("--split-sentences is not supported: every document is written whole, as one sequence. Leave "
                     "the flag out.")
    if tool == "sft":
        args.packing = args.packing or args.sequence_packing
        if args.json_keys not in (None, ["text"]):
            parser.error(f"--json-keys {' '.join(args.json_keys)}: the SFT builder writes PREFIX_text_document and "
                         f"PREFIX_label_document from whole records; leave --json-keys out (or pass text).")
    no_effect = dict(_NO_EFFECT, **(_NO_EFFECT_PRETRAIN if tool == "pretrain" else _NO_EFFECT_SFT))
    notes = []
    for name, why in no_effect.items():
        value = getattr(args, name, None)
        if value not in (None, False):
            flag = "--" + name.replace("_", "-")
            notes.append(f"note: {flag}{'' if value is True else f' {value}'} changes nothing here: {why}.")
    return notes


def notes_and_dry_run(script: str, argv: list[str] | None, notes: list[str]) -> bool:
    """A preprocessing tool's start: its notes on stderr; under MP_DRY_RUN=1 its command on stdout and True (run
    nothing: how the shell scripts' arguments arrive is visible)."""
    from megatron_patch.errors import dry_run_requested

    for note in notes:
        print(note, file=sys.stderr)
    if not dry_run_requested():
        return False
    print(shlex.join([sys.executable, script, *(sys.argv[1:] if argv is None else argv)]))
    return True
