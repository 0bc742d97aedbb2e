"""Rollout server: a vLLM AsyncLLM engine that serves work orders and takes live weights."""
