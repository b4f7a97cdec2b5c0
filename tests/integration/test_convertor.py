"""HF <-> Megatron torch_dist conversion of Qwen2.5: bit-exact round trips, logit parity, training from a converted
checkpoint with other TP/PP layouts, converting a TP=2 training checkpoint back, and clean failures.

Conversions run the real CLI / toolkit scripts in subprocesses (Megatron keeps its setup in process globals).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from training_utils import CONVERTOR, LAYOUT_ITERS, OLD_CONVERTOR_SCRIPT, run_tool

from megatron_patch.convert.mapping import (
    GateUpFused,
    QKVFused,
    canonical_mcore_name,
    hf_shapes,
    mcore_shapes,
    qwen2_5_mappings,
    stacked_key,
)
from megatron_patch.errors import UserError
from megatron_patch.model_sizes import Qwen25Size, YarnScaling, model_from_hf_config

pytestmark = pytest.mark.timeout(900)

RUN_8X = CONVERTOR / "scripts" / "qwen2_5" / "run_8xH20.sh"

# Real Qwen2.5 head / kv-head ratios, scaled down: 0.5B-like (14 heads / 2 kv, tied) and 7B-like (28 / 4, untied).
# The tied one has Qwen2.5-Math's RoPE base and positions (rope_theta 10000, 4096), which config.json carries
# through the conversion and back.
SHAPES = {
    "tied": Qwen25Size(2, 224, 14, 2, 256, 151936, True, 1e-6, 4096, rope_theta=10000.0),
    "untied": Qwen25Size(2, 224, 28, 4, 256, 152064, False, 1e-6, 4096),
}
HF_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def convert(*flags) -> subprocess.CompletedProcess:
    return run_tool([sys.executable, "-m", "megatron_patch.convert", *flags])


def safetensors_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def logit_check(stdout: str) -> tuple[float, float, float]:
    number = r"([-+0-9.eE]+|nan|inf)"
    m = re.search(rf"max abs logit diff {number}; loss HF {number} vs Megatron {number}", stdout)
    assert m, stdout[-3000:]
    return tuple(float(g) for g in m.groups())


def partial_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------------------------------------------------------
# The mapping table itself
# ---------------------------------------------------------------------------------------------------------------


def test_qkv_fusion_follows_megatron_group_layout():
    size = Qwen25Size(1, 16, 4, 2, 8, 10, True, 1e-6, 64)  # 2 groups of 2 q heads, head_dim 4
    q = torch.arange(16 * 16).reshape(16, 16).float()
    k = -torch.arange(8 * 16).reshape(8, 16).float() - 1
    v = torch.arange(8 * 16).reshape(8, 16).float() + 10_000
    m = QKVFused("x", ("q", "k", "v"), ("qkv", "hidden"))
    fused = m.to_mcore([q, k, v], size)
    # group 0: q heads 0-1 (rows 0-7), k head 0, v head 0; then group 1 likewise
    expected = torch.cat([q[0:8], k[0:4], v[0:4], q[8:16], k[4:8], v[4:8]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(m.to_hf(fused, size), (q, k, v)))
    bias = m.to_mcore([q[:, 0], k[:, 0], v[:, 0]], size)
    assert torch.equal(bias, expected[:, 0])
    g = GateUpFused("y", ("gate", "up"), ("gate_up", "hidden"))
    assert all(torch.equal(a, b) for a, b in zip(g.to_hf(g.to_mcore([q, q + 1], size), size), (q, q + 1)))


def test_a_tensor_parallel_shard_is_the_fusion_of_the_hf_tensors_shards():
    """What training straight from a HF folder relies on (megatron_patch.convert.hf_direct): at TP=2 a rank's
    linear_qkv rows are its query groups' (a contiguous half of the fused tensor) and its linear_fc1 rows are
    [its gate half; its up half] (megatron-core's per-rank SwiGLU layout, not a half of [gate; up])."""
    from megatron_patch.convert.hf_direct import shard_split

    size = Qwen25Size(1, 16, 4, 2, 8, 10, True, 1e-6, 64)
    q, k, v = torch.randn(16, 16), torch.randn(8, 16), torch.randn(8, 16)
    gate, up = torch.randn(8, 16), torch.randn(8, 16)
    qkv = QKVFused("x", ("q", "k", "v"), ("qkv", "hidden"))
    fc1 = GateUpFused("y", ("gate", "up"), ("gate_up", "hidden"))
    for rank in range(2):
        shards = [t.chunk(2)[rank] for t in (q, k, v)]
        assert torch.equal(qkv.to_mcore(shards, size), qkv.to_mcore([q, k, v], size).chunk(2)[rank])
        assert torch.equal(fc1.to_mcore([gate.chunk(2)[rank], up.chunk(2)[rank]], size),
                           torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]))
    assert shard_split("w", (32, 16), (16, 16), 2) == (0, 2) and shard_split("o", (16, 16), (16, 8), 2) == (1, 2)
    assert shard_split("norm", (16,), (16,), 2) == (0, 1)
    with pytest.raises(UserError, match="no 4-way tensor-parallel shard"):
        shard_split("vocab", (20, 16), (20, 8), 4)


