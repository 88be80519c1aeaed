"""DGSS-Bench: one harness, one protocol, every DGSS fine-tuning method as a plugin."""
