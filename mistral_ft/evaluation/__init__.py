"""Evaluation of fine-tuned models by what they generate (issue 14)."""
