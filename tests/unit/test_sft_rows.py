"""The fine-tuning benchmark's data (megatron_patch/harness/sft_rows.py): the packed rows both sides train on are
our raw-JSON dataset's items in the order a run takes them, transformers' padding-free reading of them (position
ids restarting per sample, labels from our loss mask) gives each sample's own loss, and both sides count the same
real tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_patch.harness.sft_rows import SEED, PackedRows, prepare_sft_assets, real_tokens_per_s

SEQ_LEN = 160


@pytest.fixture(scope="module")
def assets(tmp_path_factory, default_tokenizer_dir):
    root = tmp_path_factory.mktemp("sft-assets")
    shutil.copytree(default_tokenizer_dir, root / "tokenizer")
    records = [{"instruction": f"{a}加{b}等于多少？" * (1 + a % 3), "input": "", "output": f"{a + b}。" * (1 + b % 4)}
               for a, b in zip(range(1, 40, 3), range(5, 70, 5))]
    parts = [root / "a.json", root / "b.json"]
    parts[0].write_text(json.dumps(records[:6], ensure_ascii=False), encoding="utf-8")
    parts[1].write_text(json.dumps(records[6:], ensure_ascii=False), encoding="utf-8")
    return prepare_sft_assets(root, parts, [SEQ_LEN])


def test_rows_are_our_datasets_items_in_the_order_a_run_trains_them(assets):
    from megatron_patch.data.sft_dataset import RawJSONSFTDataset
    from megatron_patch.tokenizer import load_tokenizer

    assert len(json.loads(assets.records.read_text(encoding="utf-8"))) == 13  # both files, in order
    ours = RawJSONSFTDataset(assets.records, load_tokenizer(assets.tokenizer), SEQ_LEN, 40, SEED, packing=True)
    rows = PackedRows(assets.rows_file(SEQ_LEN), global_batch=4)
    assert len(rows.real) == ours.row_count >= 3 and 0.5 < rows.fill < 1
    for step in range(40 // 4):  # several epochs: each one's own permutation
        items = [ours[i] for i in range(4 * step, 4 * step + 4)]
        (first, second) = rows.micro_batches(step, 2)
        assert torch.equal(torch.cat([first["input_ids"], second["input_ids"]]),
                           torch.stack([item["tokens"] for item in items]))
        assert torch.equal(first["position_ids"], torch.stack([item["position_ids"] for item in items[:2]]))
        # Real tokens: the samples' own, not the padding run at a row's end (its own segment id).
        padding = [int((item["segment_ids"] == item["segment_ids"].max()).sum()) * bool(item["tokens"][-1] == 151643)
                   for item in items]
        assert rows.tokens(step) == sum(SEQ_LEN - n for n in padding)
        # transformers shifts labels itself: a label at j exactly where our loss mask marks j - 1.
        labels = torch.cat([first["labels"], second["labels"]])
        mask = torch.stack([item["loss_mask"] for item in items]).bool()
        assert torch.equal(labels[:, 1:] != -100, mask[:, :-1]) and (labels[:, 0] == -100).all()
        assert torch.equal(labels[:, 1:][mask[:, :-1]], torch.stack([item["labels"] for item in items])[:, :-1][
            mask[:, :-1]])


def test_transformers_reads_a_packed_row_as_separate_samples(assets):
    """Padding-free rows through transformers' SDPA attention (no cache: with one it ignores the position ids)
    give the loss of each sample run alone."""
    from megatron_patch.hf_checkpoint import random_hf_model

    rows = PackedRows(assets.rows_file(SEQ_LEN), global_batch=1)
    model = random_hf_model("tiny", "float32")
    model.config._attn_implementation = "sdpa"
    row = next(r for r in range(len(rows.lengths)) if len(rows.lengths[r]) >= 2)
    step = next(s for s in range(64) if rows.rows_of_step(s) == [row])
    (batch,) = rows.micro_batches(step, 1)
    packed = model(**batch, use_cache=False).loss
    total, count, start = 0.0, 0, 0
    for length in rows.lengths[row]:
        labels = batch["labels"][:, start:start + length]
        alone = model(input_ids=batch["input_ids"][:, start:start + length], labels=labels, use_cache=False)
        label_count = int((labels[:, 1:] != -100).sum())
        total, count, start = total + alone.loss * label_count, count + label_count, start + length
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=1e-5)
    across = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss  # no position ids
    assert abs(float(across - packed)) > 1e-4


def test_our_real_token_rate_counts_each_timed_iterations_rows(assets):
    from megatron_patch.harness.iteration_log import qwen_iteration_line

    rows = PackedRows(assets.rows_file(SEQ_LEN), global_batch=2)
    padded = 2 * SEQ_LEN
    # Iterations 2..5 logged (the first has no rate), each taking 0.5 s: padded tokens / 0.5 s each.
    log = "\n".join(qwen_iteration_line(i, padded / 0.5) for i in range(2, 6))
    assert real_tokens_per_s(log, rows, skip=1) == pytest.approx(sum(rows.tokens(i - 1) for i in (3, 4, 5)) / 1.5)
    assert rows.attention_span <= max(n for row in rows.lengths for n in row)


def test_the_hf_loop_trains_lora_on_the_rows_and_counts_their_real_tokens(assets, monkeypatch):
    """hf_throughput on the CPU (tiny model, peft LoRA on every linear layer, no compile): only the adapters
    train, and the rate is the timed steps' real tokens over their time."""
    from megatron_patch.harness import hf_baseline

    import torch

    rows = PackedRows(assets.rows_file(SEQ_LEN), global_batch=4)
    timed, trained = [], []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: trained.extend(params) or adamw(trained, **kw))
    monkeypatch.setattr(hf_baseline, "_timed", lambda step, steps, warmup, cuda, distributed:
                        [step(i) for i in range(warmup + steps)] and timed.append((warmup, steps)) or 2.0)
    run = hf_baseline.HFRun("tiny", SEQ_LEN, 2, 4, pure_bf16=False, compile_mode=None, lora_rank=4)
    rate, peak, skips = hf_baseline.hf_throughput(run, steps=2, warmup=1, data=rows)
    assert timed == [(1, 2)] and rate == (rows.tokens(1) + rows.tokens(2)) / 2.0 and (peak, skips) == (0.0, 0)
    # rank 4 on q, k, v, o, gate, up, down of 2 layers (hidden 64, 2 of 4 heads' width for k/v, ffn 128)
    assert sum(p.numel() for p in trained) == 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128)
                                                       + (128 + 64))
    assert all(p.dtype == torch.float32 for p in trained)  # (a): fp32 adapters over the bf16 base


def test_random_hf_folder_is_one_transformers_and_the_launcher_take(tmp_path, default_tokenizer_dir):
    """The benchmarks' LoRA base (written tensor by tensor, no transformers init): a folder transformers loads with
    every weight present, the launcher reads as the size it was written for, and no partial folder beside it."""
    from transformers import Qwen2ForCausalLM

    from megatron_patch.convert.hf_direct import hf_model
    from megatron_patch.harness.matrix_assets import write_random_hf_folder
    from megatron_patch.model_sizes import get_size

    folder = tmp_path / "hf-tiny"
    write_random_hf_folder("tiny", folder, default_tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-tiny"]
    model, info = Qwen2ForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert (folder / "tokenizer_config.json").is_file()
    assert hf_model(folder) == get_size("tiny")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert abs(weight.float().std().item() - 0.02) < 0.002 and weight.dtype == torch.bfloat16
