"""LM-Evaluation-Harness/: the best practice's lm-eval command on CMMLU / C-Eval, offline, on local data.

The expected prompts are rendered here from lm-eval's own yaml templates and the raw CSV rows, independently
of prepare_data.py and the generated task configs.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jinja2
import pytest
import yaml

from conftest import REPO_ROOT, SHARED_DIR
from megatron_patch.fault_injection import KILLED_EXIT_STATUS
from missing_inputs import input_unavailable

EVAL_DIR = REPO_ROOT / "LM-Evaluation-Harness"
RUN_EVAL = EVAL_DIR / "run_eval.sh"
PREPARE_DATA = EVAL_DIR / "prepare_data.py"
CMMLU_DOWNLOAD = SHARED_DIR / "data" / "cmmlu"
UPSTREAM_TASKS = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"

import run_eval  # noqa: E402  (LM-Evaluation-Harness/ is a script folder on pytest's pythonpath)

# lm-eval's TaskConfig defaults; the cmmlu and ceval templates don't override them.
TARGET_DELIMITER, FEWSHOT_DELIMITER = " ", "\n\n"


def run_script(args: list, data_dir: Path, tmp_path: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "EVAL_DATA_DIR": str(data_dir),
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache")}
    return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def upstream_template(benchmark: str, default_file: str, subject_task: str) -> dict:
    """What lm-eval's yaml says for one subject: its folder's default template, then the subject file."""
    config = yaml.safe_load((UPSTREAM_TASKS / benchmark / default_file).read_text(encoding="utf-8"))
    subject = yaml.safe_load((UPSTREAM_TASKS / benchmark / f"{subject_task}.yaml").read_text(encoding="utf-8"))
    return config | subject


def render_question(template: dict, row: dict) -> str:
    return jinja2.Template(template["doc_to_text"], keep_trailing_newline=True).render(**row)


def render_answer(template: dict, row: dict) -> str:
    index = int(jinja2.Template(template["doc_to_target"]).render(**row))
    return template["doc_to_choice"][index]


def assert_accuracies_are_the_samples(results: dict, results_dir: Path, group: str, subtasks) -> None:
    """Each subtask's acc and acc_norm is the share of its logged samples whose most likely choice (the highest
    logged log-likelihood) is the target: the choices ' A'..' D' have one length, so acc_norm's length normalisation
    picks the same one. The group's is the share over all of its samples."""
    correct_in_group = []
    for name in subtasks:
        correct = []
        for sample in samples_of(results_dir, name):
            likelihoods = [float(likelihood) for likelihood, _ in sample["filtered_resps"]]
            correct.append(likelihoods.index(max(likelihoods)) == int(sample["target"]))
        for metric in ("acc,none", "acc_norm,none"):
            assert results["results"][name][metric] == pytest.approx(sum(correct) / len(correct)), (name, metric)
        correct_in_group += correct
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"][group][metric] == pytest.approx(sum(correct_in_group) / len(correct_in_group))


def latest_results(folder: Path) -> dict:
    found = sorted(folder.glob("*/results_*.json"))
    assert found, f"no results_*.json under {folder}"
    return json.loads(found[-1].read_text(encoding="utf-8"))