def test_table_covers_every_hf_tensor_once_and_local_names_map_to_te_names():
    from transformers import Qwen2ForCausalLM

    from megatron_patch.hf_checkpoint import hf_config_for

    for size in SHAPES.values():
        table = qwen2_5_mappings(size)
        hf_names = [n for m in table for n in m.hf]
        assert len(hf_names) == len(set(hf_names))
        # The shapes derived from the table are those of transformers' own Qwen2 model (built without memory).
        with torch.device("meta"):
            model = Qwen2ForCausalLM(hf_config_for(size))
        hf_model = {name: tuple(p.shape) for name, p in model.named_parameters()}
        assert hf_shapes(size) == hf_model
        assert ("output_layer.weight" in mcore_shapes(size)) == (not size.tie_word_embeddings)
    assert canonical_mcore_name("decoder.layers.3.input_layernorm.weight") == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert canonical_mcore_name("decoder.layers.0.pre_mlp_layernorm.weight") == \
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert stacked_key("decoder.layers.7.mlp.linear_fc2.weight") == ("decoder.layers.mlp.linear_fc2.weight", 7)


# ---------------------------------------------------------------------------------------------------------------
# Round trips and logit parity
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, default_tokenizer_dir) -> dict[tuple[str, str], Path]:
    from megatron_patch.hf_checkpoint import write_random_hf_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return {
        (kind, pr): write_random_hf_checkpoint(size, root / f"{kind}_{pr}", dtype=HF_DTYPE[pr], seed=7,
                                               tokenizer_dir=default_tokenizer_dir)
        for kind, size in SHAPES.items() for pr in HF_DTYPE
    }


@pytest.fixture(scope="module")
def round_trips(hf_models, tmp_path_factory):
    """Every (tied/untied, fp32/bf16) model HF -> Megatron -> HF. fp32 runs the Python CLI with --check-logits,
    bf16 the upstream script (bf16 back with 40 MB shards, so the output has several)."""
    root = tmp_path_factory.mktemp("round_trips")

    def round_trip(kind: str, pr: str, hf: Path) -> dict:
        mcore, back = root / f"{kind}_{pr}_mcore", root / f"{kind}_{pr}_hf"
        if pr == "fp32":
            there = convert("--model-size", "auto", "--load-dir", hf, "--save-dir", mcore, "--precision", pr,
                            "--check-logits")
            again = convert("--mg2hf", "true", "--model-size", "auto", "--load-dir", mcore, "--save-dir", back,
                            "--hf-dir", hf, "--precision", pr, "--check-logits")
        else:
            there = run_tool(["bash", RUN_8X, "auto", hf, mcore, "false", "false", pr], cwd=root)
            again = run_tool(["bash", RUN_8X, "auto", mcore, back, "true", "false", pr, hf, "--max-shard-size",
                              "40MB"], cwd=Path("/"))
        return dict(hf=hf, mcore=mcore, back=back, there=there, again=again)

    # Two at a time: each conversion is mostly a single-threaded interpreter start.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(round_trip, *key, hf) for key, hf in hf_models.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("pr", list(HF_DTYPE))
