"""`python -m export`: a published student to ONNX (see export/onnx_export.py, docs/export.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a published student to ONNX, behind a parity gate.",
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="CKPT (its LATEST) or CKPT/vNNNNNN"
    )
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument(
        "--episodes", type=Path, default=None, help="recorded episodes for the parity gate"
    )
    parser.add_argument(
        "--int8", action="store_true", help="also write OUT with .int8.onnx, quantised"
    )
    parser.add_argument(
        "--calibrate", type=Path, default=None, help="recorded episodes to calibrate int8 on"
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    from agent.extras import MissingExtra, require

    try:
        require("export", "python -m export")
    except MissingExtra as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    from agent.student.checkpoint import CheckpointError
    from export.onnx_export import ExportError, export_checkpoint, report_json

    try:
        report = export_checkpoint(
            args.checkpoint,
            args.out,
            episodes=args.episodes,
            int8=args.int8,
            calibrate=args.calibrate,
        )
    except (ExportError, CheckpointError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 1
    p = report.parity
    agreement = (
        "n/a (no --episodes)"
        if p.recorded_agreement is None
        else f"{p.recorded_agreement:.0%} of {p.recorded}"
    )
    print(
        f"[export] {report.version} -> {report.path} ({report.size_bytes / 1e6:.2f} MB, {report.exporter}); "
        f"parity: max score difference {p.max_abs_diff:.2e} on batches {p.random_batches}, "
        f"same option on recorded observations: {agreement}",
        file=sys.stderr,
    )
    if report.int8 is not None:
        q = report.int8
        print(
            f"[export] int8: {'written to ' + q['path'] if q['written'] else 'NOT written'}: "
            f"agrees with fp32 on {q['agreement']:.1%} of {q['observations']} recorded observations "
            f"(needed 99%), {q['size_bytes'] / 1e6:.2f} MB vs {q['fp32_size_bytes'] / 1e6:.2f} MB, "
            f"batch 1 {q['int8_batch1_ms']:.2f} ms vs {q['fp32_batch1_ms']:.2f} ms",
            file=sys.stderr,
        )
    if args.json:
        print(report_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
