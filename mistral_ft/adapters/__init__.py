"""peft adapters: LoRA / DoRA / QLoRA config and application (lora), 4-bit quantization, shard-by-shard merge."""
