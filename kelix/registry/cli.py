"""`kelix registry status | promote VERSION [--force] [--reason TEXT] | rollback [--reason TEXT]`.

The config (preset, params, --set) gives the model name and the gate; the tracking URI comes from
MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db in the repo). A refused promotion exits with status 1.
"""
from __future__ import annotations

import argparse
import json


def _cfg(args):
    from kelix.config_cli import config_from_args

    return config_from_args(args)


def _guard(fn):
    """Registry and bundle errors are user errors: print them without a traceback."""
    def run(args: argparse.Namespace) -> int:
        from kelix.bundle import BundleError
        from kelix.cli import UserError
        from kelix.registry.store import RegistryError

        try:
            return fn(args)
        except (RegistryError, BundleError) as exc:
            raise UserError(str(exc)) from exc
    return run


def _fmt_metrics(metrics: dict[str, float], keys) -> str:
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


@_guard
def _status(args: argparse.Namespace) -> int:
    from kelix.registry import status

    info = status(_cfg(args))
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"model {info['model']} at {info['tracking_uri']}")
    if not info["exists"]:
        print("  not registered yet: run the pipeline (or the release flow) to register an evaluated bundle")
        return 0
    gated = sorted(info["thresholds"])
    print("thresholds: " + ", ".join(f"{k} >= {v}" for k, v in sorted(info["thresholds"].items()))
          + f"; regression tolerance {info['regression_tolerance']}"
          + "".join(f", {k} {v}" for k, v in sorted(info.get("metric_tolerances", {}).items())))
    for alias, meta in info["aliases"].items():
        lin = meta["lineage"]
        print(f"  @{alias:18s} v{meta['version']:4s} {_fmt_metrics(meta['metrics'], gated)}  "
              f"git {lin.get('git_sha', '?')[:12]} data {lin.get('data_version', '?')[:12]}")
    print("versions:")
    for v in info["versions"]:
        print(f"  v{v['version']:4s} gate={v['gate'] or '-':7s} aliases={','.join(v['aliases']) or '-'}")
    if info["history"]:
        print("history (newest first):")
        for h in info["history"]:
            print(f"  {h.get('time', '')[:19]} {h.get('action', ''):9s} v{h.get('from') or '-'} -> v{h.get('to') or '-'} "
                  f"by {h.get('actor', '')}: {h.get('reason', '')}")
    return 0


@_guard
def _promote(args: argparse.Namespace) -> int:
    from kelix.registry import promote

    result = promote(args.version, _cfg(args), args.reason, force=args.force, actor=args.actor)
    print(result.message)
    if result.decision and result.decision.failures:
        for failure in result.decision.failures:
            print(f"  - {failure}")
    return 0 if result.promoted or "already the champion" in result.message else 1


@_guard
def _rollback(args: argparse.Namespace) -> int:
    from kelix.registry import rollback

    print(rollback(_cfg(args), args.reason, actor=args.actor).message)
    return 0


def register(sub) -> None:
    from kelix.config_cli import add_config_args

    reg = sub.add_parser("registry", help="model registry: status, promote, rollback (MLflow aliases)")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="ACTION")
    reg_sub.required = True
    st = reg_sub.add_parser("status", help="aliases, versions and promotion history")
    add_config_args(st)
    st.add_argument("--json", action="store_true", help="print the full status as JSON")
    st.set_defaults(func=_status)
    pr = reg_sub.add_parser("promote", help="make VERSION champion if it passes the gate")
    pr.add_argument("version", help="model version number")
    add_config_args(pr)
    pr.add_argument("--force", action="store_true", help="promote even if the gate fails (recorded as forced)")
    pr.add_argument("--reason", default="manual promotion", help="why (kept in the promotion record)")
    pr.add_argument("--actor", default=None, help="who (default: $KELIX_ACTOR or user@host)")
    pr.set_defaults(func=_promote)
    rb = reg_sub.add_parser("rollback", help="point champion back at previous-champion")
    add_config_args(rb)
    rb.add_argument("--reason", default="manual rollback", help="why (kept in the rollback record)")
    rb.add_argument("--actor", default=None, help="who (default: $KELIX_ACTOR or user@host)")
    rb.set_defaults(func=_rollback)
