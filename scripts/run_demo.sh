#!/usr/bin/env bash
# The README's main command: instruction-tune the embedded tiny Mistral (model=tiny, pre-trained on plain
# text and shipped in the package) with LoRA on the bundled chats, then show what it answers to held-out
# chats before -> after. Runs on a CPU in a few minutes; no download. Extra arguments are overrides,
# e.g. scripts/run_demo.sh trainer.max_steps=200 optimizer.lr=3e-3
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"   # creates/reuses .venv, installs the project, cd to the repo
RUN_DIR="${RUN_DIR:-runs/demo/$(date +%Y-%m-%d_%H-%M-%S)}"
for arg in "$@"; do   # a run folder given as an override wins (the last one, as Hydra reads them)
    case "$arg" in hydra.run.dir=*|++hydra.run.dir=*) RUN_DIR="${arg#*hydra.run.dir=}" ;; esac
done
"$VPY" -m mistral_ft.train recipe=instruct_lora model=tiny "hydra.run.dir=$RUN_DIR" "$@"
echo "Demo run folder: $RUN_DIR (summary.json, loss_curve.png, checkpoints/, adapter/)"
# Did it learn? Greedy answers on the held-out chats, base model vs. base + the run's adapter.
"$VPY" scripts/demo_report.py --run "$RUN_DIR"
