"""The MLflow model registry for Kelix: one pyfunc model version per evaluated bundle, gated releases.

Public API (called by the Prefect flows and the `kelix registry` commands):
    register_bundle(bundle_dir, cfg, metrics, lineage) -> version
    gate(version, cfg) -> GateDecision
    promote(version, cfg, reason, force=False, actor=None) -> PromotionResult
    rollback(cfg, reason, actor=None) -> PromotionResult
    status(cfg) -> dict
    load_bundle("models:/kelix@champion") -> KelixBundle
"""
from kelix.registry.release import (
    CHALLENGER, CHAMPION, PREVIOUS, GateDecision, PromotionResult, check_gate, gate, promote, register_bundle,
    rollback, status,
)
from kelix.registry.resolve import DEFAULT_MODEL, download_bundle, load_bundle, local_bundle
from kelix.registry.store import RegistryConflict, RegistryError, tracking_uri

__all__ = [
    "CHALLENGER", "CHAMPION", "PREVIOUS", "DEFAULT_MODEL", "GateDecision", "PromotionResult", "RegistryConflict",
    "RegistryError", "check_gate", "download_bundle", "gate", "load_bundle", "local_bundle", "promote",
    "register_bundle", "rollback", "status", "tracking_uri",
]
