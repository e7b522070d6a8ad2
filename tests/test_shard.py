"""Work shared across torchrun's processes: shares, places and devices from the environment, and `medsr upscale`
of a folder under torchrun (every scan once, one summary, every process's exit status)."""

import os
import socket
import subprocess
import sys
from subprocess import PIPE

import numpy as np
import pytest
import torch
import torch.distributed as dist

import medsr
from medsr import shard
from medsr.shard import Ranks, process_group, rank_device, ranks, share

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def torchrun_env(monkeypatch):
    """Set torchrun's variables for this test (``place(rank, world_size, local_rank, local_world_size)``)."""

    def place(*values: int) -> None:
        for name, value in zip(TORCHRUN, values, strict=False):
            monkeypatch.setenv(name, str(value))

    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    return place


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_the_shares_of_all_ranks_are_disjoint_and_cover_the_list(world_size):
    items = [f"scan{i:02d}" for i in range(10)]
    shares = [share(items, Ranks(rank, world_size)) for rank in range(world_size)]
    assert sorted(item for part in shares for item in part) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_ranks_come_from_torchrun_s_environment(torchrun_env):
    assert ranks() == Ranks(0, 1, 0, 1)  # a plain process
    torchrun_env(5, 8, 1, 4)
    assert ranks() == Ranks(rank=5, world_size=8, local_rank=1, local_world_size=4)
    torchrun_env(2, 2)
    with pytest.raises(ValueError, match="below its world size"):
        ranks()
    torchrun_env("x")
    with pytest.raises(ValueError, match="RANK='x': expected a whole number"):
        ranks()


def test_each_process_on_a_machine_gets_its_own_gpu(torchrun_env, monkeypatch):
    """'auto' and 'cuda' are cuda:LOCAL_RANK (simulated: 2 GPUs); an explicit index is kept; more processes than
    GPUs is a clear error. Without a GPU, 'auto' is the CPU."""
    torchrun_env(3, 4, 1, 2)
    if not torch.cuda.is_available():
        assert rank_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("auto") == rank_device("cuda") == torch.device("cuda", 1)
    assert rank_device("cuda:0") == torch.device("cuda", 0)
    torchrun_env(3, 4, 3, 4)
    with pytest.raises(ValueError, match="device 'auto': 2 CUDA GPU.* none for local process 3"):
        rank_device("auto")


def test_a_process_group_gives_each_process_its_share_of_the_cpus(torchrun_env, monkeypatch):
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: joined.append("left"))
    monkeypatch.setattr(shard, "_cpu_count", lambda: 16)
    threads = torch.get_num_threads()
    try:
        with process_group() as place:  # one process: nothing joined, threads untouched
            assert place.world_size == 1 and torch.get_num_threads() == threads and not joined
        torchrun_env(4, 8, 0, 3)
        with process_group("nccl") as place:
            assert place == Ranks(4, 8, 0, 3) and torch.get_num_threads() == 5 and joined == ["nccl"]
        assert joined == ["nccl", "left"]
    finally:
        torch.set_num_threads(threads)


def write_scans(folder, names, broken=()):
    """Small MR volumes (24 x 20 x 3, 2 mm in-plane as the shipped model learnt), and files that are no scan."""
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.linspace(-1, 1, 24), np.linspace(-1, 1, 20), indexing="ij")
    head = 200 * (np.hypot(i, j) < 0.9) + 150 * (np.hypot(i - 0.2, j) < 0.4)
    for name in names:
        image = head[..., None] + np.abs(rng.normal(0, 10, (24, 20, 3)))
        volume = medsr.Volume(torch.from_numpy(image).float()[None], np.diag([2.0, 2.0, 3.0, 1.0]), "MR")
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        medsr.write_volume(volume, folder / name)
    for name in broken:
        (folder / name).write_bytes(b"\x1f\x8b not a scan")


def test_torchrun_upscales_every_scan_of_a_folder_exactly_once(tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    names = ["a.nii.gz", "b.nii.gz", "sub/c.nii.gz", "sub/d.nii.gz", "sub/e.nii.gz"]
    write_scans(scans, names)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "medsr", "upscale", str(scans), str(out), "--modality", "MR", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"upscaled 5 of 5 scans into {out} by 2 processes"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert written == names and all((out / name.replace(".nii.gz", ".json")).is_file() for name in names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_broken_scan_fails_every_process_and_is_counted_once(tmp_path):
    """Two processes started as torchrun starts them (its environment), to see each one's exit status and output:
    both exit 1, rank 0 alone prints the summary of all scans, each upscaled exactly its share of the sorted list."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    write_scans(scans, ["a.nii.gz", "c.nii.gz", "d.nii.gz"], broken=["b.nii.gz"])
    command = [sys.executable, "-m", "medsr", "upscale", str(scans), str(out), "--modality", "MR", "--device", "cpu"]
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    processes = [
        subprocess.Popen(command, env=env | {"RANK": rank, "LOCAL_RANK": rank}, stdout=PIPE, stderr=PIPE, text=True)
        for rank in ("0", "1")
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [1, 1], outputs
    (out0, err0), (out1, err1) = outputs
    assert out0.splitlines() == [f"upscaled 3 of 4 scans into {out} by 2 processes"] and out1 == ""
    assert f"skipped {scans / 'b.nii.gz'}" in err1 and "skipped" not in err0  # b is rank 1's: [a, c] and [b, d]
    assert [f"{scans / name}.nii.gz: model" in err0 for name in "abcd"] == [True, False, True, False]
    assert [f"{scans / name}.nii.gz: model" in err1 for name in "abcd"] == [False, False, False, True]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz", "d.nii.gz"]
