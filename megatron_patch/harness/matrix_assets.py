"""The GPU matrix's inputs: a tokenizer, a synthetic pre-training corpus and SFT records (tokenized by the project's
own toolkits), and the converted checkpoint every row starts from."""

from __future__ import annotations

import json
import random
import runpy
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_patch import hardware

REPO = Path(__file__).resolve().parents[2]
CONVERTOR = REPO / "toolkits" / "distributed_checkpoints_convertor" / "scripts" / "qwen2_5" / "run_8xH20.sh"
SEED = 1234
CITIES = ["北京", "上海", "杭州", "广州", "深圳", "成都", "武汉", "西安", "南京", "重庆"]
WEATHER = ["晴", "多云", "小雨", "大雨", "阴", "大风", "小雪"]
WORDS = ["苹果", "书", "河流", "山", "朋友", "音乐", "火车", "星星", "老师", "花园"]


def corpus_documents(count: int) -> list[str]:
    """Deterministic documents with structure a model learns within a few iterations."""
    rng = random.Random(SEED)
    docs = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(4, 16)):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            sentences.append(rng.choice([
                f"{rng.choice(CITIES)}今天{rng.choice(WEATHER)}，气温{rng.randint(-5, 35)}度。",
                f"{a}加{b}等于{a + b}。",
                f"The {rng.choice(['red', 'blue', 'green'])} train leaves at {rng.randint(1, 12)} o'clock.",
            ]))
        docs.append("".join(sentences))
    return docs


def sft_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        word, city = rng.choice(WORDS), rng.choice(CITIES)
        records.append(rng.choice([
            {"instruction": f"{a}加{b}等于多少？", "input": "", "output": f"{a}加{b}等于{a + b}。"},
            {"instruction": "把下面的词重复三遍。", "input": word, "output": word * 3},
            {"instruction": f"{city}今天天气怎么样？", "output": f"{city}今天{rng.choice(WEATHER)}。"},
        ]))
    return records


@dataclass(frozen=True)
class Assets:
    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pretrain_prefix(self) -> Path:
        return self.root / "corpus_text_document"

    @property
    def sft_json(self) -> Path:
        return self.root / "sft-train.json"

    @property
    def sft_valid_json(self) -> Path:
        return self.root / "sft-valid.json"

    def sft_prefix(self, seq_len: int, split: str = "train") -> Path:
        return self.root / f"sft-{split}-seq{seq_len}"


def _tool(script: str, argv: list[str]) -> None:
    """One of the project's data tools, in this process."""
    status = runpy.run_path(str(REPO / script))["main"](argv + ["--no-progress"])
    if status != 0:
        raise RuntimeError(f"{Path(script).name} exited with {status} while preparing the matrix's data")


def prepare_assets(root: Path, seq_lens: list[int], documents: int = 3000, records: int = 1000,
                   tokenizer: Path | None = None) -> Assets:
    """Tokenizer (a copy of `tokenizer`, else the default Qwen2.5 one), pre-training idxmap of `documents`, SFT JSON
    of `records` and SFT idxmaps (one per sequence length); each written once."""
    assets = Assets(Path(root))
    assets.root.mkdir(parents=True, exist_ok=True)
    if not (assets.tokenizer / "tokenizer_config.json").is_file():
        from megatron_patch.tokenizer import write_default_tokenizer

        if tokenizer is not None:
            shutil.copytree(tokenizer, assets.tokenizer, dirs_exist_ok=True)
        else:
            write_default_tokenizer(assets.tokenizer)
    if not Path(f"{assets.pretrain_prefix}.idx").is_file():
        corpus = assets.root / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                  for d in corpus_documents(documents)), encoding="utf-8")
        _tool("toolkits/pretrain_data_preprocessing/preprocess_data.py",
              ["--input", str(corpus), "--output-prefix", str(assets.root / "corpus"), "--tokenizer",
               str(assets.tokenizer)])
    for path, count, seed in ((assets.sft_json, records, SEED), (assets.sft_valid_json, records // 10, SEED + 1)):
        if not path.is_file():
            path.write_text(json.dumps(sft_records(count, seed), ensure_ascii=False), encoding="utf-8")
    for seq_len in seq_lens:
        for split, path in (("train", assets.sft_json), ("valid", assets.sft_valid_json)):
            prefix = assets.sft_prefix(seq_len, split)
            if not Path(f"{prefix}_label_document.idx").is_file():
                _tool("toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py",
                      ["--input", str(path), "--output-prefix", str(prefix), "--tokenizer", str(assets.tokenizer),
                       "--seq-length", str(seq_len)])
    return assets


def converted_checkpoint(work: Path, model_size: str, precision: str, assets: Assets) -> tuple[Path, str]:
    """work/mcore-SIZE: a random-init HF checkpoint converted by run_8xH20.sh, made once per machine; and how."""
    mcore = work / f"mcore-{model_size}"
    pr = "fp32" if precision == "fp32" else "bf16"
    how = (f"random-init HF Qwen2.5-{model_size} (write_random_hf_checkpoint, seed {SEED}), converted by "
           f"run_8xH20.sh {model_size} HF MCORE false {str(hardware.gpu_count() > 0).lower()} {pr}")
    if (mcore / "latest_checkpointed_iteration.txt").is_file():
        return mcore, how
    from megatron_patch.hf_checkpoint import write_random_hf_checkpoint

    hf = work / f"hf-{model_size}"
    shutil.rmtree(hf, ignore_errors=True)
    start = time.time()
    write_random_hf_checkpoint(model_size, hf, dtype="float32" if pr == "fp32" else "bfloat16", seed=SEED,
                               tokenizer_dir=assets.tokenizer)
    proc = subprocess.run(["bash", str(CONVERTOR), model_size, str(hf), str(mcore), "false",
                           str(hardware.gpu_count() > 0).lower(), pr], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"gpu_matrix: converted checkpoint ready in {time.time() - start:.0f} s: {mcore}", flush=True)
    return mcore, how


def write_random_hf_folder(size_name: str, folder: Path, tokenizer: Path) -> None:
    """A random Qwen2.5 HF folder as the releases ship it (5 GB bf16 shards, index, config, tokenizer), written
    tensor by tensor (a 7B one in a minute or two, with little memory; transformers' init takes far longer)."""
    import torch

    from megatron_patch.convert.hf_io import HFShardWriter
    from megatron_patch.convert.mapping import hf_shapes
    from megatron_patch.hf_checkpoint import TOKENIZER_FILES, hf_config_for
    from megatron_patch.model_sizes import get_size

    size = get_size(size_name)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    hf_config_for(size, overrides={"architectures": ["Qwen2ForCausalLM"]}).to_json_file(partial / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, partial / name)
    writer, generator = HFShardWriter(partial, 5 * 1000**3), torch.Generator().manual_seed(1234)
    for name, shape in hf_shapes(size).items():
        std = 1.0 if "norm" in name else 0.02
        writer.add(name, (torch.randn(shape, generator=generator) * std + (1.0 if "norm" in name else 0.0))
                   .to(torch.bfloat16))
    writer.close()
    partial.rename(folder)
