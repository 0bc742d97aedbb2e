"""OpenAI-compatible HTTP serving over the same vLLM engine that training updates (issue 4)."""
