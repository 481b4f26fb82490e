"""Prefect flows for the Kelix lifecycle: one flow per phase and `kelix_pipeline` running them all.

The environment defaults (ephemeral-server startup timeout, analytics off, offline hubs) are applied here,
before any flow module imports Prefect, so every entry point (CLI, `python -m flows.pipeline`, a worker
loading a deployment) starts the same way.
"""
from kelix.env import apply_env_defaults

apply_env_defaults()
