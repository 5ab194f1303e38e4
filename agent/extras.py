"""Which optional extra of `embodied-agent` a command needs, and a clear error when it is missing.

The base install (numpy, pyzmq, msgpack) is what a robot needs to talk to the
runtime. Everything else is an extra named by what it enables (pyproject.toml):

| extra | enables | brings |
|---|---|---|
| `sim` | the tabletop suite, simulated robots, examples | gymnasium, mujoco, pillow, tqdm |
| `serve` | `agent serve` (and recording) | `sim` + pyarrow |
| `learn` | the trainer, the `policy` backend | torch, safetensors, pyarrow, matplotlib, tensorboard |
| `export` | `python -m export` (ONNX export, int8) | `learn` + onnx, onnxscript, onnxruntime |
| `edge` | the ONNX runner, `--backend onnx`, `examples/edge_robot.py` | onnxruntime, pillow |
| `cosmos` | the Cosmos-Reason backend, `python -m trainer.cosmos` (with `learn`) | torch, transformers, tokenizers, peft |
| `openpi` | `agent serve --openpi-port` | websockets |
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "sim": ("gymnasium", "mujoco", "PIL", "tqdm"),
    "serve": ("gymnasium", "mujoco", "pyarrow"),
    "learn": ("torch", "safetensors", "pyarrow", "matplotlib"),
    "export": ("torch", "onnx", "onnxscript", "onnxruntime"),
    "edge": ("onnxruntime", "PIL"),
    "cosmos": ("torch", "transformers", "tokenizers", "peft"),
    "openpi": ("websockets",),
}


class MissingExtra(ImportError):
    """A command's optional dependencies are not installed; the message says what to install."""


def require(extra: str, what: str) -> None:
    """Raise MissingExtra unless every module of `extra` is installed; `what` names the command.

    Looks modules up without importing them (`importlib.util.find_spec`): a check
    must not pay for torch's import, nor import MuJoCo before `envs` has chosen
    its rendering backend.
    """
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as exc:
            found, reason = False, str(exc)
        else:
            reason = "not installed"
        if not found:
            raise MissingExtra(
                f"{what} needs the '{extra}' extra ({module} cannot be imported: {reason}); "
                f"install it with: pip install 'embodied-agent[{extra}]'"
            )
