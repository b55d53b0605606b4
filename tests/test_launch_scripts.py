"""scripts/launch/: one torchrun launcher per stage and for sampling, on one node or many from NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE (single-node defaults), and the SLURM example that sets them.
Here torchrun is replaced by a printer of its arguments; tests/test_elastic.py runs scripts/launch/stage2.sh for
real, a tiny config on one node with two processes (and a restart)."""
from __future__ import annotations

import os
import socket
import subprocess

from tests.helpers import ROOT

ENTRY_POINTS = {"stage1.sh": "main_stage1.py", "stage2.sh": "main_stage2.py", "mar.sh": "main_mar.py",
                "sample_fid.sh": "main_sampling_fid.py"}
VARIABLES = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "MAX_RESTARTS", "RDZV_ID",
             "TORCHRUN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], **variables: str) -> subprocess.CompletedProcess:
    """`command` from the repository root with the launch variables given (and no others from this shell)."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **variables)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def argument_printer(folder) -> str:
    """A stand-in for torchrun that prints its arguments, one a line."""
    path = folder / "print_args"
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)
    return str(path)


def test_each_script_hands_its_entry_point_and_arguments_to_torchrun(tmp_path):
    printer = argument_printer(tmp_path)
    for script, entry in ENTRY_POINTS.items():
        result = run(["bash", f"scripts/launch/{script}", "-m", "my config.yaml", "a.b=1"], TORCHRUN=printer)
        args = result.stdout.splitlines()
        assert result.returncode == 0 and args[:8] == ["--nnodes", "1", "--node_rank", "0", "--master_addr",
                                                       "127.0.0.1", "--master_port", "29500"], result.stderr
        assert args[8] == "--nproc_per_node" and int(args[9]) >= 1  # this node's GPUs, or 1
        assert args[10:] == ["--max-restarts", "0", os.path.join(ROOT, entry), "-m", "my config.yaml", "a.b=1"]
    nodes = dict(NNODES="4", NODE_RANK="3", MASTER_ADDR="10.0.0.7", MASTER_PORT="29511", NPROC_PER_NODE="8")
    many = run(["bash", "scripts/launch/stage2.sh", "-m", "x.yaml"], TORCHRUN=printer, **nodes)
    assert many.stdout.splitlines()[:12] == ["--nnodes", "4", "--node_rank", "3", "--master_addr", "10.0.0.7",
                                             "--master_port", "29511", "--nproc_per_node", "8", "--max-restarts", "0"]
    # restarts: the nodes meet (again after each restart) in torchrun's c10d rendezvous
    elastic = run(["bash", "scripts/launch/stage2.sh", "-m", "x.yaml"], TORCHRUN=printer, MAX_RESTARTS="2",
                  RDZV_ID="job7", **nodes)
    assert elastic.stdout.splitlines()[:12] == ["--nnodes", "4", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                                "10.0.0.7:29511", "--rdzv-id", "job7", "--nproc_per_node", "8",
                                                "--max-restarts", "2"]


def test_slurm_example_sets_the_variables_for_each_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"srun": '#!/usr/bin/env bash\nSLURM_NODEID=1 exec "$@"\n',  # as on the second node
             "scontrol": "#!/usr/bin/env bash\nprintf 'gpu-a\\ngpu-b\\n'\n"}
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    result = run(["bash", "scripts/launch/slurm_example.sbatch", "scripts/launch/stage1.sh", "-m", "x.yaml"],
                 TORCHRUN=argument_printer(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2",
                 SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_GPUS_ON_NODE="4", SLURM_JOB_ID="4242")
    assert result.stdout.splitlines() == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-a:29500",
                                          "--rdzv-id", "4242", "--nproc_per_node", "4", "--max-restarts", "3",
                                          os.path.join(ROOT, "main_stage1.py"), "-m", "x.yaml"], result.stderr
    static = run(["bash", "scripts/launch/slurm_example.sbatch", "scripts/launch/stage1.sh"], MAX_RESTARTS="0",
                 TORCHRUN=argument_printer(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2",
                 SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_GPUS_ON_NODE="4", SLURM_JOB_ID="4242")
    assert static.stdout.splitlines()[:4] == ["--nnodes", "2", "--node_rank", "1"]  # this node's, from SLURM
