"""Host memory of loading a model for FSDP2: rank-local (meta + own rows) vs whole-then-shard.

    python scripts/measure_fsdp_load_memory.py MODEL_FOLDER [--world 2]

Each rank (gloo, CPU) reports its resident memory (VmRSS) before loading, its peak (VmHWM) during the
load, and VmRSS after sharding. Reported in docs/distributed.md. File pages touched through the
safetensors memory map count as resident while mapped; the "after" figure is what stays.
"""

from __future__ import annotations

import argparse
import os
import sys


def _mem() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def worker(rank: int, world: int, folder: str, mode: str, q) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.distributed.fsdp import decoder_layers
    from mistral_ft.distributed.rank_local import materialize_rank_local, meta_model
    from mistral_ft.model import MistralForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    c = {"model": {"attn_implementation": "sdpa", "dtype": "float32"}}
    peft_cfg = {"method": "lora", "r": 16, "target_modules": ["q_proj", "v_proj"]}
    import gc

    import peft  # noqa: F401 - imported before the baseline: peft pulls in transformers (~400 MiB)

    gc.collect()
    _reset_peak()
    before = _mem()["VmRSS"]
    rng = torch.random.get_rng_state()
    model = meta_model(c, folder) if mode == "rank_local" else MistralForCausalLM.from_pretrained(folder, torch_dtype="float32")
    model = apply_peft(model, peft_cfg)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if mode == "rank_local":
        materialize_rank_local(model, folder, rng, torch.device("cpu"))
    gc.collect()
    m = _mem()
    q.put((mode, rank, before, m["VmHWM"], m["VmRSS"]))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--world", type=int, default=2)
    a = ap.parse_args()
    size = sum(os.path.getsize(os.path.join(a.folder, f)) for f in os.listdir(a.folder) if f.endswith(".safetensors"))
    print(f"checkpoint: {size / 2**20:.0f} MiB of safetensors, world {a.world}")
    ctx = mp.get_context("spawn")
    for mode in ("whole", "rank_local"):
        q = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, a.world, a.folder, mode, q)) for r in range(a.world)]
        for p in procs:
            p.start()
        rows = sorted(q.get() for _ in procs)
        for p in procs:
            p.join()
        for mode_, rank, before, peak, after in rows:
            print(f"{mode_:10s} rank {rank}: RSS before {before:7.0f} MiB, peak {peak:7.0f} (+{peak - before:.0f}), "
                  f"after {after:7.0f} (+{after - before:.0f})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
