"""Learner: advantages, losses, staleness, optimizer, weight publishing and checkpoints."""
