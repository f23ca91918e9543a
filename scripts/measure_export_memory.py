"""Peak memory of `python -m mistral_ft.export` on a model saved in several shards (docs/export.md).

    python scripts/measure_export_memory.py [--layers 8] [--hidden 1024] [--shard-size 100MB] [--keep DIR]

Builds a random Mistral (real vocabulary, fp32) saved in shards of --shard-size, a LoRA adapter on all seven
linear layers with non-zero B, and a run folder around them; then runs the export in a fresh process
(check=false: the merge alone; and check=true) and reports its peak RSS (VmHWM) next to the RSS of a process that
only imports the same modules, the largest shard and the whole model. The merge holds one shard at a time,
so its growth over the import baseline should track the shard size, not the model size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, sys
import torch, safetensors, mistral_ft.model, mistral_ft.tokenizer, mistral_ft.merge, mistral_ft.export
import threading, time
peak_anon = [0]
def sample():  # anonymous memory (tensors), without the file pages of the mmapped shard being read
    while True:
        for l in open("/proc/self/status"):
            if l.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(l.split()[1]))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
if sys.argv[1:]:
    from mistral_ft.export import main
    rc = main(sys.argv[1:])
else:
    rc = 0
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak (the model it built)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
time.sleep(0.01)
print(json.dumps({"rc": rc, "peak_rss_mb": int(hwm) / 1024, "peak_anon_mb": peak_anon[0] / 1024}))
"""


def build(root: Path, layers: int, hidden: int, shard_size: str) -> Path:
    import yaml
    from peft import LoraConfig, get_peft_model

    from mistral_ft import MistralConfig, MistralForCausalLM
    from mistral_ft.runs import record_base
    from mistral_ft.tokenizer import MistralTokenizer

    base = root / "base"
    cfg = MistralConfig(hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
                        num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), pad_token_id=0,
                        max_position_embeddings=4096, torch_dtype="float32")
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg)
    model.save_pretrained(base, max_shard_size=shard_size)
    MistralTokenizer.from_pretrained(None).save_pretrained(base)
    run = root / "run"
    peft_cfg = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=peft_cfg["target_modules"],
                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    pm.save_pretrained(run / "adapter")
    config = {"task": "causal_lm", "model": {"name": "measure", "path": str(base), "tokenizer": None, "dtype": "float32"},
              "peft": peft_cfg, "data": {"format": "messages"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    record_base(run, base, config["model"])
    return run


def measure(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        run = build(root, args.layers, args.hidden, args.shard_size)
        shards = sorted((root / "base").glob("*.safetensors"))
        adapter = (run / "adapter" / "adapter_model.safetensors").stat().st_size
        baseline = measure([])
        merge_only = measure([f"run_dir={run}", f"output_dir={root / 'out1'}", "check=false",
                              f"max_shard_size={args.shard_size}"])
        checked = measure([f"run_dir={run}", f"output_dir={root / 'out2'}", "check=true"])
        mb = 2 ** 20
        out_shards = sorted((root / "out1" / "merged").glob("*.safetensors"))
        report = {
            "model_mb": round(sum(p.stat().st_size for p in shards) / mb, 1),
            "shards": len(shards),
            "largest_shard_mb": round(max(p.stat().st_size for p in shards) / mb, 1),
            "adapter_mb": round(adapter / mb, 1),
            "output_shards": len(out_shards),
            "largest_output_shard_mb": round(max(p.stat().st_size for p in out_shards) / mb, 1),
            "import_baseline_peak_rss_mb": round(baseline["peak_rss_mb"], 1),
            "export_check_false_peak_rss_mb": round(merge_only["peak_rss_mb"], 1),
            "import_baseline_peak_anon_mb": round(baseline["peak_anon_mb"], 1),
            "export_check_false_peak_anon_mb": round(merge_only["peak_anon_mb"], 1),
            "export_check_true_peak_rss_mb": round(checked["peak_rss_mb"], 1),
        }
        report["merge_growth_over_baseline_mb"] = round(report["export_check_false_peak_rss_mb"]
                                                        - report["import_baseline_peak_rss_mb"], 1)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
