"""Pre-training preprocessing throughput against plain Hugging Face batch encoding, on People's Daily 1998-01.

  python -m benchmarks.preprocess_throughput [--workers 2] [--repeat 2] [--tokenizer DIR]

Baseline: one process calling the HF tokenizer on batches of 1,000 documents (encoding only: no JSON, no EOD, no
writing), once with the tokenizers library's own threads (its default) and once single-threaded
(TOKENIZERS_PARALLELISM=false). Ours: preprocess_data's full path (JSONL parsing, encoding in --workers spawned
processes, EOD, .bin/.idx writing), timed from the first line read to the files renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BASELINE = """
import json, sys, time
from megatron_patch.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
start = time.perf_counter()
tokens = sum(len(ids) for i in range(0, len(texts), 1000)
             for ids in tok(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}))
"""


def run_baseline(tokenizer_dir: Path, corpus: Path, threads: bool) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if threads else "false")
    out = subprocess.run([sys.executable, "-c", BASELINE, str(tokenizer_dir), str(corpus)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the corpus (about 1.2M tokens each)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: write the Qwen2.5 one to a temp dir)")
    args = parser.parse_args()

    from examples.qwen2_5.sample_corpora import peoples_daily_paragraphs
    from megatron_patch.data.pretrain_preprocess import preprocess_pretrain_corpus
    from megatron_patch.tokenizer import write_default_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_dir = Path(args.tokenizer) if args.tokenizer else write_default_tokenizer(tmp / "tokenizer")
        corpus = tmp / "peoples_daily.jsonl"
        paragraphs = peoples_daily_paragraphs()
        with open(corpus, "w", encoding="utf-8") as f:
            for _ in range(args.repeat):
                for text in paragraphs:
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        chars = sum(map(len, paragraphs)) * args.repeat
        print(f"corpus: People's Daily 1998-01 x{args.repeat}: {len(paragraphs) * args.repeat:,} documents, "
              f"{chars:,} characters; {os.cpu_count()} CPU cores")

        rows = []
        for threads in (True, False):
            result = run_baseline(tokenizer_dir, corpus, threads)
            label = "HF batch encode, 1 process" + (" (tokenizers threads on)" if threads else " (1 thread)")
            rows.append((label, result["tokens"], result["seconds"]))
        for workers in sorted({1, args.workers}):
            _, stats = preprocess_pretrain_corpus([corpus], tmp / f"out{workers}", tokenizer_dir, workers=workers,
                                                  show_progress=False)
            rows.append((f"preprocess_data --workers {workers} (parse+encode+write)", stats.tokens, stats.seconds))

        for label, tokens, seconds in rows:
            print(f"{label:<58} {tokens:>12,} tokens {seconds:>7.2f}s {tokens / seconds:>12,.0f} tokens/s")
        ours = rows[-1][1] / rows[-1][2]
        for label, tokens, seconds in rows[:2]:
            print(f"ratio preprocess_data --workers {args.workers} / {label}: {ours / (tokens / seconds):.2f}x")


if __name__ == "__main__":
    main()
