"""The `agent` command line.

Each subcommand imports what it needs inside its handler, so `agent --help`
never pays for torch, transformers, mujoco or horovod.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _doctor(args: argparse.Namespace) -> int:
    """Report what this installation can do (versions, Horovod build, rendering)."""
    from agent.doctor import report

    return report(as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent",
        description="Embodied-agent runtime: next-action decisions for robots over ZeroMQ.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    doctor = sub.add_parser("doctor", help="check the installation (torch, Horovod, MuJoCo)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(handler=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
