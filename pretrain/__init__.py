"""Pretraining: tokenizer, data pipeline, model presets, training loop and HF export."""
