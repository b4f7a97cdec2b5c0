"""SFT samples: chat-template rendering with an answer mask, and the packing plan. The one code path that both
the idxmap preprocessor and the on-the-fly raw JSON dataset use, so they cannot disagree.

Accepted records:
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
  messages  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}
  ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt"|..., "value": ...}, ...]}
A record must have something to train on (alpaca's "output", at least one assistant turn), start with a user
turn (after any system prompt) and not repeat a role in consecutive turns (tool results excepted). An item of
the input may also be a list of records: Pai-Megatron-Patch's form for "pack these together" (sft_group).

The answer mask is 1 on exactly each assistant turn's answer tokens and its <|im_end|>, and 0 on everything
else: system and user turns, each "<|im_start|>assistant\\n" header and the "\\n" after <|im_end|>.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from megatron_patch.tokenizer import IM_END_TOKEN, IM_END_TOKEN_ID

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "observation": "tool",
}


class SFTRecordError(ValueError):
    """A record that is not alpaca, messages or ShareGPT shaped; the message says what is wrong."""


@dataclass
class SFTSample:
    tokens: np.ndarray  # int32 token ids, at most max_length
    answer_mask: np.ndarray  # uint8, 1 where the token is part of an assistant answer (its <|im_end|> included)
    truncated: bool  # the rendered conversation was longer than max_length and was cut

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_empty(self) -> bool:
        """No answer text left (empty answers, or cut away by truncation): at most it teaches to stop at once."""
        return not (self.answer_mask.astype(bool) & (self.tokens != IM_END_TOKEN_ID)).any()


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SFTRecordError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _alpaca_messages(record: dict) -> list[dict]:
    messages = []
    system = _text(record.get("system"), "'system'")
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise SFTRecordError("'history' must be a list of [user, assistant] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise SFTRecordError(f"'history'[{i}] must be a [user, assistant] pair")
        messages.append({"role": "user", "content": _text(turn[0], f"'history'[{i}][0]")})
        messages.append({"role": "assistant", "content": _text(turn[1], f"'history'[{i}][1]")})
    instruction = _text(record.get("instruction"), "'instruction'")
    extra_input = _text(record.get("input"), "'input'")
    prompt = f"{instruction}\n{extra_input}" if instruction and extra_input else instruction or extra_input
    if record.get("output") is None:
        raise SFTRecordError("no 'output': the record has no answer to train on")
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(record["output"], "'output'")})
    return messages


def _turns_to_messages(turns: Any, role_key: str, content_key: str, field: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise SFTRecordError(f"'{field}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SFTRecordError(f"'{field}'[{i}] must be an object")
        # Accept either spelling inside either list: mixed exports are common.
        role = turn.get(role_key, turn.get("role", turn.get("from")))
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        if role not in ROLE_ALIASES:
            raise SFTRecordError(f"'{field}'[{i}] has role {role!r}; expected one of {sorted(ROLE_ALIASES)}")
        message = {"role": ROLE_ALIASES[role], "content": _text(content, f"'{field}'[{i}] content")}
        if turn.get("tool_calls"):
            message["tool_calls"] = turn["tool_calls"]
        messages.append(message)
    return messages


def record_to_messages(record: Any) -> list[dict]:
    """Normalise an alpaca / messages / ShareGPT record to chat messages [{"role", "content"}]."""
    if not isinstance(record, dict):
        raise SFTRecordError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _turns_to_messages(record["messages"], "role", "content", "messages")
    elif "conversations" in record:
        messages = _turns_to_messages(record["conversations"], "from", "value", "conversations")
    elif "instruction" in record or "output" in record:
        messages = _alpaca_messages(record)
    else:
        keys = ", ".join(list(record)[:8])
        raise SFTRecordError(
            f"not an SFT record (keys: {keys}); expected 'messages', 'conversations' (ShareGPT) "
            f"or alpaca 'instruction'/'input'/'output'"
        )
    first_turn = next((m for m in messages if m["role"] != "system"), None)
    if first_turn is not None and first_turn["role"] == "assistant":
        raise SFTRecordError("the conversation starts with an assistant turn; the first turn must be the user's")
    if not any(m["role"] == "assistant" for m in messages):
        raise SFTRecordError("the conversation has no assistant turn: nothing to train on")
    for i in range(1, len(messages)):
        role = messages[i]["role"]
        if role == messages[i - 1]["role"] and role != "tool":  # several tool results in a row are one reply
            raise SFTRecordError(f"turns [{i - 1}] and [{i}] are both {role} turns; user and assistant turns must "
                                 f"alternate (merge the two turns)")
    return messages


def sft_group(item: Any) -> list[dict]:
    """The records of one input item: a record, or a non-empty list of records to pack together (each checked
    with record_to_messages; an error names the element)."""
    if isinstance(item, dict):
        record_to_messages(item)
        return [item]
    if not isinstance(item, list) or not item:
        what = "an empty list" if isinstance(item, list) else type(item).__name__
        raise SFTRecordError(f"expected a JSON object, or a list of them to pack together; got {what}")
    for i, record in enumerate(item):
        try:
            record_to_messages(record)
        except SFTRecordError as e:
            raise SFTRecordError(f"[{i}] of the list: {e}") from None
    return item


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant answer + <|im_end|>.

    Each span is found by rendering the conversation up to that turn: the prompt with the generation header
    ends where the answer starts, and the turn rendered in full ends just after its <|im_end|> (+ "\\n").
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], add_generation_prompt=True)
        with_turn = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (with_turn.startswith(prompt) and full.startswith(with_turn)):
            raise SFTRecordError(
                "the chat template does not render turns as prefixes of the whole conversation; "
                "answer masks need a ChatML-style template such as Qwen2.5's"
            )
        end = with_turn.rfind(IM_END_TOKEN, len(prompt))
        if end < 0:
            raise SFTRecordError(f"the chat template did not close assistant turn {k} with {IM_END_TOKEN}")
        spans.append((len(prompt), end + len(IM_END_TOKEN)))
    return full, spans


def _encode_pieces(tokenizer, pieces: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(pieces, add_special_tokens=False)]
    return [tokenizer.encode(p, add_special_tokens=False) for p in pieces]


def build_sft_sample(record: Any, tokenizer, max_length: int) -> SFTSample:
    """Token ids and answer mask of one SFT record, cut to `max_length` tokens (then `truncated` is True).

    Prompt and answer pieces are tokenized separately, so no token straddles a prompt/answer boundary; for
    answers that do not start with whitespace this gives the same ids as tokenizing the whole rendered text.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    messages = record_to_messages(record)
    full, spans = answer_char_spans(tokenizer, messages)
    pieces, is_answer, cursor = [], [], 0
    for start, end in spans:
        pieces += [full[cursor:start], full[start:end]]
        is_answer += [False, True]
        cursor = end
    pieces.append(full[cursor:])
    is_answer.append(False)
    kept = [(p, a) for p, a in zip(pieces, is_answer) if p]
    encoded = _encode_pieces(tokenizer, [p for p, _ in kept])
    tokens = np.fromiter((t for ids in encoded for t in ids), dtype=np.int32)
    mask = np.concatenate([np.full(len(ids), a, dtype=np.uint8) for ids, (_, a) in zip(encoded, kept)])
    truncated = len(tokens) > max_length
    return SFTSample(tokens[:max_length], mask[:max_length], truncated)


# ---- packing ----


def split_group(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Rows of a group's samples in their order, a new row where the next sample would pass `seq_length` (what
    Pai-Megatron-Patch's builder does with a list of records)."""
    rows: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        if not rows or n > room:
            rows.append([])
            room = seq_length
        rows[-1].append(i)
        room -= n
    return rows


def plan_packing(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Group sample indices into rows of at most `seq_length` tokens (best-fit decreasing).

    Deterministic: ties keep input order, samples inside a row are in input order, and rows are ordered by
    their first sample. A sample longer than `seq_length` is an error: truncate first (build_sft_sample does).
    """
    import bisect

    too_long = [i for i, n in enumerate(lengths) if n > seq_length]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens > seq_length {seq_length}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted: best fit = first entry >= length
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
        else:
            room, row = seq_length, len(rows)
            rows.append([i])
        bisect.insort(free, (room - n, row))
    for row in rows:
        row.sort()
    rows.sort(key=lambda row: row[0])
    return rows
