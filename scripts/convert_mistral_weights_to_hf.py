#!/usr/bin/env python
"""Convert an original Mistral checkpoint (params.json + consolidated.safetensors | consolidated.00.pth +
tokenizer.model[.vN] | tekken.json) to an HF folder.

    python scripts/convert_mistral_weights_to_hf.py --input_dir /path/to/mistral-7B-v0.1 --model_size 7B \\
        --output_dir /path/to/Mistral-7B-v0.1-hf

The logic lives in :mod:`mistral_ft.convert` (importable, tested in-process); this file keeps the seed's command.
"""

import sys

from mistral_ft.convert import main

if __name__ == "__main__":
    sys.exit(main())