def samples_of(folder: Path, task: str) -> list[dict]:
    (path,) = folder.glob(f"*/samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- CMMLU, the real download


@pytest.fixture(scope="module")
def cmmlu_data_dir(tmp_path_factory) -> Path:
    if not (CMMLU_DOWNLOAD / "test").is_dir():
        input_unavailable(f"the real CMMLU CSVs are not at {CMMLU_DOWNLOAD} (shared data folder absent)")
    data_dir = tmp_path_factory.mktemp("eval_data")
    done = subprocess.run([sys.executable, PREPARE_DATA, "--cmmlu", CMMLU_DOWNLOAD, "--out", data_dir],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[67/67]" in done.stdout and "wrote 67 subjects (11582 test questions)" in done.stdout
    return data_dir


def test_cmmlu_scores_all_67_subjects_on_cpu_with_upstream_prompts(tiny_hf_checkpoint, cmmlu_data_dir, tmp_path):
    done = run_script(["bash", RUN_EVAL, tiny_hf_checkpoint, "cmmlu", "--limit", "2", "--log_samples"],
                      cmmlu_data_dir, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    command = next(line for line in done.stdout.splitlines() if line.startswith("+ "))
    assert " -m lm_eval " in command and "accelerate" not in command and "--device cpu" in command
    # lm-eval's own tables: an acc and an acc_norm row per subject and for the group, then the groups table.
    assert "| - cmmlu_agronomy" in done.stdout and "|Groups|" in done.stdout
    assert done.stdout.count("|acc_norm|") == done.stdout.count("|acc     |") == 67 + 1 + 1

    results_dir = tiny_hf_checkpoint / "eval_results"
    results = latest_results(results_dir)
    subject_tasks = [name for name in results["results"] if name.startswith("cmmlu_")]
    assert len(subject_tasks) == 67
    assert results["group_subtasks"]["cmmlu"] and len(results["group_subtasks"]["cmmlu"]) == 67
    for name in subject_tasks:
        assert f"| - {name}" in done.stdout
    assert_accuracies_are_the_samples(results, results_dir, "cmmlu", subject_tasks)
    for name in subject_tasks:
        config = results["configs"][name]
        assert config["dataset_path"] == "json"  # our local task, not the built-in hub one
        assert config["metadata"]["config_source"].startswith(str(results_dir / "lm_eval_tasks"))
        assert results["n-samples"][name]["effective"] == 2

    # Every scored prompt is exactly lm-eval's template applied to the CSV row (numeric options like 0.80 included).
    for name in subject_tasks:
        subject = name.removeprefix("cmmlu_")
        template = upstream_template("cmmlu", "_default_template_yaml", name)
        rows = read_csv_rows(CMMLU_DOWNLOAD / "test" / f"{subject}.csv")
        for sample in samples_of(results_dir, name):
            row = rows[sample["doc_id"]]
            expected_prompt = template["description"] + render_question(template, row)
            requests = list(sample["arguments"].values())
            assert [r["arg_0"] for r in requests] == [expected_prompt] * 4, name
            assert [r["arg_1"] for r in requests] == [TARGET_DELIMITER + c for c in "ABCD"]
            assert sample["target"] == str("ABCD".index(row["Answer"]))


# ---------------------------------------------------------------- C-Eval, ceval-exam.zip's layout

CEVAL_SUBJECTS = {
    "accountant": [
        # a cell reading None must stay the text None; an empty cell must stay empty
        {"id": "0", "question": "下列各项中，不属于流动资产的是？", "A": "存货", "B": "None", "C": "", "D": "固定资产",
         "answer": "D", "explanation": "1. 固定资产属于非流动资产"},
        {"id": "1", "question": "1+1=?", "A": "1", "B": "2", "C": "3.0", "D": "0.50", "answer": "B",
         "explanation": "简单, \"加法\"\n第二行"},
    ],
    "high_school_physics": [
        {"id": "0", "question": "g 约为多少 m/s²？", "A": "9.8", "B": "10.00", "C": "1e3", "D": "007", "answer": "A",
         "explanation": ""},
        {"id": "1", "question": "光速约为？", "A": "3×10^8 m/s", "B": "340 m/s", "C": "0", "D": "-1", "answer": "A",
         "explanation": "常识"},
    ],
    "computer_network": [
        {"id": "0", "question": "HTTP 默认端口是？", "A": "80", "B": "443", "C": "21", "D": "22", "answer": "A",
         "explanation": "解析"},
        {"id": "1", "question": "IPv4 地址有多少位？", "A": "32", "B": "64", "C": "128", "D": "16", "answer": "A",
         "explanation": "解析"},
    ],
}
# The zip's columns differ by split: dev explains its answers, val doesn't, test has no answer at all.
CEVAL_SPLIT_COLUMNS = {
    "dev": ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
    "val": ["id", "question", "A", "B", "C", "D", "answer"],
    "test": ["id", "question", "A", "B", "C", "D"],
}


def ceval_rows(subject: str, split: str) -> list[dict[str, str]]:
    """The fixture's rows of one split; dev's questions are marked, so a few-shot example shows where it came from."""
    rows = CEVAL_SUBJECTS[subject]
    return [{**row, "question": f"例题：{row['question']}"} for row in rows] if split == "dev" else rows


def write_ceval_download(root: Path) -> Path:
    for split, columns in CEVAL_SPLIT_COLUMNS.items():
        (root / split).mkdir(parents=True)
        for subject in CEVAL_SUBJECTS:
            with (root / split / f"{subject}_{split}.csv").open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows([row[col] for col in columns] for row in ceval_rows(subject, split))
    return root


@pytest.fixture
def ceval_zip(tmp_path) -> Path:
    extracted = write_ceval_download(tmp_path / "unzipped")
    archive = tmp_path / "ceval-exam.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(extracted.rglob("*.csv")):
            zf.write(path, path.relative_to(extracted).as_posix())
    return archive


@pytest.fixture
def ceval_data_dir(ceval_zip, tmp_path) -> Path:
    """ceval_zip through prepare_data.py: EVAL_DATA_DIR for run_eval.sh."""
    data_dir = tmp_path / "data"
    prepared = subprocess.run([sys.executable, PREPARE_DATA, "--ceval", ceval_zip, "--out", data_dir],
                              capture_output=True, text=True, timeout=60)
    assert prepared.returncode == 0, prepared.stderr
    return data_dir


def test_prepare_data_keeps_every_ceval_cell_as_its_text(ceval_zip, tmp_path):
    # Also a download folder holding the archive's extracted top folder, and a .tgz with a top folder.
    parent = tmp_path / "downloads"
    write_ceval_download(parent / "ceval-exam")
    tgz = Path(shutil.make_archive(str(tmp_path / "ceval"), "gztar", root_dir=parent))
    for source in (ceval_zip, parent, tgz):
        out = tmp_path / f"data_from_{source.name}"
        done = subprocess.run([sys.executable, PREPARE_DATA, "--ceval", source, "--out", out],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "[3/3]" in done.stdout
        assert sorted(p.name for p in (out / "ceval").iterdir()) == ["dev", "val"]  # test/ has no answers
        for split in ("dev", "val"):
            for subject in CEVAL_SUBJECTS:
                lines = (out / "ceval" / split / f"{subject}.jsonl").read_text(encoding="utf-8").splitlines()
                expected = [{col: row[col] if col in CEVAL_SPLIT_COLUMNS[split] else "" for col in
                             ("id", "question", "A", "B", "C", "D", "answer", "explanation")}
                            for row in ceval_rows(subject, split)]
                assert [json.loads(line) for line in lines] == expected


UNTRUSTED_CODE_RAN = "modeling_qwen2.py from MODEL_DIR was executed"


@pytest.fixture
def model_dir_with_untrusted_code(tiny_hf_checkpoint, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(tiny_hf_checkpoint with a modeling_qwen2.py that config.json's auto_map names, a file it creates when it
    runs): the .py raises on import. Checked armed: transformers told to trust remote code does run it."""
    model = tmp_path / "untrusted_model"
    shutil.copytree(tiny_hf_checkpoint, model, ignore=shutil.ignore_patterns("eval_results", "config.json"),
                    copy_function=os.link)
    ran = tmp_path / "untrusted_code_ran"
    (model / "modeling_qwen2.py").write_text(f"open({str(ran)!r}, 'w').close()\n"
                                             f"raise RuntimeError({UNTRUSTED_CODE_RAN!r})\n")
    config = json.loads((tiny_hf_checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_qwen2.Qwen2Config",
                          "AutoModelForCausalLM": "modeling_qwen2.Qwen2ForCausalLM"}
    (model / "config.json").write_text(json.dumps(config, indent=2))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # where transformers copies remote code
    trusted = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoConfig; "
                              "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)", model],
                             capture_output=True, text=True, timeout=120)
    assert trusted.returncode != 0 and UNTRUSTED_CODE_RAN in trusted.stderr and ran.exists(), trusted.stderr[-2000:]
    ran.unlink()
    return model, ran


def test_ceval_valid_scores_the_prepared_subjects_with_upstream_few_shot_prompts(model_dir_with_untrusted_code,
                                                                                  ceval_data_dir, tmp_path):
    """Also: a .py file in MODEL_DIR that config.json names (auto_map) is never run, since Qwen2 is transformers'."""
    model, untrusted_code_ran = model_dir_with_untrusted_code
    results_dir = tmp_path / "results"
    done = run_script(["bash", RUN_EVAL, model, "ceval-valid", "--limit", "2", "--num_fewshot", "1",
                       "--log_samples", "--batch_size", "4", "--output_path", results_dir], ceval_data_dir, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not untrusted_code_ran.exists() and UNTRUSTED_CODE_RAN not in done.stderr
    assert "covers 3 of 52 subjects" in done.stderr  # the partial download is said, not hidden
    command = next(line for line in done.stdout.splitlines() if line.startswith("+ "))
    assert command.count("--batch_size") == 1 and "--batch_size 4" in command

    results = latest_results(results_dir)
    tasks = {f"ceval-valid_{subject}" for subject in CEVAL_SUBJECTS}
    assert set(results["group_subtasks"]["ceval-valid"]) == tasks
    assert set(results["results"]) == tasks | {"ceval-valid"}
    assert_accuracies_are_the_samples(results, results_dir, "ceval-valid", sorted(tasks))

    # One-shot: upstream's first_n sampler takes the first dev row as the example.
    for name in tasks:
        subject = name.removeprefix("ceval-valid_")
        template = upstream_template("ceval", "_default_ceval_yaml", name)
        first_dev_row = ceval_rows(subject, "dev")[0]
        shot = render_question(template, first_dev_row) + TARGET_DELIMITER + render_answer(template, first_dev_row)
        for sample in samples_of(results_dir, name):
            row = ceval_rows(subject, "val")[sample["doc_id"]]
            expected_prompt = template["description"] + shot + FEWSHOT_DELIMITER + render_question(template, row)
            assert {r["arg_0"] for r in sample["arguments"].values()} == {expected_prompt}, name
    assert "B. None\nC. \nD. 固定资产" in samples_of(results_dir, "ceval-valid_accountant")[0]["arguments"]["gen_args_0"]["arg_0"]


# ---------------------------------------------------------------- errors a user meets


@pytest.mark.parametrize("task,folder,archive", [("cmmlu", "cmmlu", "cmmlu.tgz"), ("ceval-valid", "ceval", "ceval.tgz")])
def test_missing_data_names_the_folder_and_how_to_get_it(tiny_hf_checkpoint, tmp_path, task, folder, archive):
    data_dir = tmp_path / "no_data_here"
    done = run_script(["bash", RUN_EVAL, tiny_hf_checkpoint, task], data_dir, tmp_path, timeout=120)
    assert done.returncode != 0
    assert str(data_dir / folder) in done.stderr
    assert f"evaluation-datasets/{archive}" in done.stderr and "prepare_data.py" in done.stderr
    assert "Traceback" not in done.stderr


def test_model_dir_without_readable_hf_weights_is_refused_before_lm_eval(tiny_hf_checkpoint, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_hf_checkpoint, no_config, ignore=shutil.ignore_patterns("config.json", "eval_results"))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_hf_checkpoint, truncated, ignore=shutil.ignore_patterns("eval_results"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    for model_dir, message in ((empty, f"{empty} holds no Hugging Face weights"),
                               (no_config, f"{no_config} has no config.json"),
                               (truncated, f"{weights} (4096 bytes) is not a readable safetensors file")):
        done = run_script(["bash", RUN_EVAL, model_dir], tmp_path, tmp_path, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "lm_eval" not in done.stdout


# prepare_data.py, on a file system that cannot swap two names at once (NFS): two renames instead.
PREPARE_DATA_WITHOUT_EXCHANGE = """
import sys
from megatron_patch import atomic_write
atomic_write.exchange = lambda a, b: False
import prepare_data
sys.exit(prepare_data.main(sys.argv[1:]))
"""


def prepare_ceval(download: Path, out: Path, fault: str | None = None, exchange: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "MP_FAULT_INJECT"}
    env["PYTHONPATH"] = os.pathsep.join([str(EVAL_DIR), str(REPO_ROOT)])
    if fault:
        env["MP_FAULT_INJECT"] = fault
    script = [PREPARE_DATA] if exchange else ["-c", PREPARE_DATA_WITHOUT_EXCHANGE]
    return subprocess.run([sys.executable, *script, "--ceval", download, "--out", out], capture_output=True,
                          text=True, timeout=60, env=env)


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def old_and_new_ceval_data(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(old download, its prepared data, new download, its prepared data): the new one has a subject fewer."""
    root = tmp_path_factory.mktemp("ceval_versions")
    old = write_ceval_download(root / "old")
    new = root / "new"
    shutil.copytree(old, new, ignore=shutil.ignore_patterns("computer_network_*"))
    for download in (old, new):
        assert prepare_ceval(download, root / f"{download.name}_data").returncode == 0
    return old, root / "old_data" / "ceval", new, root / "new_data" / "ceval"


@pytest.mark.parametrize("fault,exchange,in_place", [
    ("prepare_data:output-written", True, "old"),   # killed before the swap
    ("prepare_data:before-swap", True, "old"),
    ("prepare_data:before-cleanup", True, "new"),   # killed after the swap (one atomic exchange)
    ("prepare_data:between-renames", False, None),  # two renames: the next run puts the new data back first
    ("prepare_data:before-cleanup", False, "new"),
])
def test_prepare_data_killed_during_its_swap_leaves_the_old_or_the_new_data_whole(old_and_new_ceval_data, tmp_path,
                                                                                  fault, exchange, in_place):
    old_download, old_data, new_download, new_data = old_and_new_ceval_data
    whole = {"old": folder_contents(old_data), "new": folder_contents(new_data)}
    assert whole["old"] != whole["new"]
    out = tmp_path / "data"
    shutil.copytree(old_data, out / "ceval")
    killed = prepare_ceval(new_download, out, fault, exchange)
    assert killed.returncode == KILLED_EXIT_STATUS, killed.stderr
    if in_place:
        assert folder_contents(out / "ceval") == whole[in_place]
    else:
        assert not (out / "ceval").exists()
        (done,) = out.glob(".ceval.done-*")
        assert folder_contents(done) == whole["new"]  # whole, beside: the README's hand recovery renames it back
    # The next run, whatever it is given, first recovers: here a download it refuses, so nothing else changes.
    empty = tmp_path / "empty_download"
    for split in ("dev", "val"):
        (empty / split).mkdir(parents=True)
    assert prepare_ceval(empty, out).returncode == 2
    assert folder_contents(out / "ceval") == whole[in_place or "new"]
    assert sorted(p.name for p in out.iterdir()) == ["ceval"]


def ceval_problem_rows(root: Path) -> dict[str, str]:
    """Break rows of the fixture download in each way prepare_data.py must report; {FILE:LINE: what it says}."""
    val = root / "val" / "accountant_val.csv"
    lines = val.read_text(encoding="utf-8").splitlines()  # header, then one line per row (no multi-line cells)
    lines[1] = lines[1].removesuffix(",D") + ",E"  # answer outside A-D
    lines[2] = lines[2] + ",surplus"  # one cell too many (an unquoted comma)
    val.write_text("\n".join(lines) + "\n", encoding="utf-8")
    physics = root / "val" / "high_school_physics_val.csv"
    lines = physics.read_text(encoding="utf-8").splitlines()
    lines[1] = '0,,9.8,10.00,1e3,007,A'  # empty question
    lines[2] = '1,"光速约为？,3×10^8 m/s,340 m/s,0,-1,A'  # unbalanced quote
    physics.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {f"{val}:2": "answer is 'E', expected one of A, B, C, D",
            f"{val}:3": "8 cells, but the header has 7",
            f"{physics}:2": "the question cell is empty",
            f"{physics}:3": "not valid CSV"}


def test_malformed_rows_are_listed_as_file_and_line_and_nothing_is_written(tmp_path):
    root = write_ceval_download(tmp_path / "ceval-exam")
    expected = ceval_problem_rows(root)
    out = tmp_path / "data"
    done = subprocess.run([sys.executable, PREPARE_DATA, "--ceval", root, "--out", out],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "4 malformed row(s); nothing was written" in done.stderr
    for where, what in expected.items():
        assert f"{where}: {what}" in done.stderr, done.stderr
    assert not (out / "ceval").exists() and not list(out.glob(".ceval*"))

    done = subprocess.run([sys.executable, PREPARE_DATA, "--ceval", root, "--out", out, "--skip-bad-rows"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "left out 4 malformed row(s)" in done.stderr and all(where in done.stderr for where in expected)
    # Both val rows of two subjects were bad: those subjects go (lm-eval cannot score an empty one).
    assert sorted(p.name for p in (out / "ceval" / "val").iterdir()) == ["computer_network.jsonl"]
    assert len((out / "ceval" / "val" / "computer_network.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_a_malformed_row_in_the_real_cmmlu_layout_is_named(tmp_path):
    if not (CMMLU_DOWNLOAD / "test").is_dir():
        input_unavailable(f"the real CMMLU CSVs are not at {CMMLU_DOWNLOAD} (shared data folder absent)")
    download = tmp_path / "cmmlu"
    for split in ("dev", "test"):
        (download / split).mkdir(parents=True)
        for subject in ("agronomy", "anatomy"):
            (download / split / f"{subject}.csv").write_bytes((CMMLU_DOWNLOAD / split / f"{subject}.csv").read_bytes())
    broken = download / "test" / "anatomy.csv"
    lines = broken.read_text(encoding="utf-8-sig").splitlines()
    lines[10] = lines[10][: lines[10].rindex(",")]  # the Answer cell lost
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = subprocess.run([sys.executable, PREPARE_DATA, "--cmmlu", download, "--out", tmp_path / "data"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{broken}:11: 6 cells, but the header has 7" in done.stderr, done.stderr


@pytest.mark.parametrize("variable", ["MP_DRY_RUN", "EVAL_DRY_RUN"])
def test_dry_run_prints_the_lm_eval_command_and_writes_nothing(tiny_hf_checkpoint, ceval_data_dir, tmp_path,
                                                               variable):
    results_dir = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("MP_DRY_RUN", "EVAL_DRY_RUN")}
    done = subprocess.run(["bash", str(RUN_EVAL), str(tiny_hf_checkpoint), "ceval-valid", "--output_path",
                           str(results_dir)], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHON": sys.executable, "EVAL_DATA_DIR": str(ceval_data_dir), variable: "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    command = next(line for line in done.stdout.splitlines() if line.startswith("+ "))
    assert " -m lm_eval --model hf " in command and f"--include_path {results_dir / 'lm_eval_tasks'}" in command
    assert ("EVAL_DRY_RUN is deprecated; use MP_DRY_RUN=1" in done.stderr) == (variable == "EVAL_DRY_RUN")
    assert not results_dir.exists()


def test_ctrl_c_stops_lm_eval_with_one_line_and_no_results(tiny_hf_checkpoint, ceval_data_dir, tmp_path):
    """Ctrl-C once lm-eval has started (it runs in its own session: run_eval.py kills its whole tree): exit 130,
    one line, no results file and no staging folder under the output path (only the task configs it reads)."""
    from training_utils import run_stopped

    results_dir = tmp_path / "results"
    line = run_stopped(["bash", RUN_EVAL, tiny_hf_checkpoint, "ceval-valid", "--limit", "2", "--output_path",
                        results_dir], "owned-child:started", tmp_path, PYTHON=sys.executable,
                       EVAL_DATA_DIR=str(ceval_data_dir))
    assert line == "stopped by SIGINT; no results were written; run the same command to evaluate again"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".results")) == []
    assert sorted(p.name for p in results_dir.iterdir()) == ["lm_eval_tasks"]
    assert not list(results_dir.rglob("results_*.json")) and not list(results_dir.rglob("samples_*"))


# ---------------------------------------------------------------- the command line, for GPU runs


def test_gpus_get_one_accelerate_process_each_and_user_args_win(tmp_path):
    model, tasks_dir, out = tmp_path / "model", tmp_path / "tasks", tmp_path / "out"
    on_gpus = run_eval.build_command(model, "cmmlu,ceval-valid", ["--limit", "10", "--batch_size", "8"], tasks_dir,
                                     out, num_gpus=8, python="python")
    assert on_gpus[:10] == ["python", "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "8",
                            "--main_process_port", "29051", "-m", "lm_eval"]
    assert on_gpus[on_gpus.index("--model_args") + 1] == f"pretrained={model},trust_remote_code=False"
    assert on_gpus[on_gpus.index("--tasks") + 1] == "cmmlu,ceval-valid"
    assert on_gpus.count("--batch_size") == 1 and on_gpus[on_gpus.index("--batch_size") + 1] == "8"
    assert on_gpus[-4:] == ["--limit", "10", "--batch_size", "8"] and "--device" not in on_gpus

    on_cpu = run_eval.build_command(model, "cmmlu", [], tasks_dir, out, num_gpus=0, python="python")
    assert on_cpu[:3] == ["python", "-m", "lm_eval"]
    assert on_cpu[on_cpu.index("--device") + 1] == "cpu" and on_cpu[on_cpu.index("--batch_size") + 1] == "16"
    assert on_cpu[on_cpu.index("--output_path") + 1] == str(out)

    one_device = run_eval.build_command(model, "cmmlu", ["--device", "cuda:1"], tasks_dir, out, num_gpus=8)
    assert "accelerate.commands.accelerate_cli" not in one_device and one_device.count("--device") == 1


def test_offline_by_default_unless_the_user_says_otherwise():
    assert run_eval.lm_eval_env({})["HF_HUB_OFFLINE"] == "1"
    assert run_eval.lm_eval_env({})["HF_DATASETS_OFFLINE"] == "1"
    assert run_eval.lm_eval_env({"HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "0"
