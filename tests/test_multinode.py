"""Multi-node runs through ``torchrun`` and Lightning's cluster environments: two ``torchrun`` agents on this host,
2 nodes x 1 CPU process (gloo), rendezvous on localhost, each launching ``fsseg`` as a cluster node would.
Evaluation writes the same metrics.json and episodes.jsonl as one process (no episode padded or counted twice);
training keeps data.effective_batch_size with the accumulation derived from both nodes' processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import write_config  # the small baseline config of the CLI tests

from fsseg.cli.trainer import run_cli

MULTINODE = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
             "--trainer.num_nodes", "2"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(args: list[str], cwd: Path) -> list[str]:
    """``fsseg <args>`` on 2 nodes x 1 process: one torchrun agent per node (static rendezvous at node 0's
    address), both on this host; returns each node's output (stdout, then stderr)."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "fsseg.cli",
                *args,
            ],  # fmt: skip
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=600)
            assert node.returncode == 0, err[-4000:]
            outs.append(out + err)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    return outs


def test_two_node_test_writes_what_one_process_writes(tmp_path, small_embedded):
    cfg = write_config(tmp_path, small_embedded, enable_checkpointing=True)
    ckpt = run_cli(["fit", "--config", str(cfg)]).trainer.checkpoint_callback.last_model_path
    one = run_cli(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--data.test_episodes", "23",
                   "--trainer.logger.init_args.name", "one"])  # fmt: skip
    outs = torchrun_two_nodes(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--data.test_episodes", "23",
                               "--trainer.logger.init_args.name", "nodes", *MULTINODE], tmp_path)  # fmt: skip
    single, out = Path(one.trainer.log_dir), tmp_path / "runs/nodes/test_embedded_fold0_1shot"
    assert single == tmp_path / "runs/one/test_embedded_fold0_1shot"
    assert f"-> {out}/metrics.json" in outs[0] and "fsseg test: mIoU" not in outs[1]  # global rank 0 reports
    e1, e2 = (single / "episodes.jsonl").read_text(), (out / "episodes.jsonl").read_text()
    assert e1 == e2 and len(e2.splitlines()) == 23  # 23 episodes over 2 nodes: none padded, none twice
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (single, out))
    for key in ("miou", "fbiou", "per_class_iou", "episodes"):
        assert m1[key] == m2[key], key


@pytest.mark.slow  # two torchrun agents running a short fit: about half a minute of CPU
def test_two_node_fit_keeps_the_effective_batch(tmp_path, small_embedded):
    # 16 training episodes, batch 2, data.effective_batch_size 8 -> accumulation 8 / (2 nodes x 2) = 2: 2 optimizer
    # steps, as one process with accumulation 4; accumulation 1 would give 4 steps, one process's 4 would give 1
    cfg = write_config(tmp_path, small_embedded)
    fit = ["fit", "--config", str(cfg), "--data.batch_size", "2", "--data.effective_batch_size", "8",
           "--trainer.logger.init_args.name", "fit_nodes", *MULTINODE]  # fmt: skip
    outs = torchrun_two_nodes(fit, tmp_path)
    assert "effective batch 8 = 2 process(es) x batch 2 x accumulation 2" in outs[0]
    ckpt = tmp_path / "runs/fit_nodes/version_0/checkpoints/last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
