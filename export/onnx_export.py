"""Export a published student to one self-contained ONNX file, behind a parity gate; int8 too.

    python -m export --checkpoint CKPT[/vNNNNNN] --out policy.onnx \\
        [--episodes DIR] [--int8 --calibrate DIR] [--json]

* The graph takes what the featuriser produces (uint8 image, raw state, word
  ids, option mask, history) with a dynamic batch axis and returns the option
  scores (and the action where the student has an action head); the state and
  image normalisation are inside it. torch's current exporter
  (`torch.onnx.export(..., dynamo=True)`) with dynamic shapes.
* Self-contained: the featuriser's configuration, the model version and the
  sha256 of the version's weights go into the ONNX metadata, so an edge
  robot needs this one file (`agent.student.onnx.OnnxRunner` reads them back).
* Parity gate: onnxruntime against torch on random inputs of several batch
  sizes and on recorded observations: the largest score difference must be
  <= 1e-4 and every recorded observation must get the same option. A model
  that fails writes nothing and the error says how far off it was.
* int8: static quantisation (`onnxruntime.quantization`, QDQ, per channel)
  calibrated on recorded observations; written only if it picks the same
  option as fp32 on >= 99% of them. Size, speed and agreement are reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.files import move_into_place, sha256
from agent.student import checkpoint
from agent.student.features import Featuriser
from agent.student.onnx import (
    META_FEATURES,
    META_MODEL,
    META_OUTPUTS,
    META_SOURCE,
    META_VERSION,
)
from agent.student.onnx import (
    session as ort_session,
)

TOLERANCE = 1e-4
INT8_AGREEMENT = 0.99


class ExportError(RuntimeError):
    """The export did not pass its gate; nothing was written."""


@dataclass
class Parity:
    """How the ONNX graph compares with torch."""

    max_abs_diff: float = 0.0
    random_batches: list[int] = field(default_factory=list)
    recorded: int = 0
    recorded_agreement: float | None = None  # share of recorded observations with the same pick


@dataclass
class Report:
    path: str
    exporter: str
    size_bytes: int
    parity: Parity
    version: str
    int8: dict[str, Any] | None = None
    seconds: float = 0.0


def _graph(model: Any) -> Any:
    """The student with the featuriser's arrays as explicit positional inputs (the exporter's signature)."""
    import torch

    def outputs(scores: Any, action: Any) -> Any:
        return scores if action is None else (scores, action)

    class WithImage(torch.nn.Module):
        def __init__(self, student: Any) -> None:
            super().__init__()
            self.student = student

        def forward(self, image, state, instruction, options, option_mask, history):
            return outputs(*self.student(state, instruction, options, option_mask, history, image))

    class WithoutImage(torch.nn.Module):
        def __init__(self, student: Any) -> None:
            super().__init__()
            self.student = student

        def forward(self, state, instruction, options, option_mask, history):
            return outputs(*self.student(state, instruction, options, option_mask, history))

    graph = WithImage if model.features.camera is not None else WithoutImage
    return graph(model).eval()


def random_inputs(
    featuriser: Featuriser, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Valid random featuriser arrays: any image, states near the data, known words, >= 1 option."""
    c = featuriser.config
    words = c.token_count
    mask = np.zeros((batch, c.max_options), bool)
    for row, n in zip(mask, rng.integers(1, c.max_options + 1, batch), strict=True):
        row[:n] = True
    arrays = {
        "state": (
            np.asarray(c.state_mean)
            + np.asarray(c.state_std) * rng.standard_normal((batch, c.state_dim))
        ).astype(np.float32),
        "instruction": rng.integers(0, words, (batch, c.max_instruction_words)),
        "options": rng.integers(1, words, (batch, c.max_options, c.max_option_words))
        * mask[..., None],
        "option_mask": mask,
        "history": rng.integers(0, words, (batch, c.history, c.max_option_words)),
    }
    if c.camera is not None:
        arrays["image"] = rng.integers(
            0, 256, (batch, c.image_size, c.image_size, 3), dtype=np.uint8
        )
    return {k: np.ascontiguousarray(arrays[k]) for k in featuriser.input_names}


