"""Multi-device training (never imports mistral_ft.training): checks, strategy, fsdp, sharded checkpoints, rank-local load."""
