"""MP_CUDA_GRAPH on one GPU (make test-gpu): the real entrypoint trains the tiny model with every iteration after the
capture replayed from one CUDA graph, and its loss and grad norm at every iteration, before and after the capture,
are the eager run's (fp32, same seed and mock data). A replay that kept the captured batch, or weights, would
train on other values than the eager run from the first replayed iteration on.

The GPU matrix's `cuda-graph` and `sft-packed-cuda-graph` rows check the same through the launcher at 0.5B."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_patch.megatron_flags import NO_TE_GPU_FLAGS
from megatron_patch.harness.iteration_log import run_curves
from megatron_patch.harness.matrix_table import CUDA_GRAPH_FIRST_REPLAYED, Row, check_row
from megatron_patch.launch.flags import CUDA_GRAPH_FLAGS
from training_utils import run_fresh_rank, tiny_mock_args

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

ITERATIONS = 8  # eager up to the capture, then five replays
CAPTURED = "Capture CUDA graph for training"  # megatron-core's full_cuda_graph logs it as it captures


@pytest.fixture(scope="module")
def eager_and_graph(tmp_path_factory) -> dict[str, dict]:
    """{eager, graph: {losses, grad_norms, precision, log}}: two one-GPU runs at once, one rank each (as the
    launcher runs one GPU without Transformer Engine; --logging-level 20 lets megatron-core say when it captures)."""
    base = tiny_mock_args(iters=ITERATIONS) + NO_TE_GPU_FLAGS + ["--overlap-grad-reduce", "--logging-level", "20"]

    def train(name: str, flags: list[str]) -> tuple[str, dict]:
        work = tmp_path_factory.mktemp(f"cuda_graph_{name}")
        log = run_fresh_rank(work, base + flags).stdout
        losses, grad_norms = run_curves(work / "tb", log, ITERATIONS)
        return name, dict(losses={str(k): v for k, v in losses.items()},
                          grad_norms={str(k): v for k, v in grad_norms.items()}, precision="fp32", log=log)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(lambda case: train(*case), (("eager", []), ("graph", CUDA_GRAPH_FLAGS))))


def test_the_graph_is_captured_after_the_eager_warmup(eager_and_graph):
    log = eager_and_graph["graph"]["log"]
    assert log.count(CAPTURED) == 1 and CAPTURED not in eager_and_graph["eager"]["log"], log[-3000:]
    # Captured, and first replayed, at the iteration the GPU matrix compares from.
    before, after = (re.search(rf"\biteration\s+{it}/\s*{ITERATIONS} \|", log) for it in
                     (CUDA_GRAPH_FIRST_REPLAYED - 1, CUDA_GRAPH_FIRST_REPLAYED))
    assert before and after and before.start() < log.index(CAPTURED) < after.start(), log[-3000:]


def test_replayed_iterations_train_as_the_eager_path(eager_and_graph):
    """The GPU matrix's own check (every iteration, loss and grad norm, the fp32 GPU tolerance; at least one
    replayed iteration compared; the loss falls) with the eager run as the golden values."""
    graph, eager = eager_and_graph["graph"], eager_and_graph["eager"]
    assert sorted(graph["losses"], key=int) == [str(it) for it in range(1, ITERATIONS + 1)], graph["losses"]
    row = Row(name="cuda-graph", what="MP_CUDA_GRAPH=true", env={"MP_CUDA_GRAPH": "true"}, reference="eager")
    deviation, problems = check_row(row, graph, {"eager": eager}, on_gpu=True)
    assert not problems, (problems, graph["losses"], eager["losses"])
    assert deviation.iterations == list(range(1, ITERATIONS + 1)) and deviation.grad_norm is not None, deviation
