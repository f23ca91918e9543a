"""The contract every bad-input case checks, shared by tests/e2e/test_bad_input.py and tests/e2e/bad_input/.

A case builds its broken input under its own `tmp` folder and names what the message must contain (the
culprit: file, row, key or value). `check_case` then runs the CLI's `main(argv)` in-process and asserts:
exit status exactly 2 (or the case's own `rc`), every expected piece in stderr, no traceback, and the
whole `tmp` folder (and any other watched folder) byte-for-byte as it was: nothing half-made left behind,
nothing pre-existing overwritten (every file is hashed, so a rewrite with the same size is caught too).
`check_subprocess` is the same contract through a fresh `python -m mistral_ft.X` (exit code of a real
process, stderr as the user sees it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@dataclass
class Case:
    argv: list[str]
    expected: list[Any]
    watch: list[Path] = field(default_factory=list)  # folders outside tmp that must not change
    rc: int = 2


def snapshot(folder: Path) -> dict[str, str] | None:
    """{relative path: sha256 (files) or '<dir>'} of everything under `folder`; None when it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def lines(path: Path, rows: Sequence[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def check_case(main: Callable[[list[str]], int], case: Case, tmp: Path, capsys) -> str:
    """Run `main(case.argv)` in-process and assert the bad-input contract; returns stderr."""
    watched = [tmp, *case.watch]
    before = [snapshot(w) for w in watched]
    capsys.readouterr()
    try:
        rc = main(list(case.argv))
    except SystemExit as exc:  # argparse usage errors exit 2 through SystemExit
        rc = exc.code
    err = capsys.readouterr().err
    _assert_contract(rc, err, case)
    for w, b in zip(watched, before):
        assert snapshot(w) == b, f"{w} changed:\n{err}"
    return err


def check_subprocess(module: str, case: Case, tmp: Path, env: dict[str, str] | None = None) -> str:
    """The same contract through `python -m mistral_ft.<module>` in a fresh interpreter."""
    watched = [tmp, *case.watch]
    before = [snapshot(w) for w in watched]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", f"mistral_ft.{module}", *case.argv], capture_output=True, text=True,
                          env=full_env, cwd=tmp, timeout=300)
    _assert_contract(proc.returncode, proc.stderr, case)
    for w, b in zip(watched, before):
        assert snapshot(w) == b, f"{w} changed:\n{proc.stderr}"
    return proc.stderr


def _assert_contract(rc: Any, err: str, case: Case) -> None:
    assert rc == case.rc, f"exit status {rc}, expected {case.rc}:\n{err}"
    assert "Traceback" not in err, err
    for piece in case.expected:
        assert str(piece) in err, (piece, err)


# ---- inputs the cases share ------------------------------------------------------------------------
ORIGINAL_PARAMS = dict(dim=32, n_layers=1, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                       vocab_size=32000, rope_theta=10000.0, max_seq_len=256)


def original_folder(folder: Path, params: dict | None = None, weights: bool = True) -> Path:
    """A tiny original-format release (params.json, consolidated.safetensors, tokenizer.model) for the converter."""
    import torch
    from safetensors.torch import save_file

    from mistral_ft.tokenizer import default_tokenizer_file

    p = dict(ORIGINAL_PARAMS if params is None else params)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(p))
    (folder / "tokenizer.model").write_bytes(Path(default_tokenizer_file()).read_bytes())
    if weights:
        P, g = ORIGINAL_PARAMS, torch.Generator().manual_seed(0)
        D, hd, nh, nkv, H, V = P["dim"], P["head_dim"], P["n_heads"], P["n_kv_heads"], P["hidden_dim"], P["vocab_size"]
        sd = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
        for i in range(P["n_layers"]):
            sd.update({f"layers.{i}.attention.wq.weight": (nh * hd, D), f"layers.{i}.attention.wk.weight": (nkv * hd, D),
                       f"layers.{i}.attention.wv.weight": (nkv * hd, D), f"layers.{i}.attention.wo.weight": (D, nh * hd),
                       f"layers.{i}.feed_forward.w1.weight": (H, D), f"layers.{i}.feed_forward.w2.weight": (D, H),
                       f"layers.{i}.feed_forward.w3.weight": (H, D), f"layers.{i}.attention_norm.weight": (D,),
                       f"layers.{i}.ffn_norm.weight": (D,)})
        save_file({k: torch.randn(*s, generator=g) * 0.1 for k, s in sd.items()}, str(folder / "consolidated.safetensors"))
    return folder


def deep_json(depth: int = 100_000) -> str:
    """A JSON text nested past the parser's recursion limit, on line 2 of the file."""
    return '{\n"a": ' + "[" * depth + "]" * depth + "}\n"


def enospc_open(monkeypatch, under: Path) -> None:
    """Simulate a full disk: any open() for writing below `under` fails as the OS would (ENOSPC)."""
    import builtins
    import errno
    import io

    real_open = builtins.open
    under = str(Path(under).resolve())

    def full_disk_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
                and os.path.abspath(os.fspath(file)).startswith(under):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_open)
    monkeypatch.setattr(io, "open", full_disk_open)  # pathlib's write_text goes through io.open


def case_params(cases: dict, default: set[str]) -> list:
    """pytest params over a case table: the names in `default` run in the default suite, the rest with -m slow
    (the whole corpus costs minutes on 2 cores; the default set keeps one of each kind of failure)."""
    import pytest

    missing = default - set(cases)
    assert not missing, missing
    return [pytest.param(n, id=n, marks=() if n in default else (pytest.mark.slow,)) for n in sorted(cases)]
