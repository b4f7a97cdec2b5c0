"""ENV=dlc end to end on the CPU: two run_mcore_qwen.sh launchers as the two nodes of a DLC job, each with the
scheduler's variables as a DLC job sets them (WORLD_SIZE=2 nodes, RANK=0/1, MASTER_ADDR, MASTER_PORT and
KUBERNETES_CONTAINER_RESOURCE_GPU=1), gloo, one process per node. The losses equal one node's run of the same
layout (DP2: ENV=dsw, two processes) to 1e-5 in fp32, every iteration.

The runners are the GPU matrix's (megatron_patch/harness/matrix.py: its `dlc-2x1` row runs the same two launchers
on the two-GPU machine, one GPU per node), and so is the check: every iteration's loss and grad norm.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_patch.harness.matrix import Matrix
from megatron_patch.harness.matrix_table import check_row, settings_table, tolerance

pytestmark = pytest.mark.timeout(600)

CPU = settings_table()["cpu"]


def test_two_dlc_nodes_train_exactly_like_one_node_with_two_processes(tmp_path_factory, gpu_matrix_cpu_assets,
                                                                       converted_tiny):
    work = tmp_path_factory.mktemp("dlc")
    matrix = Matrix(CPU, gpu_matrix_cpu_assets, work, work / "state.json", checkpoint=converted_tiny, variant="cpu",
                    golden_path=work / "golden.json")
    # Both at once (as gpu_matrix --jobs runs rows): much of a launch is single-threaded start-up.
    with ThreadPoolExecutor(max_workers=2) as pool:
        one_node, two_nodes = pool.map(matrix.run_row, (matrix.rows["dp2"], matrix.rows["dlc-2x1"]))
    assert one_node["status"] == "ok" and two_nodes["status"] == "ok", (one_node, two_nodes)
    assert sorted(two_nodes["losses"], key=int) == [str(i) for i in range(1, CPU.iterations + 1)]
    assert tolerance("fp32", "fp32", on_gpu=False).loss == 1e-5
    deviation, problems = check_row(matrix.rows["dlc-2x1"], two_nodes, {"dp2": one_node}, on_gpu=False)
    assert not problems and deviation.iterations == [1, 2, 3], (problems, one_node, two_nodes)
    assert deviation.grad_norm is not None, two_nodes  # grad norms compared too

    # Each node's launcher started its own torchrun: one process, node rank = RANK, two nodes, one rendezvous.
    out = matrix.out_dir(matrix.rows["dlc-2x1"])
    ports = set()
    for node in (0, 1):
        (log,) = (out / "log").glob(f"*_node{node}.log")
        command = next(line for line in log.read_text().splitlines() if "torch.distributed.run" in line)
        assert re.search(rf"--nproc-per-node 1 --nnodes 2 --node-rank {node} --master-addr 127\.0\.0\.1 "
                         r"--master-port (\d+)", command), command
        ports.add(re.search(r"--master-port (\d+)", command).group(1))
    assert len(ports) == 1
    # One job of two ranks, not two jobs of one (rank 0, on node 0, prints the layout; the last rank the losses).
    assert "using world size: 2, data-parallel size: 2," in (out / "node0" / "launcher.log").read_text()
    assert "lm loss:" in (out / "node1" / "launcher.log").read_text()
