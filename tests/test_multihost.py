"""The README's multi-host command, run as two hosts on this machine: the `accelerate launch` flags are read from the
README, filled in for 2 hosts of one CPU process each (gloo), and the two commands train one texture model together."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_generation import cached_shards
from tokenizer.engine import find_checkpoints, read_metrics

REPO = Path(__file__).resolve().parents[1]


def readme_multihost_launch() -> list[str]:
    """The multi-host `accelerate launch ...` of README.md, split into words (placeholders M, R, HOST, PORT, N)."""
    found = re.findall(r"`(accelerate launch --multi_gpu [^`]*)`", (REPO / "README.md").read_text())
    assert len(found) == 1, f"README.md should give one multi-host launch command, found {found}"
    return found[0].split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_readme_multihost_command_names_every_setting():
    assert readme_multihost_launch() == [
        "accelerate", "launch", "--multi_gpu", "--num_machines", "M", "--machine_rank", "R", "--main_process_ip", "HOST",
        "--main_process_port", "PORT", "--num_processes", "N"]


@pytest.mark.slow
def test_two_hosts_train_one_run(tmp_path):
    values = {"M": "2", "HOST": "127.0.0.1", "PORT": str(free_port()), "N": "2"}
    output = tmp_path / "run"
    script = [str(REPO / "generator" / "train_dit.py"), "--config", str(REPO / "configs" / "dit_tiny.yaml"),
              f"data.shards={cached_shards(20)}", f"engine.output_dir={output}", "engine.max_steps=4",
              "engine.log_every=1", "engine.checkpoint_every=2", "data.batch_size=4"]
    hosts = []
    try:
        for rank in (0, 1):
            launch = [{**values, "R": str(rank)}.get(word, word) for word in readme_multihost_launch()[2:]]
            hosts.append(subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", *launch, *script], cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
        logs = [host.communicate(timeout=300)[0] for host in hosts]
    finally:
        for host in hosts:  # after a failure: SIGTERM lets torchrun end its workers
            if host.poll() is None:
                host.terminate()
                host.wait(timeout=60)
    for rank, (host, log) in enumerate(zip(hosts, logs)):
        assert host.returncode == 0, f"host {rank}:\n{log[-3000:]}"
    assert "2 process(es)" in (output / "train.log").read_text()
    assert [r["step"] for r in read_metrics(output)] == [1, 2, 3, 4]  # logged once, by the main process
    assert [p.name for p in find_checkpoints(output)] == ["step_00000002", "step_00000004"]
    assert (output / "ema.safetensors").is_file()
