"""Drive the systems in interleaved rounds and report medians, spread, worst round, memory and load.

    python scripts/benchmark.py                      # the headline table: cpu-small, 5 rounds, ~8 min on 2 cores
    python scripts/benchmark.py --systems ours_cli,hf_flat --rounds 7 --json out.json

Method. The parent prepares the model folder, the data file and the steps (`benchmarks.workload`), starts one
worker process per model-level system (`benchmarks.systems.StepSystem`: one process each, so peak RSS is the
system's own) and warms each up on steps 0..warmup-1, untimed. Then each round runs every system on the same
timed steps warmup..N, one system at a time (single-threaded each unless --threads), in ABBA order (the order
reverses every round, so drift and other programs' load hit all systems alike); the CLI runs as one whole
`python -m mistral_ft.train` per round, of which the same steps warmup..N are timed by the run's own per-step
clock, its start-up reported apart. Per system: useful (target) tokens/s per round, median and range; per pair
(system / reference): the median and the worst of the per-round ratios. Load average before and after every
round. Peak RSS: each worker's `ru_maxrss` after the rounds; the CLI's from its summary.json (a whole run's).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.systems import STEP_SYSTEMS, OursCLI, repo_path, system_python, thread_env
from benchmarks.workload import PRESETS, cli_overrides, prepare

PREFIX = "@@bench "  # worker -> parent lines; anything else a library prints on stdout is ignored
DEFAULT_SYSTEMS = ("ours_cli", "ours_model", "hf_flat", "hf_padded", "trl_bfd")
REFERENCE = "hf_flat"  # the strongest peer setup: ratios are against it


# ---- worker side ------------------------------------------------------------------------------------
def worker_main(name: str, spec_path: str) -> None:
    """Serve one model-level system: build, lay out every step (before any timing), run the steps asked."""
    spec = json.loads(Path(spec_path).read_text())
    plan = json.loads((Path(spec["workdir"]) / "plan.json").read_text())["steps"]
    system = STEP_SYSTEMS[name](spec)
    micros = [system.layout(step) for step in plan]
    _send({"event": "ready", "trainable": system.trainable, "rss_mb": _rss_mb(),
           "micro_batches": [len(m) for m in micros],
           "positions": [sum(int(b["input_ids"].numel()) for b in m) for m in micros]})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "train":
            out = [system.train_step(micros[i], plan[i]["targets"]) for i in cmd["steps"]]
            _send({"event": "train", "times": [t for t, _ in out], "losses": [v for _, v in out]})
        elif cmd["op"] == "memory":
            _send({"event": "memory", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        elif cmd["op"] == "exit":
            return


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Worker:
    """The parent's handle on one worker process (JSON lines over stdin / stdout)."""

    def __init__(self, name: str, spec_path: Path, threads: int) -> None:
        self.name = name
        env = {**os.environ, **thread_env(threads), "PYTHONPATH": repo_path()}
        cmd = [system_python(name), "-m", "benchmarks.harness", "--worker", name, str(spec_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise RuntimeError(f"benchmark worker {self.name} exited with {self.proc.wait()} (its stderr is above)")

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(op="exit")
            except (BrokenPipeError, RuntimeError):
                pass
            self.proc.wait(timeout=30)


# ---- parent side ------------------------------------------------------------------------------------
def run(config: str = "cpu-small", systems: tuple[str, ...] = DEFAULT_SYSTEMS, rounds: int | None = None,
        steps: int | None = None, warmup: int | None = None, threads: int = 1, seed: int = 0,
        loss_chunk_size: int = 2048, cli_args: tuple[str, ...] = (), log=print) -> dict[str, Any]:
    """Run the suite; returns the result dict (what --json writes). `cli_args`: extra CLI overrides (e.g.
    trainer.enable_progress_bar=false, to measure what a setting costs)."""
    preset = dict(PRESETS[config])
    rounds = preset["rounds"] if rounds is None else rounds
    steps = preset["steps"] if steps is None else steps
    warmup = preset["warmup"] if warmup is None else warmup
    unknown = [s for s in systems if s not in STEP_SYSTEMS and s != OursCLI.name]
    if unknown:
        raise SystemExit(f"benchmark: unknown system(s) {unknown}; choose from {[OursCLI.name, *STEP_SYSTEMS]}")
    n_steps = warmup + steps
    timed = list(range(warmup, n_steps))
    load = [("start", os.getloadavg())]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mistral_ft_bench_") as tmp:
        workdir = Path(tmp)
        plan = prepare(workdir, preset, n_steps, seed)
        (workdir / "plan.json").write_text(json.dumps(plan))
        spec = {"workdir": str(workdir), "threads": threads, "seed": seed, "seq_len": preset["seq_len"],
                "loss_chunk_size": loss_chunk_size}
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        workers = {s: Worker(s, spec_path, threads) for s in systems if s in STEP_SYSTEMS}
        overrides = cli_overrides(workdir, preset, n_steps, workdir / "run") + list(cli_args)
        cli = OursCLI(spec, overrides) if OursCLI.name in systems else None
        results: dict[str, dict[str, Any]] = {s: {"rounds": [], "times": []} for s in systems}
        try:
            for s, w in workers.items():  # one at a time: start-up would otherwise compete with the others
                results[s]["ready"] = w.recv()
                warm = w.ask(op="train", steps=list(range(warmup)))
                results[s]["first_loss"] = warm["losses"][0] if warm["losses"] else None
                log(f"{s}: ready, warmed up on {warmup} steps")
            order = list(systems)
            for r in range(rounds):
                for s in (order if r % 2 == 0 else order[::-1]):
                    if s == OursCLI.name:
                        out = cli.run(r)
                        times = out["times"][warmup:n_steps]
                        results[s].setdefault("startup_s", []).append(out["startup_s"])
                        results[s].setdefault("warmup_steps_s", []).append(sum(out["times"][:warmup]))
                        results[s].setdefault("step_times_s", []).append(out["times"])
                        results[s].setdefault("peak_rss_mb", []).append(out["peak_rss_mb"])
                        results[s]["first_loss"] = out["losses"][0]
                        if len(times) != len(timed):
                            raise RuntimeError(f"the CLI timed {len(out['times'])} steps, {n_steps} expected")
                    else:
                        times = workers[s].ask(op="train", steps=timed)["times"]
                    results[s]["times"].append(times)
                    results[s]["rounds"].append(sum(plan["steps"][i]["targets"] for i in timed) / sum(times))
                load.append((f"after round {r + 1}", os.getloadavg()))
                log(f"round {r + 1}/{rounds}: " + "  ".join(f"{s} {results[s]['rounds'][-1]:,.0f}" for s in systems)
                    + f" tok/s; load {load[-1][1][0]:.2f}")
            for s, w in workers.items():
                results[s]["peak_rss_mb"] = [w.ask(op="memory")["peak_rss_mb"]]
        finally:
            for w in workers.values():
                w.close()
    res = summarize(config, preset, plan["steps"], timed, systems, results, load, threads, rounds,
                    time.perf_counter() - t_start)
    res["cli_command"] = "python -m mistral_ft.train " + " ".join(o for o in overrides if "hydra.run.dir" not in o) \
        if cli else None
    return res


def summarize(config: str, preset: dict[str, Any], plan: list[dict], timed: list[int], systems: tuple[str, ...],
              results: dict[str, dict[str, Any]], load: list, threads: int, rounds: int, wall: float) -> dict[str, Any]:
    import torch

    labels = {OursCLI.name: (OursCLI.label, OursCLI.layout_note),
              **{k: (v.label, v.layout_note) for k, v in STEP_SYSTEMS.items()}}
    out_systems = {}
    for s in systems:
        res = results[s]
        tok = res["rounds"]
        all_times = [t for ts in res["times"] for t in ts]
        entry = {"label": labels[s][0], "layout": labels[s][1],
                 "tokens_per_s": {"median": statistics.median(tok), "min": min(tok), "max": max(tok), "rounds": tok},
                 "step_time_s": {"median": statistics.median(all_times), "min": min(all_times), "max": max(all_times)},
                 "peak_rss_mb": max(res["peak_rss_mb"]), "first_step_loss": res.get("first_loss")}
        if "ready" in res:
            entry["micro_batches_per_step"] = statistics.fmean(res["ready"]["micro_batches"][i] for i in timed)
            entry["positions_per_step"] = statistics.fmean(res["ready"]["positions"][i] for i in timed)
        if "startup_s" in res:
            entry["startup_s"] = {"median": statistics.median(res["startup_s"]), "rounds": res["startup_s"]}
            entry["warmup_steps_s"] = {"median": statistics.median(res["warmup_steps_s"]), "rounds": res["warmup_steps_s"]}
            entry["step_times_s_by_round"] = res["step_times_s"]  # every step of every run, warm-up included
        out_systems[s] = entry
    ratios = {}
    for ref in (REFERENCE, "ours_model"):
        if ref not in systems:
            continue
        for s in systems:
            if s == ref:
                continue
            per_round = [a / b for a, b in zip(results[s]["rounds"], results[ref]["rounds"])]
            ratios[f"{s}/{ref}"] = {"median": statistics.median(per_round), "worst": min(per_round),
                                    "best": max(per_round),
                                    "peak_rss": out_systems[s]["peak_rss_mb"] / out_systems[ref]["peak_rss_mb"]}
    losses = [e["first_step_loss"] for e in out_systems.values() if e["first_step_loss"] is not None]
    targets = {}
    if "ours_cli/hf_flat" in ratios:
        r = ratios["ours_cli/hf_flat"]
        targets = {"cli_vs_hf_flat_median >= 1.25": r["median"] >= 1.25, "cli_vs_hf_flat_worst >= 1.15": r["worst"] >= 1.15,
                   "cli_vs_hf_flat_peak_rss <= 1.0": r["peak_rss"] <= 1.0}
    if "ours_cli/ours_model" in ratios:
        targets["cli_within_5pct_of_model_step"] = ratios["ours_cli/ours_model"]["median"] >= 0.95
    lengths = [n for i in timed for n in plan[i]["lengths"]]
    return {
        "benchmark": "LoRA fine-tuning steps: mistral_ft (CLI and model-level) vs peers, same examples per step",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": {"type": "cpu", "name": _cpu_name(), "cpu_cores": os.cpu_count(), "threads_per_system": threads},
        "load_avg": [{"when": w, "1m": a[0], "5m": a[1], "15m": a[2]} for w, a in load],
        "versions": _versions(),
        "config": {"name": config, "model": preset["model"], "seq_len": preset["seq_len"],
                   "micro_batch_rows": preset["micro_batch"], "timed_steps": len(timed), "warmup_steps": timed[0],
                   "rounds": rounds, "lora": "r16 alpha32 all 7 linear layers, AdamW lr 1e-4, fp32"},
        "data": {"examples_per_step": statistics.fmean(len(plan[i]["lengths"]) for i in timed),
                 "targets_per_step": statistics.fmean(plan[i]["targets"] for i in timed),
                 "real_tokens_per_step": statistics.fmean(sum(plan[i]["lengths"]) for i in timed),
                 "example_length": {"median": statistics.median(lengths), "max": max(lengths), "min": min(lengths)}},
        "systems": out_systems, "ratios": ratios, "targets": targets,
        "checks": {"first_step_loss_spread": (max(losses) - min(losses)) if losses else None},
        "wall_s": wall, "torch_threads_parent": torch.get_num_threads(),
    }


def print_table(res: dict[str, Any], out=sys.stdout) -> None:
    cfg = res["config"]
    print(f"\n{cfg['name']} on {res['device']['name']} ({res['device']['threads_per_system']} thread(s) per system), "
          f"{cfg['rounds']} rounds x {cfg['timed_steps']} steps after {cfg['warmup_steps']} warm-up; load "
          + " -> ".join(f"{x['1m']:.2f}" for x in res["load_avg"]), file=out)
    print(f"{'system':44} {'tok/s median':>12} {'min-max':>15} {'step s':>7} {'peak RSS MB':>11}", file=out)
    for s, e in res["systems"].items():
        t = e["tokens_per_s"]
        print(f"{e['label']:44} {t['median']:12,.0f} {t['min']:7,.0f}-{t['max']:<7,.0f} "
              f"{e['step_time_s']['median']:7.3f} {e['peak_rss_mb']:11,.0f}", file=out)
    for k, r in res["ratios"].items():
        print(f"  {k:28} median {r['median']:.2f}  worst {r['worst']:.2f}  best {r['best']:.2f}  "
              f"peak RSS {r['peak_rss']:.2f}", file=out)
    if "ours_cli" in res["systems"]:
        print(f"  CLI start-up (not in tok/s): median {res['systems']['ours_cli']['startup_s']['median']:.1f} s", file=out)
    print(f"  first-step loss spread across systems: {res['checks']['first_step_loss_spread']}", file=out)
    for k, v in res["targets"].items():
        print(f"  target {k}: {'met' if v else 'NOT met'}", file=out)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "lightning", "mistral_ft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":  # the worker entry: python -m benchmarks.harness --worker NAME SPEC
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("benchmarks.harness is driven by scripts/benchmark.py")
