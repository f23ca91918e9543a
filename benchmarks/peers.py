"""Build the peers that cannot share our environment (torchtune, litgpt), each in its own venv.

    python scripts/benchmark.py --setup-peers              # into .bench_venvs/<peer>/ (git-ignored)
    python scripts/benchmark.py --setup-peers --dry-run    # print the commands only

Why own venvs: each peer pins its own versions of lightning, torchao, torchdata, jsonargparse ...; installed
into the project's venv they would change what our tests run against. Why torch first: a peer's
`torch>=...` requirement lets pip pick the newest torch, a CUDA build of ~2 GB; installing torch==<ours>
(the CPU wheel we use) first and then the peer under a `torch==<ours>` constraint keeps every peer on the very
torch our numbers come from, or makes pip fail saying which requirement conflicts. Never run by tests or CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# peer -> what pip installs. torchtune 0.6.1 (its last release) imports torchao.dtypes.nf4tensor, which torchao
# 0.11+ moved: with the newest torchao `import torchtune` fails, so torchao is pinned to 0.10.0 (works on torch 2.13).
PEERS = {"torchtune": ["torchtune==0.6.1", "torchao==0.10.0"], "litgpt": ["litgpt"]}


def venv_python(root: Path, peer: str) -> Path:
    return root / peer / "bin" / "python"


def commands(root: Path, peer: str, torch_version: str) -> list[list[str]]:
    """The steps for one peer: venv, torch alone, then the peer under the torch constraint."""
    py = str(venv_python(root, peer))
    constraint = root / peer / "constraints.txt"
    return [[sys.executable, "-m", "venv", str(root / peer)],
            [py, "-m", "pip", "install", "-q", f"torch=={torch_version}"],
            ["write", str(constraint), f"torch=={torch_version}\n"],
            [py, "-m", "pip", "install", "-q", "-c", str(constraint), *PEERS[peer]]]


def setup(root: Path, peers: list[str], dry_run: bool = False, log=print) -> dict[str, str]:
    """Run `commands` per peer; returns peer -> "ok" or the failing step's last output lines (pip's error)."""
    import torch

    torch_version = torch.__version__.split("+")[0]
    result: dict[str, str] = {}
    for peer in peers:
        if peer not in PEERS:
            raise SystemExit(f"--setup-peers: unknown peer {peer!r} (known: {', '.join(PEERS)})")
        result[peer] = "dry run: nothing installed" if dry_run else "ok"
        for cmd in commands(root, peer, torch_version):
            log(("would run: " if dry_run else "running: ") + " ".join(cmd).strip())
            if dry_run:
                continue
            if cmd[0] == "write":
                Path(cmd[1]).write_text(cmd[2])
                continue
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                result[peer] = f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}): " + \
                    " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
                log(f"{peer}: {result[peer]}")
                break
        if not dry_run and result[peer] == "ok":
            check = (f"import importlib.metadata as m, torch, {peer}; "  # installed is not enough: it must import
                     f"print('torch', torch.__version__, '{peer}', m.version('{peer}'))")
            proc = subprocess.run([str(venv_python(root, peer)), "-c", check], capture_output=True, text=True)
            if proc.returncode != 0:
                result[peer] = f"installed, but `import {peer}` fails: " + proc.stderr.strip().splitlines()[-1]
            log(f"{peer}: {result[peer]} ({proc.stdout.strip()})")
    return result