def recorded_inputs(
    directory: str | Path | None, featuriser: Featuriser, limit: int = 512
) -> dict[str, np.ndarray] | None:
    """Featuriser arrays of recorded observations under `directory` (None without one).

    Observations the student cannot take (another env's state size, say) are passed over.
    """
    if directory is None:
        return None
    from agent.store import iter_episodes

    rows = []
    for episode in iter_episodes(directory, on_error=lambda path, exc: None):
        try:
            steps = episode.steps()
        except ValueError:
            continue
        for step in steps:
            try:
                rows.append(featuriser.one(step.observation))
            except ValueError:
                continue
            if len(rows) >= limit:
                break
        if len(rows) >= limit:
            break
    if not rows:
        return None
    return {k: np.stack([r[k] for r in rows]) for k in featuriser.input_names}


def torch_scores(model: Any, arrays: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        scores, _ = model(**{k: torch.from_numpy(v) for k, v in arrays.items()})
    return scores.numpy()


def ort_scores(session: Any, arrays: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(["scores"], arrays)[0]


def check_parity(
    model: Any,
    session: Any,
    featuriser: Featuriser,
    recorded: dict[str, np.ndarray] | None,
    batches: tuple[int, ...] = (1, 3, 16),
) -> Parity:
    """Compare onnxruntime and torch; raises ExportError past the tolerance."""
    rng = np.random.default_rng(0)
    parity = Parity(random_batches=list(batches))
    cases = [random_inputs(featuriser, b, rng) for b in batches]
    if recorded is not None:
        cases.append(recorded)
    for i, arrays in enumerate(cases):
        mask = arrays["option_mask"]
        want, got = torch_scores(model, arrays), ort_scores(session, arrays)
        diff = float(np.abs(want - got)[mask].max())
        parity.max_abs_diff = max(parity.max_abs_diff, diff)
        if recorded is not None and i == len(cases) - 1:
            parity.recorded = len(mask)
            parity.recorded_agreement = float(np.mean(want.argmax(-1) == got.argmax(-1)))
    if parity.max_abs_diff > TOLERANCE or (parity.recorded_agreement not in (None, 1.0)):
        raise ExportError(
            f"onnxruntime and torch disagree: max score difference {parity.max_abs_diff:.3g} "
            f"(allowed {TOLERANCE}), same option on {parity.recorded_agreement} of "
            f"{parity.recorded} recorded observations (needed: all); nothing was written"
        )
    return parity


def _export_graph(model: Any, featuriser: Featuriser, path: Path) -> str:
    """Write the raw graph to `path`; returns which exporter made it."""
    import torch

    graph = _graph(model)
    example = random_inputs(featuriser, 2, np.random.default_rng(1))
    args = tuple(torch.from_numpy(example[k]) for k in featuriser.input_names)
    batch = torch.export.Dim("batch", min=1, max=4096)
    outputs = ["scores", "action"] if featuriser.config.action_dim else ["scores"]
    # The exporter warns about what does not concern this graph (torchvision ops it
    # cannot register, a deprecated pytree spelling, one batch Dim shared by every input).
    with _quiet("torch.onnx._internal.exporter._registration"), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, UserWarning))
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=list(featuriser.input_names),
            output_names=outputs,
            dynamic_shapes=tuple({0: batch} for _ in args),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return f"torch.onnx.export(dynamo=True), torch {torch.__version__}"


