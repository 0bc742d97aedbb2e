"""Environments: the `Env` protocol, built-in verifiable tasks and the registry."""
