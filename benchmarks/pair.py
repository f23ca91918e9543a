"""The model-level pair: mistral_ft beside transformers + peft, training steps and generation, 7B shapes on a GPU.

    python scripts/benchmark.py pair --config mistral-7b --json bench-7b.json     # one GPU (7B shapes, random weights)
    python scripts/benchmark.py pair --config cpu-small --steps 40 --profile      # + top ops of one step

The CPU headline (the CLI and every peer, same examples per step) is `benchmarks.harness`; this module is the
older two-system comparison kept for what the harness does not do: random 7B-shaped weights built on the GPU
(no 14 GB checkpoint on disk), MFU, and generation (prefill / decode) speed.

What is compared (docs/benchmarks.md has the measured tables):

* **mistral_ft**: our ``MistralForCausalLM`` + peft LoRA (through ``mistral_ft.adapters.lora.apply_peft``), examples
  packed into rows of ``--seq-len`` tokens by ``mistral_ft.data.pack_examples`` (position ids restart, no
  attention across documents via ``document_ids``), chunked cross-entropy (no full fp32 logits), token-weighted
  loss (``loss_reduction="sum"`` / targets of the optimizer step).
* **transformers+peft**: transformers' ``MistralForCausalLM`` (``attn_implementation="sdpa"``) + the same LoRA
  config, in its strongest setup without packing: the same examples, sorted by length inside the optimizer step,
  cut into micro-batches whose padded size (rows x longest row) fits the same token budget as our micro-batch
  (``--micro-batch`` x ``--seq-len``), dynamic padding to the micro-batch's longest row, gradient accumulation
  with ``num_items_in_batch`` (transformers' token-weighted loss across micro-batches).

Why it is fair: both systems start from the same weights (ours built from a seed, ``save_pretrained``, loaded by
transformers; for mistral-7b, one seeded init over the sorted HF parameter names in each process), get the same
LoRA initialisation (same seed right before ``get_peft_model``; peft visits the modules in the same order), and
every optimizer step consumes *exactly the same examples*, hence the same useful tokens and the same gradient. The
per-step losses of the two systems therefore agree (reported as a check: a difference means the comparison is
broken, not that one is faster).

Why subprocesses: peak memory on the CPU is the process's peak RSS (``ru_maxrss``), which only means something
per process, so each system runs in its own worker. The parent drives both workers in lock step, alternating
rounds of steps (ABBA order), so load from other programs and thermal drift hit both systems alike; the ratio is
the median of the per-round ratios. Data preparation (tokens -> tensors) happens before timing, for both.

Useful tokens = target tokens (labels that count in the loss after the shift), identical for both systems.
MFU (GPU only) counts useful FLOPs: 4 x matmul parameters per target-bearing token for LoRA (forward 2N,
backward through frozen weights 2N; the LoRA matrices are negligible), 6N for full fine-tuning, plus attention
(12 x heads x head_dim per attended query-key pair per layer, forward + backward), against 989 TFLOP/s (H100
bf16 dense). Recomputation (checkpointing, chunked loss) is not counted, as MFU's definition asks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEMS = ("mistral_ft", "transformers_peft")
LORA = dict(r=16, alpha=32, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
H100_BF16_PEAK_FLOPS = 989e12  # dense, no sparsity (NVIDIA H100 SXM datasheet)
PROTOCOL_PREFIX = "@@bench "  # worker -> parent lines; anything else on the worker's stdout is ignored

# name -> model config, run settings. cpu-small is sized so a full run takes 2-4 minutes on 2 cores; its vocabulary
# is the real one (32000), so the loss/lm_head share of the work is realistic for a small model.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # for the smoke test only
        model=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, sliding_window=4096),
        seq_len=64, micro_batch=2, steps=2, warmup=1, steps_per_round=1, loss_chunk_size=64,
        gen_batch=1, gen_prompt_len=8, gen_new_tokens=4, gen_repeats=1, median_len=20, grad_ckpt=False),
    "cpu-small": dict(
        model=dict(vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, sliding_window=4096),
        seq_len=512, micro_batch=4, steps=12, warmup=1, steps_per_round=1, loss_chunk_size=1024,
        gen_batch=1, gen_prompt_len=256, gen_new_tokens=64, gen_repeats=3, median_len=96, grad_ckpt=False),
    "mistral-7b": dict(  # Mistral-7B-v0.1 shapes (MistralConfig defaults), random weights built on the GPU
        model=dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096),
        seq_len=2048, micro_batch=4, steps=20, warmup=3, steps_per_round=5, loss_chunk_size=2048,
        gen_batch=1, gen_prompt_len=512, gen_new_tokens=128, gen_repeats=3, median_len=256, grad_ckpt=True),
}
COMMON_MODEL = dict(rms_norm_eps=1e-5, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    initializer_range=0.02, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------ data
def make_examples(n: int, seq_len: int, vocab_size: int, median_len: int, seed: int) -> list[dict[str, list[int]]]:
    """Synthetic SFT examples: lognormal lengths (most short, a long tail) clipped to [16, seq_len].

    Each example is BOS + random tokens; the first 20-50 % (the "prompt") are not targets, the rest are. Random
    tokens are fine for speed: no kernel here depends on the token values.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(seq_len, max(16, round(rng.lognormvariate(math.log(median_len), 0.9)))))
        ids = [1] + [rng.randrange(3, vocab_size) for _ in range(length - 1)]
        prompt = max(1, int(length * rng.uniform(0.2, 0.5)))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def plan_steps(examples: list[dict], n_steps: int, seq_len: int, rows_per_step: int,
               micro_batch: int) -> list[dict[str, Any]]:
    """Cut the example stream into optimizer steps and lay each step out for both systems.

    A step takes examples in order until greedy packing (the rule of ``pack_examples``) needs more than
    ``rows_per_step`` rows. Ours: those rows in micro-batches of ``micro_batch`` rows. Theirs: the same examples,
    longest first, in micro-batches whose padded size rows x longest <= micro_batch x seq_len.
    """
    steps, i = [], 0
    budget = micro_batch * seq_len
    for _ in range(n_steps):
        chosen, rows, fill = [], 0, seq_len  # fill = tokens in the current row; start "full" to open row 1
        while True:
            if i >= len(examples):
                raise ValueError("not enough synthetic examples for the requested steps")
            n = len(examples[i]["input_ids"])
            if fill + n > seq_len:
                if rows == rows_per_step:
                    break
                rows, fill = rows + 1, 0
            chosen.append(i)
            fill += n
            i += 1
        by_len = sorted(chosen, key=lambda j: -len(examples[j]["input_ids"]))
        theirs, cur = [], []
        for j in by_len:
            if cur and (len(cur) + 1) * len(examples[cur[0]]["input_ids"]) > budget:
                theirs.append(cur)
                cur = []
            cur.append(j)
        theirs.append(cur)
        targets = sum(sum(1 for t in examples[j]["labels"] if t != -100) for j in chosen)
        steps.append({"examples": chosen, "theirs_micro": theirs, "targets": targets,
                      "lengths": [len(examples[j]["input_ids"]) for j in chosen]})
    return steps