def test_hf_to_megatron_to_hf_is_bit_exact(round_trips, kind, pr):
    r = round_trips[kind, pr]
    original, back = safetensors_dict(r["hf"]), safetensors_dict(r["back"])
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[pr], name
        assert torch.equal(back[name], tensor), name
    index = json.loads((r["back"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert {f.name for f in r["back"].glob("*.safetensors")} == set(index["weight_map"].values())
    if pr == "bf16":
        assert len(set(index["weight_map"].values())) > 1, "40 MB shards: the output must be split"


@pytest.mark.parametrize("kind", list(SHAPES))
def test_config_and_tokenizer_files_come_through_and_output_loads_in_transformers(round_trips, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = round_trips[kind, "bf16"]
    for name in SIDE_FILES:
        assert (r["mcore"] / name).read_bytes() == (r["hf"] / name).read_bytes(), name
        if name != "config.json":
            assert (r["back"] / name).read_bytes() == (r["hf"] / name).read_bytes(), name
    config_in, config_out = (json.loads((d / "config.json").read_text()) for d in (r["hf"], r["back"]))
    assert config_out.pop("dtype", config_out.pop("torch_dtype", None)) == "bfloat16"
    config_in.pop("dtype", None), config_in.pop("torch_dtype", None)
    assert config_out == config_in
    model = AutoModelForCausalLM.from_pretrained(r["back"])
    assert model.config.tie_word_embeddings == SHAPES[kind].tie_word_embeddings
    assert AutoTokenizer.from_pretrained(r["back"])("hello world")["input_ids"]


@pytest.mark.parametrize("kind", list(SHAPES))
def test_logits_match_transformers_through_the_entrypoint_model_provider(round_trips, kind):
    r = round_trips[kind, "fp32"]
    for proc in (r["there"], r["again"]):
        diff, hf_loss, mc_loss = logit_check(proc.stdout)
        assert diff <= 1e-5, proc.stdout
        assert abs(hf_loss - mc_loss) <= 1e-5, proc.stdout
        assert 5.0 < hf_loss < 20.0  # a real loss over a ~150k vocab, not a degenerate one


def test_checkpoint_layout_is_a_megatron_release_with_te_key_names(round_trips):
    from torch.distributed.checkpoint import FileSystemReader

    mcore = round_trips["untied", "bf16"]["mcore"]
    assert (mcore / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert json.loads((mcore / "release" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    keys = set(FileSystemReader(str(mcore / "release")).read_metadata().state_dict_metadata)
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)
    assert "output_layer.weight" in keys and not any(k.startswith("optimizer") for k in keys)
    assert "common_state/shard_0_1" in keys or any(k.startswith("common_state") for k in keys)
    assert not partial_leftovers(mcore.parent)


# ---------------------------------------------------------------------------------------------------------------
# YaRN (config.json's rope_scaling, or a run's MP_ROPE_SCALING) there and back
# ---------------------------------------------------------------------------------------------------------------

# The tied (Math-like) model with YaRN x4 over 16 original positions: the logit check's 32 tokens reach past them.
YARN = dataclasses.replace(SHAPES["tied"], max_position_embeddings=16, rope_scaling=YarnScaling(4.0, 16))


@pytest.fixture(scope="module")
def yarn_round_trip(hf_models, tmp_path_factory, default_tokenizer_dir) -> dict:
    """fp32 with --check-logits: there by the older script with MODEL_SIZE=auto; back by run_8xH20.sh with auto
    and the tied model's folder as HF_DIR, whose config.json has no rope_scaling (as a run trained with
    MP_ROPE_SCALING=yarn:4 converts back)."""
    from megatron_patch.hf_checkpoint import write_random_hf_checkpoint

    root = tmp_path_factory.mktemp("yarn")
    hf = write_random_hf_checkpoint(YARN, root / "hf", dtype="float32", seed=4, tokenizer_dir=default_tokenizer_dir)
    check = ["--check-logits", "--logits-tolerance", "1e-4"]
    there = run_tool(["bash", OLD_CONVERTOR_SCRIPT, "auto", hf, root / "mcore", "1", "1", "fp32", "false", "false",
                      "", *check])
    back = run_tool(["bash", RUN_8X, "auto", root / "mcore", root / "back", "true", "false", "fp32",
                     hf_models["tied", "fp32"], *check])
    return dict(hf=hf, back=root / "back", there=there, again=back)


def test_yarn_logits_match_transformers_past_the_original_positions_and_conversion_back_records_it(yarn_round_trip):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_patch.convert.convertor import check_tokens

    r = yarn_round_trip
    tokens = check_tokens(YARN)
    assert tokens.shape[1] > YARN.rope_scaling.original_max_position_embeddings
    for proc in (r["there"], r["again"]):
        diff, hf_loss, mc_loss = logit_check(proc.stdout)
        assert diff <= 1e-4 and abs(hf_loss - mc_loss) <= 1e-4, proc.stdout
    # Back with the plain model's config.json as HF_DIR: the checkpoint's saved arguments put YaRN in.
    assert ('rope_scaling {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16} (HF_DIR: none): '
            "the output's config.json records it") in r["again"].stderr
    back = json.loads((r["back"] / "config.json").read_text())
    assert model_from_hf_config(back) == dataclasses.replace(SHAPES["tied"], rope_scaling=YARN.rope_scaling)
    # The check tells YaRN's attention scaling apart: transformers multiplies cos and sin by 0.1 ln(4) + 1,
    # megatron-core's attention by its concentration factor; without it the logits move 10x the tolerance.
    unscaled = AutoConfig.from_pretrained(r["hf"])
    unscaled.rope_parameters = {**unscaled.rope_parameters, "attention_factor": 1.0}
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(r["hf"], dtype=torch.float32, **kw).eval()(tokens).logits
                  for kw in ({}, {"config": unscaled})]
    assert (logits[0] - logits[1]).abs().max() > 10 * 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Training from a converted checkpoint, and a training checkpoint back to HF
# ---------------------------------------------------------------------------------------------------------------


def test_every_layout_starts_from_the_converted_release_checkpoint(layout_runs):
    # conftest.layout_runs trains TP1, TP2, PP2 and DP2 from the converted checkpoint; test_training checks that
    # their losses agree (same first loss in every layout: the checkpoint loads alike into each).
    for name, r in layout_runs.items():
        assert "loading release distributed checkpoint" in r["log"], name
        assert sorted(r["losses"]) == list(range(1, LAYOUT_ITERS + 1)), name


def test_tp2_training_checkpoint_converts_back_and_equals_a_tp1_load(layout_runs, tiny_hf_checkpoint,
                                                                     tmp_path):
    from torch.distributed.checkpoint import FileSystemReader, load
    from transformers import AutoModelForCausalLM

    from megatron_patch.model_sizes import get_size

    ckpt = layout_runs["tp2"]["work"] / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(LAYOUT_ITERS)
    last = ckpt / f"iter_{LAYOUT_ITERS:07d}"
    out = tmp_path / "hf"
    proc = run_tool(["bash", OLD_CONVERTOR_SCRIPT, "tiny", ckpt, out, "1", "1", "fp32", "false", "true",
                     tiny_hf_checkpoint, "--check-logits"])
    diff, hf_loss, mc_loss = logit_check(proc.stdout)
    assert diff <= 1e-4 and abs(hf_loss - mc_loss) <= 1e-5, proc.stdout

    # Reference: the checkpoint's global (TP=1) tensors read whole, then split as a TP=1 model holds them.
    size = get_size("tiny")
    meta = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    wanted = {stacked_key(n)[0] for n in mcore_shapes(size)}
    full = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in wanted}
    load(full, storage_reader=FileSystemReader(str(last)), no_dist=True)
    back = safetensors_dict(out)
    original = safetensors_dict(tiny_hf_checkpoint)
    assert set(back) == set(original)
    trained = 0
    for m in qwen2_5_mappings(size):
        key, layer = stacked_key(m.mcore)
        if key not in full:
            continue
        tensor = full[key] if layer is None else full[key][layer]
        for name, t in zip(m.hf, m.to_hf(tensor, size)):
            assert torch.equal(back[name], t), name
            trained += not torch.equal(back[name], original[name])
    assert trained > 0, "training must have moved the weights"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.embed_tokens.weight, back["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written
# ---------------------------------------------------------------------------------------------------------------


def assert_fails_cleanly(proc: subprocess.CompletedProcess, save_dir: Path, *phrases: str) -> None:
    assert proc.returncode != 0
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not save_dir.exists()
    assert not partial_leftovers(save_dir.parent)


def test_named_size_that_disagrees_with_config_is_an_error(hf_models, tmp_path):
    out = tmp_path / "out"
    proc = run_tool(["bash", RUN_8X, "0.5B", hf_models["tied", "bf16"], out, "false", "false", "bf16"], check=False)
    assert_fails_cleanly(proc, out, "MODEL_SIZE=0.5B does not match", "num_hidden_layers")


def test_missing_and_unknown_tensors_are_named(hf_models, tmp_path):
    from safetensors.torch import save_file

    src = hf_models["untied", "bf16"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = safetensors_dict(src)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    proc = run_tool(["bash", RUN_8X, "auto", broken, out, "false", "false", "bf16"], check=False)
    assert_fails_cleanly(proc, out, "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_norm.weight")


def test_mg2hf_without_hf_dir_and_bad_arguments_are_errors(round_trips, tmp_path):
    mcore = round_trips["tied", "bf16"]["mcore"]
    out = tmp_path / "out"
    proc = run_tool(["bash", RUN_8X, "auto", mcore, out, "true", "false", "bf16"], check=False)
    assert_fails_cleanly(proc, out, "needs HF_DIR")
    hf = round_trips["tied", "bf16"]["hf"]
    proc = run_tool(["bash", RUN_8X, "auto", hf, out, "false", "false", "fp8"], check=False)
    assert_fails_cleanly(proc, out, "PR must be one of fp32, bf16, fp16")
    proc = run_tool(["bash", OLD_CONVERTOR_SCRIPT, "auto", hf, out, "4", "1", "bf16", "true", "false"], check=False)
    assert_fails_cleanly(proc, out, "TP=4 must divide the 14 attention heads and 2 key/value heads")
    proc = run_tool(["bash", RUN_8X, "auto", tmp_path / "nowhere", out, "false", "false", "bf16"], check=False)
    assert_fails_cleanly(proc, out, "does not exist")


def test_save_dir_holding_or_inside_load_dir_is_refused_and_the_input_survives(hf_models, tmp_path):
    """The issue's command (SAVE_DIR a parent of LOAD_DIR, --overwrite) once deleted its source."""
    parent = tmp_path / "parent"
    hf = parent / "hf"
    shutil.copytree(hf_models["tied", "bf16"], hf)
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    (tmp_path / "link").symlink_to(parent)
    cases = [(parent, f"SAVE_DIR {parent} contains LOAD_DIR {hf}"),
             (tmp_path / "link" / "hf" / "out", f"SAVE_DIR {hf / 'out'} lies inside LOAD_DIR {hf}"),
             (tmp_path / "link", f"SAVE_DIR {parent} contains LOAD_DIR {hf}")]
    for save_dir, message in cases:
        proc = run_tool(["bash", RUN_8X, "auto", hf, save_dir, "false", "false", "fp32", "", "--overwrite"],
                        check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert not partial_leftovers(parent) and not partial_leftovers(tmp_path)


def test_corrupt_inputs_are_named_with_what_is_wrong(tiny_hf_checkpoint, converted_tiny, tmp_path):
    def fails_naming(load_dir: Path, mg2hf: str, *phrases: str) -> None:
        out = tmp_path / "out"
        hf_dir = [tiny_hf_checkpoint] if mg2hf == "true" else []
        proc = run_tool(["bash", RUN_8X, "tiny", load_dir, out, mg2hf, "false", "bf16", *hf_dir], check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert_fails_cleanly(proc, out, *phrases)

    hf = tmp_path / "hf_damaged"
    shutil.copytree(tiny_hf_checkpoint, hf, ignore=shutil.ignore_patterns("eval_results"))
    shard = hf / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fails_naming(hf, "false", f"{shard} (", "not a readable safetensors file", "incomplete metadata")

    mcore = tmp_path / "mcore_damaged"
    shutil.copytree(converted_tiny, mcore)
    (distcp,) = (mcore / "release").glob("*.distcp")
    size = distcp.stat().st_size
    os.truncate(distcp, size // 3)
    fails_naming(mcore, "true", f"{distcp} is truncated ({size // 3} bytes", "interrupted save or copy")
    metadata = mcore / "release" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    fails_naming(mcore, "true", f"{metadata} is unreadable")
    (mcore / "latest_checkpointed_iteration.txt").write_text("")  # megatron writes it in place: a kill empties it
    fails_naming(mcore, "true", "latest_checkpointed_iteration.txt should name an iteration", "reads ''")


def test_overwrite_killed_after_the_swap_leaves_the_new_checkpoint_and_the_next_run_cleans_up(
        tiny_hf_checkpoint, converted_tiny, tmp_path, monkeypatch):
    """A kill at the exact moment after the swap (MP_FAULT_INJECT); tests/unit/test_atomic_write.py covers every
    other moment on a stand-in checkpoint."""
    from megatron_patch.convert.torch_dist_io import mcore_tensor_metadata
    from megatron_patch.fault_injection import FAULT_ENV, KILLED_EXIT_STATUS

    save_dir = tmp_path / "ckpt"
    shutil.copytree(converted_tiny, save_dir)  # the old checkpoint: fp32
    monkeypatch.setenv(FAULT_ENV, "convert:before-cleanup")
    proc = run_tool(["bash", RUN_8X, "tiny", tiny_hf_checkpoint, save_dir, "false", "false", "bf16", "",
                     "--overwrite"], check=False)
    assert proc.returncode == KILLED_EXIT_STATUS, proc.stderr[-3000:]  # and returned: no helper held its pipe open
    # SAVE_DIR holds the new (bf16) checkpoint, complete: every model tensor's bytes are there.
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    metadata = mcore_tensor_metadata(save_dir / "release")
    assert {m.properties.dtype for m in metadata.values()} == {torch.bfloat16}
    assert (save_dir / "config.json").read_bytes() == (tiny_hf_checkpoint / "config.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.old-")]

    monkeypatch.delenv(FAULT_ENV)
    proc = run_tool(["bash", RUN_8X, "tiny", tiny_hf_checkpoint, save_dir, "false", "false", "bf16"], check=False)
    assert proc.returncode == 2 and "already exists and is not empty" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the dead run's leftover is gone


def test_ctrl_c_leaves_save_dir_as_it_was_and_one_line(tiny_hf_checkpoint, converted_tiny, tmp_path):
    """Ctrl-C once the new checkpoint is written, just before it would take SAVE_DIR's place (the last moment a
    stop can still undo it), with megatron-core's writer helpers alive in the same process group: exit 130, one
    line, SAVE_DIR still the old checkpoint (fp32, not the bf16 asked for), nothing left beside it."""
    from megatron_patch.convert.torch_dist_io import mcore_tensor_metadata

    from training_utils import run_stopped

    save_dir = tmp_path / "out" / "ckpt"
    shutil.copytree(converted_tiny, save_dir)
    line = run_stopped(["bash", RUN_8X, "tiny", tiny_hf_checkpoint, save_dir, "false", "false", "bf16", "",
                        "--overwrite"], "convert:output-written", tmp_path)
    assert line == ("stopped by SIGINT; SAVE_DIR was not written (what it held before is unchanged); run the same "
                    "command to convert again")
    assert sorted(p.name for p in save_dir.parent.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in save_dir.iterdir()) == sorted(p.name for p in converted_tiny.iterdir())
    assert {m.properties.dtype for m in mcore_tensor_metadata(save_dir / "release").values()} == {torch.float32}


@pytest.mark.parametrize("variable,value,warned", [("MP_DRY_RUN", "1", False), ("DRY_RUN", "true", True)])
def test_dry_run_prints_the_command_and_converts_nothing(tmp_path, variable, value, warned):
    env = {k: v for k, v in os.environ.items() if k not in ("MP_DRY_RUN", "DRY_RUN")}
    for script, args in ((RUN_8X, ["tiny", tmp_path / "hf", tmp_path / "out", "true", "false", "bf16", tmp_path]),
                         (OLD_CONVERTOR_SCRIPT, ["tiny", tmp_path / "hf", tmp_path / "out", "2", "1", "bf16", "true",
                                                 "false"])):
        proc = subprocess.run(["bash", str(script), *map(str, args)], env={**env, variable: value},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"-m megatron_patch.convert --model-size tiny --load-dir {tmp_path / 'hf'}" in proc.stdout
        assert ("--mg2hf true" in proc.stdout) == (script == RUN_8X)
        assert ("DRY_RUN is deprecated; use MP_DRY_RUN=1" in proc.stderr) == warned
        assert not (tmp_path / "out").exists()
