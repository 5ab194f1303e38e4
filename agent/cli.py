"""The `agent` command line.

Each subcommand imports what it needs inside its handler, so `agent --help`
never pays for torch, transformers, mujoco or horovod.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def _doctor(args: argparse.Namespace) -> int:
    """Report what this installation can do (versions, Horovod build, rendering)."""
    from agent.doctor import report

    return report(as_json=args.json)


def _serve(args: argparse.Namespace) -> int:
    """Run the decision server until SIGINT/SIGTERM."""
    from agent.extras import require

    require("serve", "agent serve")
    from agent.serve import serve

    return serve(args)


def _keys(args: argparse.Namespace) -> int:
    """Create CURVE key pairs for `agent serve --curve DIR` and its robots."""
    from agent.curve import create_keys

    try:
        paths = create_keys(args.directory, tuple(args.client or ["client"]))
    except (ValueError, OSError) as exc:
        print(f"agent keys: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve next-action decisions to robots over ZeroMQ")
    serve.add_argument("--env", required=True, help="gymnasium env id, e.g. tabletop/PickPlace-v0")
    serve.add_argument(
        "--backend",
        default=None,
        help="decision backend (default: oracle for skill envs, else zero)",
    )
    serve.add_argument("--model", default=None, help="model path or id for the backend")
    serve.add_argument(
        "--backend-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, repeatable (e.g. temperature=0.6 for cosmos)",
    )
    serve.add_argument(
        "--swap-at",
        choices=("batch", "episode"),
        default=None,
        help="policy/onnx: serve a new version from the next batch (default) or from new episodes",
    )
    teach = serve.add_argument_group("teacher (DAgger labels, mixing, escalation)")
    teach.add_argument(
        "--teacher", default=None, help="a backend that labels every step (e.g. oracle, cosmos)"
    )
    teach.add_argument("--teacher-model", default=None, help="the teacher's --model")
    teach.add_argument(
        "--teacher-opt", action="append", default=[], metavar="KEY=VALUE", help="teacher option"
    )
    teach.add_argument(
        "--beta", type=float, default=0.0, help="the teacher acts with this probability (DAgger)"
    )
    teach.add_argument(
        "--escalate-below",
        type=float,
        default=None,
        metavar="P",
        help="the teacher acts where the student's confidence is below P",
    )
    teach.add_argument(
        "--label",
        choices=("every", "escalated"),
        default="every",
        help="ask the teacher on every step (labels) or only where it acts",
    )
    teach.add_argument("--teacher-seed", type=int, default=0, help="seed of the --beta draws")
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint to bind")
    serve.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="DIR",
        help="write every finished episode to DIR/*.parquet",
    )
    serve.add_argument("--max-batch", type=int, default=16, help="most robots per backend call")
    serve.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=2.0,
        help="longest a request waits for others to join its batch",
    )
    serve.add_argument(
        "--max-message-mb",
        type=float,
        default=16.0,
        help="largest accepted message (enforced by ZeroMQ)",
    )
    serve.add_argument(
        "--episode-timeout-s",
        type=float,
        default=30.0,
        help="close an episode as truncated after this long without a message",
    )
    serve.add_argument(
        "--reload-every-s",
        type=float,
        default=None,
        help="look for a newer model version this often (default: the backend's own, "
        "1 s for policy/onnx; others have no versions)",
    )
    serve.add_argument(
        "--curve",
        type=Path,
        default=None,
        metavar="DIR",
        help="require CURVE authentication with the keys in DIR (see `agent keys`)",
    )
    serve.add_argument(
        "--openpi-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve openpi's WebSocket policy protocol on PORT (0: any)",
    )
    serve.add_argument("--openpi-host", default="127.0.0.1", help="host for --openpi-port")
    serve.add_argument("--quiet", action="store_true", help="no periodic statistics")
    serve.set_defaults(handler=_serve)

    keys = sub.add_parser("keys", help="create CURVE key pairs for authenticated robots")
    keys.add_argument("directory", type=Path, help="where to write the keys")
    keys.add_argument(
        "--client",
        action="append",
        default=None,
        help="client key name (repeatable; default: client)",
    )
    keys.set_defaults(handler=_keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent",
        description="Embodied-agent runtime: next-action decisions for robots over ZeroMQ.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    doctor = sub.add_parser("doctor", help="check the installation (torch, Horovod, MuJoCo)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(handler=_doctor)
    _add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from agent.extras import MissingExtra

    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except MissingExtra as exc:
        print(f"agent {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
