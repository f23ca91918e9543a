"""The embedded default (``model=tiny``): a small Mistral pre-trained on plain text, and its random twin.

``tiny_model_path()`` (what ``model=tiny`` loads) is the base shipped in ``mistral_ft/model/tiny_base/``
(bfloat16 safetensors with tied embeddings, 4 MB; cached untied in float32), pre-trained once by ``scripts/build_tiny_base.py`` so that a
LoRA can visibly teach it the bundled chat tasks in minutes. ``random_tiny_path()`` is the same shape built
from a fixed seed (untied, float32), for tests that need weights with no training in them. Both are cached as
real HF folders (config.json + safetensors + tokenizer.model) and loaded through the same ``from_pretrained``
path as a 7B checkpoint, so export, generate and resume all reload the same base. Shapes keep every feature
exercised: GQA (4 query heads, 2 key/value heads), a sliding window (32) shorter than typical test sequences,
and the real 32000-token vocabulary so the Mistral tokenizer works unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import MistralConfig

TINY_CONFIG = dict(
    vocab_size=32000, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, sliding_window=32, rms_norm_eps=1e-6,
    rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
)
TINY_SEED = 1234
TINY_BASE_DIR = Path(__file__).resolve().parent / "tiny_base"  # the shipped pre-trained base (no tokenizer)
TINY_BASE_OVERRIDES = {"tie_word_embeddings": True}  # half the bytes; the shape is TINY_CONFIG's
TINY_VERSION = 2  # bump when the weights a seed produces change (init order), so stale caches are not reused


def cache_root() -> Path:
    """``$MISTRAL_FT_CACHE`` or ``~/.cache/mistral_ft``."""
    return Path(os.environ.get("MISTRAL_FT_CACHE", Path.home() / ".cache" / "mistral_ft")).expanduser()


def build_tiny(folder: str | os.PathLike, seed: int = TINY_SEED, overrides: dict | None = None) -> Path:
    """Write a freshly initialised tiny model (fixed seed) to ``folder``; returns the folder."""
    from .modeling import MistralForCausalLM

    config = MistralConfig(**{**TINY_CONFIG, **(overrides or {})})
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = MistralForCausalLM(config)
    model.save_pretrained(folder)
    from ..tokenizer import MistralTokenizer

    MistralTokenizer.from_pretrained(None).save_pretrained(folder)  # the Mistral-7B-v0.1 tokenizer
    return Path(folder)


def _cached(name: str, build) -> Path:
    """``cache_root()/name``, made by ``build(tmp_folder)`` on first use (atomically: concurrent workers are safe)."""
    folder = cache_root() / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race; its folder is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def random_tiny_path(seed: int = TINY_SEED, overrides: dict | None = None) -> Path:
    """The cached random tiny model folder (fixed seed), built on first use."""
    key = hashlib.sha256(json.dumps([TINY_CONFIG, overrides or {}, seed, TINY_VERSION], sort_keys=True).encode()).hexdigest()[:12]
    return _cached(f"tiny-{key}", lambda tmp: build_tiny(tmp, seed, overrides))


def tiny_base_digest() -> str:
    """sha256 of the shipped base's safetensors (names the cache folder, so a rebuilt base is never stale)."""
    return hashlib.sha256((TINY_BASE_DIR / "model.safetensors").read_bytes()).hexdigest()


def tiny_model_path() -> Path:
    """The pre-trained tiny base (``model=tiny``): the shipped weights (untied) plus the v1 tokenizer, cached as one
    folder named by the shipped file's checksum."""
    if not (TINY_BASE_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"{TINY_BASE_DIR}/model.safetensors is missing: the package is incomplete "
                                "(rebuild it with scripts/build_tiny_base.py)")

    def build(tmp: Path) -> None:
        from safetensors.torch import load_file, save_file

        from ..tokenizer import MistralTokenizer

        # shipped tied in bfloat16 (a quarter of the bytes), cached untied in float32 (exact: bf16 -> fp32 loses
        # nothing), so the base behaves as the random tiny model does: a LoRA or an export touching lm_head
        # never changes the input embeddings through a shared tensor, and exports stay float32
        state = {k: v.float() for k, v in load_file(TINY_BASE_DIR / "model.safetensors").items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((TINY_BASE_DIR / "config.json").read_text(encoding="utf-8"))
        config.update(tie_word_embeddings=False, torch_dtype="float32")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(TINY_BASE_DIR / "generation_config.json", tmp / "generation_config.json")
        MistralTokenizer.from_pretrained(None).save_pretrained(tmp)

    return _cached(f"tiny-base-{tiny_base_digest()[:12]}", build)