@contextlib.contextmanager
def _quiet(name: str | None) -> Iterator[None]:
    """Only errors from the logger `name` (None: the root logger) inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _add_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def export(
    model: Any,
    out: str | Path,
    *,
    version: str,
    source_sha256: str,
    recorded: dict[str, np.ndarray] | None = None,
) -> Report:
    """Export `model` (an `agent.student.modeling.Student`) to `out` if it passes the parity gate."""
    started = time.perf_counter()
    model = model.eval()
    featuriser = Featuriser(model.features)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        raw = Path(work) / "graph.onnx"
        exporter = _export_graph(model, featuriser, raw)
        _add_metadata(
            raw,
            {
                META_FEATURES: model.features.to_json(),
                META_MODEL: model.config.to_json(),
                META_VERSION: version,
                META_SOURCE: source_sha256,
                META_OUTPUTS: json.dumps(
                    ["scores", "action"] if model.features.action_dim else ["scores"]
                ),
            },
        )
        parity = check_parity(model, ort_session(raw), featuriser, recorded)
        size = raw.stat().st_size
        move_into_place(raw, out)
    return Report(str(out), exporter, size, parity, version, seconds=time.perf_counter() - started)


class _Calibration:
    """onnxruntime's calibration reader over recorded featuriser arrays, one sample at a time."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        self._items = iter([{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def latency_ms(session: Any, arrays: dict[str, np.ndarray], repeats: int = 50) -> float:
    """Median ms of one `session.run` on `arrays`."""
    times = []
    for _ in range(repeats + 5):
        start = time.perf_counter()
        session.run(None, arrays)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times[5:]))


QUANTISED_OPS = ["Conv", "MatMul", "Gemm"]


def quantize(
    fp32: str | Path, out: str | Path, calibration: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Static int8 of `fp32` calibrated on recorded arrays; written only if it agrees enough."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        prepared, raw = Path(work) / "prepared.onnx", Path(work) / "int8.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        with _quiet(None):  # per weight: "axis 1 out of range" where 1-D weights go per-tensor
            quantize_static(
                str(prepared),
                str(raw),
                _Calibration(calibration),
                quant_format=QuantFormat.QDQ,
                # The weights' ops only: quantising every op (attention softmaxes, the
                # spatial-softmax keypoints, layer norms) agreed with fp32 on 39% of
                # recorded observations; Conv/MatMul/Gemm alone on all of them.
                op_types_to_quantize=QUANTISED_OPS,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        _add_metadata(raw, _metadata_of(Path(fp32)))
        full, small = ort_session(fp32), ort_session(raw)
        agreement = float(
            np.mean(
                ort_scores(full, calibration).argmax(-1)
                == ort_scores(small, calibration).argmax(-1)
            )
        )
        one = {k: v[:1] for k, v in calibration.items()}
        report = {
            "path": str(out),
            "agreement": agreement,
            "observations": len(calibration["option_mask"]),
            "size_bytes": raw.stat().st_size,
            "fp32_size_bytes": Path(fp32).stat().st_size,
            "fp32_batch1_ms": latency_ms(full, one),
            "int8_batch1_ms": latency_ms(small, one),
            "written": agreement >= INT8_AGREEMENT,
        }
        if report["written"]:
            move_into_place(raw, out)
    return report


def _metadata_of(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def export_checkpoint(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    episodes: str | Path | None = None,
    int8: bool = False,
    calibrate: str | Path | None = None,
) -> Report:
    """`python -m export`: a published version (or CKPT/LATEST) to `out` (and `out`.int8.onnx)."""
    model, version = checkpoint.load(checkpoint_path)
    featuriser = Featuriser(version.features)
    recorded = recorded_inputs(episodes or calibrate, featuriser)
    report = export(
        model,
        out,
        version=version.name,
        source_sha256=version.manifest["files"][checkpoint.WEIGHTS],
        recorded=recorded,
    )
    if int8:
        calibration = recorded_inputs(calibrate or episodes, featuriser)
        if calibration is None:
            raise ExportError("--int8 needs recorded episodes to calibrate on (--calibrate DIR)")
        target = Path(out).with_suffix(".int8.onnx")
        report.int8 = quantize(out, target, calibration)
    return report


def add_to_version(directory: Path, version: str, model: Any) -> None:
    """The trainer's `--export-onnx` (registered as the `onnx` entry point of
    `embodied_agent.version_files`): `policy.onnx` inside a version being published."""
    export(
        model,
        directory / checkpoint.ONNX,
        version=version,
        source_sha256=sha256(directory / checkpoint.WEIGHTS),
    )


def report_json(report: Report) -> str:
    return json.dumps(asdict(report))