def make_batches(examples: list[dict], plan: list[dict], seq_len: int, micro_batch: int
                 ) -> dict[str, list[list[dict[str, Any]]]]:
    """Per system, per step, the micro-batches as tensors, through mistral_ft.data (the training path's code).

    Ours: ``pack_examples`` rows (position ids restart, document ids), collated ``micro_batch`` rows at a time.
    Theirs: each planned micro-batch padded to its longest example (dynamic padding), with an attention mask.
    """
    from mistral_ft.data import Collator, pack_examples

    collate = Collator(pad_token_id=0)
    ours, theirs = [], []
    for step in plan:
        exs = [examples[j] for j in step["examples"]]
        rows = pack_examples([(e["input_ids"], e["labels"]) for e in exs], seq_len)
        mbs = []
        for k in range(0, len(rows), micro_batch):
            b = collate(rows[k:k + micro_batch])
            mbs.append({key: b[key] for key in ("input_ids", "labels", "position_ids", "document_ids")})
        ours.append(mbs)
        mbs = []
        for micro in step["theirs_micro"]:
            b = collate([examples[j] for j in micro])
            mbs.append({key: b[key] for key in ("input_ids", "attention_mask", "labels")})
        theirs.append(mbs)
    return {"mistral_ft": ours, "transformers_peft": theirs}


