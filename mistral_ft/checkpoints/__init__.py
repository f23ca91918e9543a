"""Checkpoint formats: export a run to Hugging Face folders (+ self-check); convert original Mistral weights."""