def attention_pairs(lengths: list[int], window: int | None) -> int:
    """Query-key pairs a causal (windowed) attention computes usefully over documents of these lengths."""
    total = 0
    for n in lengths:
        if window is None or n <= window:
            total += n * (n + 1) // 2
        else:
            total += window * (window + 1) // 2 + (n - window) * window
    return total


def matmul_params(cfg: dict[str, Any]) -> int:
    """Parameters of the linear layers a token goes through (attention, MLP, lm_head; not the embedding)."""
    D, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = D // cfg["num_attention_heads"]
    attn = D * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    return L * (attn + 3 * D * I) + D * cfg["vocab_size"]


# ------------------------------------------------------------------------------------------------ worker
def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(PROTOCOL_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Worker:
    """One system (ours or theirs) in its own process: builds the model, runs the steps the parent asks for."""

    def __init__(self, system: str, workdir: Path):
        import torch

        self.torch = torch
        self.system = system
        self.spec = json.loads((workdir / "spec.json").read_text())
        self.plan = json.loads((workdir / "plan.json").read_text())
        # tensors made by the parent (mistral_ft.data's packer and collator) before any timing
        batches = torch.load(workdir / f"batches_{system}.pt", weights_only=True)
        self.device = torch.device(self.spec["device"])
        self.dtype = getattr(torch, self.spec["dtype"])
        if self.spec.get("threads"):
            torch.set_num_threads(self.spec["threads"])
        self.model = self._build(lora=True)
        if self.spec["grad_ckpt"]:
            if system == "mistral_ft":
                self.model.get_base_model().gradient_checkpointing_enable()
            else:
                self.model.get_base_model().gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
                self.model.get_base_model().enable_input_require_grads()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        self.batches = [[{k: v.to(self.device) for k, v in b.items()} for b in step] for step in batches]
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.setup_rss = _rss_mb()
        self.setup_alloc = torch.cuda.memory_allocated() / 2**20 if self.device.type == "cuda" else None
        self.train_peak: dict[str, Any] | None = None
        self.gen_model = None

    # setup ----------------------------------------------------------------------------------------
    def _build(self, lora: bool):
        torch = self.torch
        spec = self.spec
        if spec["weights"]:  # cpu configs: the same saved weights for both systems
            if self.system == "mistral_ft":
                from mistral_ft import MistralForCausalLM

                model = MistralForCausalLM.from_pretrained(spec["weights"], torch_dtype=self.dtype,
                                                           device=str(self.device), attn_implementation="sdpa")
            else:
                import transformers

                model = transformers.MistralForCausalLM.from_pretrained(
                    spec["weights"], dtype=self.dtype, attn_implementation="sdpa").to(self.device)
        else:  # 7B shapes: random weights made on the device (no 14 GB checkpoint on disk)
            torch.manual_seed(spec["seed"])
            default = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                with self.device:
                    if self.system == "mistral_ft":
                        from mistral_ft import MistralConfig, MistralForCausalLM

                        model = MistralForCausalLM(MistralConfig(**spec["model"], attn_implementation="sdpa"))
                    else:
                        import transformers

                        cfg = transformers.MistralConfig(**spec["model"])
                        cfg._attn_implementation = "sdpa"
                        model = transformers.MistralForCausalLM(cfg)
            finally:
                torch.set_default_dtype(default)
            # Same weights on both sides without a checkpoint on disk: one init by (sorted) HF parameter names.
            torch.manual_seed(spec["seed"])
            with torch.no_grad():
                for name, p in sorted(model.named_parameters()):
                    if name.endswith("norm.weight"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, spec["model"]["initializer_range"])
        if not lora:
            return model.eval()
        torch.manual_seed(spec["seed"] + 1)  # same LoRA A matrices on both sides (same module order)
        if self.system == "mistral_ft":
            from mistral_ft.adapters.lora import apply_peft

            return apply_peft(model, {"method": "lora", **LORA}, task="causal_lm")
        import peft

        cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=float(LORA["alpha"]), lora_dropout=LORA["dropout"],
                              target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM")
        return peft.get_peft_model(model, cfg)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    # commands -------------------------------------------------------------------------------------
    def train_step(self, index: int) -> dict[str, Any]:
        torch = self.torch
        step = self.plan[index]
        n_targets = step["targets"]
        self._sync()
        t0 = time.perf_counter()
        total = torch.zeros((), device=self.device)
        for b in self.batches[index]:
            if self.system == "mistral_ft":
                out = self.model(**b, loss_reduction="sum", loss_chunk_size=self.spec["loss_chunk_size"],
                                 return_logits=False)
                loss = out.loss / n_targets
            else:
                out = self.model(**b, use_cache=False,
                                 num_items_in_batch=torch.tensor(n_targets, device=self.device))
                loss = out.loss
            loss.backward()
            total += loss.detach()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss_value = float(total)  # a sync on the GPU
        self._sync()
        dt = time.perf_counter() - t0
        processed = sum(int(b["input_ids"].numel()) for b in self.batches[index])
        return {"step": index, "time_s": dt, "loss": loss_value, "targets": n_targets,
                "processed_tokens": processed, "micro_batches": len(self.batches[index])}

    def memory(self) -> dict[str, Any]:
        if self.train_peak is None:  # first call = after training: generation must not count
            torch = self.torch
            if self.device.type == "cuda":
                self.train_peak = {"peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                                   "setup_allocated_mb": self.setup_alloc,
                                   "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
            else:
                self.train_peak = {"peak_rss_mb": _peak_rss_mb(), "setup_rss_mb": self.setup_rss}
            self.train_peak["trainable_params"] = self.trainable
        return self.train_peak

    def profile(self, index: int, top: int = 15) -> list[dict[str, Any]]:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            self.train_step(index)
        def self_time(e) -> float:  # microseconds of the op itself (children excluded)
            return e.self_device_time_total if self.device.type == "cuda" else e.self_cpu_time_total

        events = sorted(prof.key_averages(), key=self_time, reverse=True)
        total = sum(self_time(e) for e in events) or 1.0
        return [{"op": e.key, "self_ms": self_time(e) / 1000, "share": self_time(e) / total, "calls": e.count}
                for e in events[:top]]

    def generate(self, batch: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
        """Greedy decoding, EOS disabled; prefill time = generate(1 new token), decode = the rest per token."""
        torch = self.torch
        self.memory()
        if self.gen_model is None:
            self.model = self.opt = self.batches = None  # training is over: free it before loading the base
            import gc

            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.gen_model = self._build(lora=False)
            if self.system == "transformers_peft":
                self.gen_model.generation_config.eos_token_id = None
                self.gen_model.generation_config.pad_token_id = 0
        g = torch.Generator().manual_seed(self.spec["seed"] + 2)
        ids = torch.randint(3, self.spec["model"]["vocab_size"], (batch, prompt_len), generator=g)
        ids[:, 0] = 1
        ids = ids.to(self.device)
        mask = torch.ones_like(ids)

        def run(n: int):
            self._sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                if self.system == "mistral_ft":
                    seq = self.gen_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                                  eos_token_id=[])
                else:
                    seq = self.gen_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                                  min_new_tokens=n)
            self._sync()
            return time.perf_counter() - t0, seq

        t_prefill, _ = run(1)
        t_full, seq = run(new_tokens)
        return {"prefill_s": t_prefill, "full_s": t_full, "new_tokens": int(seq.shape[1] - prompt_len),
                "tokens": seq[0, prompt_len:].tolist()}


def worker_main(system: str, workdir: str) -> None:
    """Import the heavy libraries while the parent prepares weights and data, then serve its commands."""
    import peft  # noqa: F401  (imports transformers too: the slow part of a worker's start)
    import torch  # noqa: F401

    if system == "mistral_ft":
        import mistral_ft.adapters.lora  # noqa: F401
    else:
        import transformers  # noqa: F401
    line = sys.stdin.readline()
    if not line or json.loads(line)["op"] != "setup":
        return
    w = Worker(system, Path(workdir))
    _send({"event": "ready", "setup_rss_mb": w.setup_rss, "trainable_params": w.trainable})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "train":
            _send({"event": "train", "steps": [w.train_step(i) for i in cmd["steps"]]})
        elif op == "memory":
            _send({"event": "memory", **w.memory()})
        elif op == "profile":
            _send({"event": "profile", "top": w.profile(cmd["step"])})
        elif op == "generate":
            _send({"event": "generate", **w.generate(cmd["batch"], cmd["prompt_len"], cmd["new_tokens"])})
        elif op == "quit":
            break


# ------------------------------------------------------------------------------------------------ parent
class WorkerProc:
    """The parent's handle on a worker: JSON commands on stdin, ``@@bench`` JSON lines back on stdout."""

    def __init__(self, system: str, workdir: Path):
        self.system = system
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", system,
                                      "--workdir", str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL_PREFIX):
                return json.loads(line[len(PROTOCOL_PREFIX):])
        raise RuntimeError(f"benchmark worker {self.system} exited with code {self.proc.wait()} (see its stderr)")

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask_nowait(op="quit")
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()

    def ask_nowait(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "mistral_ft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu-small",
                   help="cpu-small (CPU or GPU), mistral-7b (GPU only), tiny (smoke test)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per system")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps per system before timing")
    p.add_argument("--steps-per-round", type=int, help="steps one system runs before the other takes its turn")
    p.add_argument("--seq-len", type=int, help="packed row length; also the per-micro-batch token budget / rows")
    p.add_argument("--micro-batch", type=int, help="packed rows per micro-batch (ours)")
    p.add_argument("--grad-accum", type=int, default=1, help="our micro-batches per optimizer step")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing on both sides (default: on for mistral-7b only)")
    p.add_argument("--loss-chunk-size", type=int, help="tokens per chunk of our chunked cross-entropy")
    p.add_argument("--gen-batch", type=int)
    p.add_argument("--gen-prompt-len", type=int)
    p.add_argument("--gen-new-tokens", type=int)
    p.add_argument("--gen-repeats", type=int)
    p.add_argument("--no-generate", action="store_true", help="skip the generation benchmark")
    p.add_argument("--profile", action="store_true", help="profile one extra step per system; top ops in the JSON")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = CONFIGS[args.config]
    for key in ("steps", "warmup", "steps_per_round", "seq_len", "micro_batch", "loss_chunk_size", "gen_batch",
                "gen_prompt_len", "gen_new_tokens", "gen_repeats", "grad_ckpt"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    for key in ("steps", "steps_per_round", "seq_len", "micro_batch", "grad_accum", "loss_chunk_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare weights and data, drive both workers in alternating rounds, and collect the results."""
    import torch

    preset = CONFIGS[args.config]
    cuda = torch.cuda.is_available()
    if args.config == "mistral-7b" and not cuda:
        raise SystemExit("benchmark: --config mistral-7b needs a CUDA GPU (7B shapes do not train on a CPU in "
                         "minutes); use --config cpu-small here")
    device = "cuda" if cuda else "cpu"
    dtype = "bfloat16" if cuda else "float32"
    model_cfg = {**COMMON_MODEL, **preset["model"]}
    if args.seq_len > model_cfg["max_position_embeddings"]:
        raise SystemExit(f"benchmark: --seq-len {args.seq_len} > max_position_embeddings "
                         f"{model_cfg['max_position_embeddings']}")
    n_steps = args.warmup + args.steps + (1 if args.profile else 0)
    rows_per_step = args.micro_batch * args.grad_accum
    mean_len = preset["median_len"] * math.exp(0.9 ** 2 / 2)
    n_examples = int(n_steps * rows_per_step * args.seq_len / mean_len * 1.5) + 64
    examples = make_examples(n_examples, args.seq_len, model_cfg["vocab_size"], preset["median_len"], args.seed)
    plan = plan_steps(examples, n_steps, args.seq_len, rows_per_step, args.micro_batch)
    used = sorted({j for s in plan for j in s["examples"]})
    lengths = [len(examples[j]["input_ids"]) for j in used]

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mistral_ft_bench_") as tmp:
        workdir = Path(tmp)
        workers = {s: WorkerProc(s, workdir) for s in SYSTEMS}  # they import their libraries while we prepare
        try:
            weights = None
            if args.config != "mistral-7b":
                from mistral_ft import MistralConfig, MistralForCausalLM

                torch.manual_seed(args.seed)
                MistralForCausalLM(MistralConfig(**model_cfg)).save_pretrained(workdir / "weights")
                weights = str(workdir / "weights")
            spec = {"device": device, "dtype": dtype, "model": model_cfg, "weights": weights, "seed": args.seed,
                    "seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_ckpt": bool(args.grad_ckpt),
                    "loss_chunk_size": args.loss_chunk_size, "threads": args.threads}
            (workdir / "spec.json").write_text(json.dumps(spec))
            (workdir / "plan.json").write_text(json.dumps(plan))
            for s, batches in make_batches(examples, plan, args.seq_len, args.micro_batch).items():
                torch.save(batches, workdir / f"batches_{s}.pt")
            del examples
            measured = drive(workers, args, n_steps)
        finally:
            for w in workers.values():
                w.close()
    load_after = os.getloadavg()
    return summarize(args, device, dtype, model_cfg, plan, lengths, *measured, load_before, load_after)


def drive(workers: dict[str, WorkerProc], args: argparse.Namespace, n_steps: int) -> tuple:
    """Warm up, then alternate rounds of timed steps (ABBA), then memory, profile and generation rounds."""
    for w in workers.values():
        w.ask_nowait(op="setup")
    ready = {s: w.recv() for s, w in workers.items()}
    results: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    rounds: list[dict[str, float]] = []
    order = list(SYSTEMS)
    if args.warmup:  # untimed: first steps allocate, fill caches, pick kernels
        for s in order:
            workers[s].ask(op="train", steps=list(range(args.warmup)))
    timed = list(range(args.warmup, args.warmup + args.steps))
    for r, k in enumerate(range(0, len(timed), args.steps_per_round)):
        chunk = timed[k:k + args.steps_per_round]
        tok_s = {}
        for s in (order if r % 2 == 0 else order[::-1]):  # ABBA: neither system always goes first
            steps = workers[s].ask(op="train", steps=chunk)["steps"]
            results[s].extend(steps)
            tok_s[s] = sum(x["targets"] for x in steps) / sum(x["time_s"] for x in steps)
        rounds.append(tok_s)
        print(f"round {r + 1}: " + "  ".join(f"{s} {v:,.0f} tok/s" for s, v in tok_s.items()),
              file=sys.stderr, flush=True)
    memory = {s: w.ask(op="memory") for s, w in workers.items()}  # before generation, which frees training
    profiles = {}
    if args.profile:
        for s, w in workers.items():
            profiles[s] = w.ask(op="profile", step=n_steps - 1)["top"]
    gens: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    if not args.no_generate:
        for r in range(args.gen_repeats):
            for s in (order if r % 2 == 0 else order[::-1]):
                gens[s].append(workers[s].ask(op="generate", batch=args.gen_batch, prompt_len=args.gen_prompt_len,
                                              new_tokens=args.gen_new_tokens))
    return ready, results, rounds, memory, profiles, gens


def summarize(args, device, dtype, model_cfg, plan, lengths, ready, results, rounds, memory, profiles, gens,
              load_before, load_after) -> dict[str, Any]:
    import torch

    timed_plan = plan[args.warmup:args.warmup + args.steps]
    systems: dict[str, dict[str, Any]] = {}
    n_params = matmul_params(model_cfg)
    window = model_cfg["sliding_window"]
    flops_per_step = []
    for step in timed_plan:  # useful FLOPs, the same for both systems
        # a token predicts the next one whether or not it is a target; FLOPs count every real (non-pad) token
        real = sum(step["lengths"])
        pairs = attention_pairs(step["lengths"], window)
        hd = model_cfg["hidden_size"] // model_cfg["num_attention_heads"]
        attn = 12 * model_cfg["num_attention_heads"] * hd * pairs * model_cfg["num_hidden_layers"]
        flops_per_step.append(4 * n_params * real + attn)
    for s in SYSTEMS:
        steps = results[s]
        times = [x["time_s"] for x in steps]
        targets = sum(x["targets"] for x in steps)
        real_tokens = sum(sum(st["lengths"]) for st in timed_plan)
        processed = sum(x["processed_tokens"] for x in steps)
        entry: dict[str, Any] = {
            "train": {
                "steps": len(steps),
                "tokens_per_s": targets / sum(times),
                "tokens_per_s_rounds_median": statistics.median(r[s] for r in rounds),
                "input_tokens_per_s": real_tokens / sum(times),
                "step_time_s": _stats(times),
                "micro_batches_per_step": statistics.fmean(x["micro_batches"] for x in steps),
                "processed_tokens_per_step": processed / len(steps),
                "padding_efficiency": real_tokens / processed,
                "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
                "losses": [x["loss"] for x in steps],
            },
            "memory": memory[s],
            "setup_rss_mb": ready[s]["setup_rss_mb"],
        }
        if device == "cuda":
            entry["train"]["mfu"] = sum(flops_per_step) / sum(times) / H100_BF16_PEAK_FLOPS
        if s in profiles:
            entry["profile_top_ops"] = profiles[s]
        if gens[s]:
            g = gens[s]
            B, T = args.gen_batch, args.gen_prompt_len
            pre = [B * T / x["prefill_s"] for x in g]
            # decode = the steps after the first token; too short a run to separate from noise gives None
            dec = [B * (x["new_tokens"] - 1) / (x["full_s"] - x["prefill_s"]) for x in g
                   if x["new_tokens"] > 1 and x["full_s"] > x["prefill_s"]]
            entry["generate"] = {"batch": B, "prompt_len": T, "new_tokens": g[0]["new_tokens"],
                                 "prefill_tokens_per_s": statistics.median(pre),
                                 "decode_tokens_per_s": statistics.median(dec) if dec else None,
                                 "full_generate_s": statistics.median(x["full_s"] for x in g)}
        systems[s] = entry
    ours, theirs = systems["mistral_ft"], systems["transformers_peft"]
    mem_key = "peak_allocated_mb" if device == "cuda" else "peak_rss_mb"
    setup_key = "setup_allocated_mb" if device == "cuda" else "setup_rss_mb"

    def increment(e):
        return e["memory"][mem_key] - e["memory"][setup_key]

    ratios = {
        "train_tokens_per_s": statistics.median(r["mistral_ft"] / r["transformers_peft"] for r in rounds),
        "step_time_median": ours["train"]["step_time_s"]["median"] / theirs["train"]["step_time_s"]["median"],
        "peak_memory": ours["memory"][mem_key] / theirs["memory"][mem_key],
        "train_memory_above_setup": increment(ours) / max(increment(theirs), 1e-9),
    }
    if "generate" in ours and "generate" in theirs:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            a, b = ours["generate"][key], theirs["generate"][key]
            ratios[key] = a / b if a and b else None
    loss_diff = max(abs(a - b) for a, b in zip(ours["train"]["losses"], theirs["train"]["losses"]))
    checks = {"loss_max_abs_diff": loss_diff}
    if gens["mistral_ft"] and gens["transformers_peft"]:
        checks["greedy_tokens_equal"] = gens["mistral_ft"][0]["tokens"] == gens["transformers_peft"][0]["tokens"]
    targets = {}
    if device == "cpu":
        targets = {"train_tokens_per_s_ratio": {"target": ">= 1.5", "measured": ratios["train_tokens_per_s"],
                                                "met": ratios["train_tokens_per_s"] >= 1.5},
                   "peak_memory_ratio": {"target": "<= 0.8", "measured": ratios["peak_memory"],
                                         "met": ratios["peak_memory"] <= 0.8}}
    device_name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {
        "benchmark": "LoRA fine-tuning + generation: mistral_ft vs transformers+peft",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python scripts/benchmark.py"] + args.argv),
        "device": {"type": device, "name": device_name, "cpu_cores": os.cpu_count(),
                   "torch_threads": args.threads or torch.get_num_threads()},
        "load_avg_before": list(load_before), "load_avg_after": list(load_after),
        "versions": _versions(),
        "config": {"name": args.config, **model_cfg},
        "settings": {"dtype": dtype, "steps": args.steps, "warmup": args.warmup,
                     "steps_per_round": args.steps_per_round, "seq_len": args.seq_len,
                     "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
                     "grad_ckpt": bool(args.grad_ckpt), "loss_chunk_size": args.loss_chunk_size,
                     "lora": LORA, "optimizer": "AdamW(lr=1e-4) on the LoRA parameters", "seed": args.seed},
        "data": {"examples_used": len(lengths), "length": {**_stats([float(n) for n in lengths]),
                                                          "p90": sorted(lengths)[int(0.9 * (len(lengths) - 1))]},
                 "targets_per_step": statistics.fmean(s["targets"] for s in timed_plan),
                 "real_tokens_per_step": statistics.fmean(sum(s["lengths"]) for s in timed_plan)},
        "rounds_tokens_per_s": rounds,
        "systems": systems,
        "ratios": ratios,
        "targets": targets,
        "checks": checks,
    }


def print_table(res: dict[str, Any]) -> None:
    o, t = res["systems"]["mistral_ft"], res["systems"]["transformers_peft"]
    gpu = res["device"]["type"] == "cuda"
    mem_key = "peak_allocated_mb" if gpu else "peak_rss_mb"
    setup_key = "setup_allocated_mb" if gpu else "setup_rss_mb"
    rows = [
        ("useful tokens/s (median of rounds)", "{:,.0f}", lambda e: e["train"]["tokens_per_s_rounds_median"]),
        ("useful tokens/s (all steps)", "{:,.0f}", lambda e: e["train"]["tokens_per_s"]),
        ("step time median (s)", "{:.3f}", lambda e: e["train"]["step_time_s"]["median"]),
        ("micro-batches / step", "{:.2f}", lambda e: e["train"]["micro_batches_per_step"]),
        ("padding efficiency", "{:.1%}", lambda e: e["train"]["padding_efficiency"]),
        (f"peak memory ({'allocated' if gpu else 'RSS'}, MB)", "{:,.0f}", lambda e: e["memory"][mem_key]),
        ("memory after setup (MB)", "{:,.0f}", lambda e: e["memory"][setup_key]),
        ("loss first / last step", "{}", lambda e: f"{e['train']['loss_first']:.4f} / {e['train']['loss_last']:.4f}"),
    ]
    if gpu:
        rows.append(("MFU", "{:.1%}", lambda e: e["train"]["mfu"]))
    if "generate" in o:
        rows += [("prefill tokens/s", "{:,.0f}", lambda e: e["generate"]["prefill_tokens_per_s"]),
                 ("decode tokens/s", "{:,.1f}", lambda e: e["generate"]["decode_tokens_per_s"])]
    w = max(len(r[0]) for r in rows) + 2
    print(f"\n{res['config']['name']} on {res['device']['name']} ({res['device']['type']}, {res['settings']['dtype']})")
    print(f"{'':{w}}{'mistral_ft':>18}{'transformers+peft':>20}")
    def cell(fmt: str, value: Any) -> str:
        return "n/a" if value is None else fmt.format(value)

    for name, fmt, get in rows:
        print(f"{name:{w}}{cell(fmt, get(o)):>18}{cell(fmt, get(t)):>20}")
    print("\nratios ours/theirs: " + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a"
                                              for k, v in res["ratios"].items()))
    print("checks: " + ", ".join(f"{k} {v}" for k, v in res["checks"].items()))
    for name, tgt in res["targets"].items():
        print(f"target {name} {tgt['target']}: measured {tgt['measured']:.2f} -> {'met' if tgt['met'] else 'NOT met'}")
    for s, e in res["systems"].items():
        if "profile_top_ops" in e:
            print(f"\ntop ops, one step of {s}:")
            for op in e["profile_top_ops"]:
                print(f"  {op['self_ms']:9.1f} ms {op['share']:6.1%} {op['calls']:6d}  {op['op']}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.workdir)
        return None
    res = run_benchmark(args)
    print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.json}")
    return res


if __name__ == "__main__":
    main()
