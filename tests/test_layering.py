"""The import rules of docs/architecture.md, checked three ways.

1. Transitively: each light entry point is imported in a fresh interpreter
   and `sys.modules` must hold nothing forbidden, so a module that imports a
   light module that imports torch is caught.
2. On the source: imports at any depth (lazy ones inside functions count) of
   every file of every package, against the arrows between components.
3. The import table of docs/architecture.md is exactly what the source
   imports (`python tests/test_layering.py` prints the table to paste).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "onnxruntime", "horovod"}
SIM = {"mujoco", "gymnasium"}
LIBRARIES = (
    "torch",
    "horovod",
    "transformers",
    "peft",
    "onnx",
    "onnxruntime",
    "pyarrow",
    "gymnasium",
    "mujoco",
)

# Components: what each file of the five packages belongs to (first match wins).
WIRE = (
    "agent/messages.py",
    "agent/codec.py",
    "agent/protocol.py",
    "agent/client.py",
    "agent/curve.py",
)
FORMATS = (
    "agent/store.py",
    "agent/files.py",
    "agent/versions.py",
    "agent/labels.py",
    "agent/extras.py",
)
COMPONENTS = {
    "agent: wire": WIRE,
    "agent: formats": FORMATS,
    "agent.student": ("agent/student/*.py",),
    "agent.cosmos": ("agent/cosmos/*.py",),
    "agent: runtime": ("agent/*.py", "agent/backends/*.py"),
    "envs": ("envs/**/*.py",),
    "shadowsync": ("shadowsync/**/*.py",),
    "trainer": ("trainer/**/*.py",),
    "export": ("export/**/*.py",),
}
# The arrows: which components each one may import (at any depth, lazily or not).
ALLOWED = {
    "agent: wire": set(),
    "agent: formats": {"agent: wire"},
    "agent.student": {"agent: wire", "agent: formats"},
    "agent.cosmos": {"agent: wire", "agent: formats"},
    "agent: runtime": {"agent: wire", "agent: formats", "agent.student", "agent.cosmos", "envs"},
    "envs": {"agent: wire"},
    "shadowsync": set(),
    "trainer": {"agent: wire", "agent: formats", "agent.student", "agent.cosmos", "shadowsync"},
    "export": {"agent: wire", "agent: formats", "agent.student"},
}
# Libraries a component must never import, at any depth.
FORBIDDEN_LIBRARIES = {
    "agent: wire": HEAVY | SIM | {"pyarrow", "onnx"},
    "agent: formats": HEAVY | SIM | {"onnx"},
    "envs": HEAVY | {"onnx", "pyarrow"},
    "shadowsync": {"gymnasium", "mujoco", "pyarrow", "onnx", "onnxruntime", "transformers"},
}

# Light entry points, imported in a fresh interpreter: (forbidden top-level packages,
# allowed agent.* modules or None for any).
WIRE_MODULES = {
    "agent",
    "agent.messages",
    "agent.codec",
    "agent.protocol",
    "agent.client",
    "agent.curve",
}
STUDENT_LIGHT = WIRE_MODULES | {
    "agent.files",
    "agent.versions",
    "agent.student",
    "agent.student.features",
    "agent.student.config",
    "agent.student.checkpoint",
    "agent.student.onnx",
}
TRANSITIVE = {
    "agent.messages": (HEAVY | SIM | {"pyarrow", "envs"}, WIRE_MODULES),
    "agent.protocol": (HEAVY | SIM | {"pyarrow", "envs"}, WIRE_MODULES),
    "agent.client": (HEAVY | SIM | {"pyarrow", "envs"}, WIRE_MODULES),
    "agent.store": (
        HEAVY | SIM | {"envs"},
        {"agent", "agent.messages", "agent.store", "agent.files"},
    ),
    "agent.versions": (
        HEAVY | SIM | {"pyarrow", "envs"},
        {"agent", "agent.versions", "agent.files"},
    ),
    "agent.labels": (HEAVY | SIM | {"pyarrow", "envs"}, {"agent", "agent.labels"}),
    "agent.student.features": (HEAVY | SIM | {"pyarrow", "trainer", "export"}, STUDENT_LIGHT),
    "agent.student.checkpoint": (HEAVY | SIM | {"pyarrow", "trainer", "export"}, STUDENT_LIGHT),
    # the edge: an exported student runs with onnxruntime, numpy and pillow only
    "agent.student.onnx": (
        {"torch", "transformers", "horovod", "pyarrow", "trainer", "export"} | SIM,
        STUDENT_LIGHT,
    ),
    # Cosmos-Reason's contract: prompts and versions read without torch or transformers
    "agent.cosmos.reasoning": (
        HEAVY | SIM | {"pyarrow", "envs"},
        {"agent", "agent.cosmos", "agent.cosmos.reasoning"},
    ),
    "agent.cosmos.checkpoint": (
        HEAVY | SIM | {"pyarrow", "envs", "trainer", "export"},
        {
            "agent",
            "agent.cosmos",
            "agent.cosmos.reasoning",
            "agent.cosmos.checkpoint",
            "agent.versions",
            "agent.files",
        },
    ),
    "agent.backends.cosmos": ({"trainer", "export", "torch", "transformers"}, None),
    "trainer.cosmos.rewards": (HEAVY | SIM | {"export"}, None),
    "envs": (HEAVY | {"trainer", "shadowsync", "export"}, None),
    "envs.rollout": (HEAVY | {"trainer", "shadowsync", "export"}, None),
    "envs.plugin": (HEAVY | {"trainer", "shadowsync", "export"}, None),
    "shadowsync": ({"agent", "envs", "trainer", "export"}, None),
    "trainer": (HEAVY | SIM | {"pyarrow", "export"}, {"agent"}),
    "trainer.data": (HEAVY | SIM | {"export"}, None),
    "export": (HEAVY | SIM | {"trainer"}, {"agent"}),
    "agent.backends.policy": ({"trainer", "export", "torch"}, None),
    "agent.backends.onnx": ({"trainer", "export", "torch", "onnxruntime"}, None),
}


def loaded_by(module: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(TRANSITIVE))
def test_light_entry_points_load_nothing_forbidden(module):
    forbidden, allowed_agent = TRANSITIVE[module]
    loaded = loaded_by(module)
    bad = {m for m in loaded if m.split(".")[0] in forbidden}
    assert not bad, f"importing {module} loads {sorted(bad)}"
    if allowed_agent is not None:
        agent_modules = {m for m in loaded if m == "agent" or m.startswith("agent.")}
        assert agent_modules <= allowed_agent, (
            f"importing {module} loads {sorted(agent_modules - allowed_agent)}"
        )


def test_the_client_loads_no_backend():
    loaded = loaded_by("agent.client")
    assert not [m for m in loaded if m.startswith(("agent.backends", "agent.server"))]


# --------------------------------------------------------------------------- the source


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth; `from agent import x` counts as agent.x."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def component_files() -> dict[str, list[Path]]:
    owned: dict[Path, str] = {}
    for component, patterns in COMPONENTS.items():
        for pattern in patterns:
            for path in sorted(ROOT.glob(pattern)):
                owned.setdefault(path, component)
    files: dict[str, list[Path]] = {c: [] for c in COMPONENTS}
    for path, component in owned.items():
        files[component].append(path)
    return files


def component_of_module(module: str) -> str | None:
    """The component a module name belongs to (None: not one of ours, or a package root)."""
    parts = module.split(".")
    if parts[0] not in ("agent", "envs", "shadowsync", "trainer", "export") or module == "agent":
        return None  # `agent` itself is a namespace (its __init__ holds a docstring only)
    candidates = [ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")]
    for path in candidates:
        if path.is_file():
            for component, files in FILES.items():
                if path in files:
                    return component
    return None


FILES = component_files()


def imports_of(component: str) -> tuple[set[str], set[str]]:
    """(other components, libraries of LIBRARIES) that `component`'s files import at any depth."""
    components, libraries = set(), set()
    for path in FILES[component]:
        for module in imported_modules(path):
            other = component_of_module(module)
            if other is not None and other != component:
                components.add(other)
            if module.split(".")[0] in LIBRARIES:
                libraries.add(module.split(".")[0])
    return components, libraries


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_package_arrows_run_one_way(component):
    """runtime ↛ learner, trainer ↮ export, shadowsync ↛ the rest, envs ↛ torch, ..."""
    components, libraries = imports_of(component)
    assert components <= ALLOWED[component], (
        f"{component} imports {sorted(components - ALLOWED[component])}"
    )
    bad = libraries & FORBIDDEN_LIBRARIES.get(component, set())
    assert not bad, f"{component} imports {sorted(bad)}"


def test_every_file_of_every_package_has_a_component():
    packages = [p for pkg in ("agent", "envs", "shadowsync", "trainer", "export")
                for p in (ROOT / pkg).rglob("*.py")]  # fmt: skip
    owned = {p for files in FILES.values() for p in files}
    assert set(packages) == owned, sorted(str(p) for p in set(packages) - owned)
    assert len(owned) > 60


def import_table() -> str:
    rows = [
        "| component | its files | imports (components) | imports (libraries, lazily included) |",
        "|---|---|---|---|",
    ]
    for component, patterns in COMPONENTS.items():
        components, libraries = imports_of(component)
        rows.append(
            f"| {component} | {', '.join(f'`{p}`' for p in patterns)} | "
            f"{', '.join(sorted(components)) or '-'} | "
            f"{', '.join(lib for lib in LIBRARIES if lib in libraries) or '-'} |"
        )
    return "\n".join(rows)


def test_the_architecture_docs_import_table_is_what_the_code_imports():
    docs = (ROOT / "docs" / "architecture.md").read_text()
    found = re.search(r"<!-- import table -->\n(.*?)\n<!-- /import table -->", docs, re.S)
    assert found, "docs/architecture.md lost its import table markers"
    assert found.group(1).strip() == import_table(), (
        "docs/architecture.md's import table is out of date; paste the output of "
        "`python tests/test_layering.py`"
    )


# --------------------------------------------------------------------------- commands


def test_cli_help_imports_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "from agent.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "heavy = {'torch', 'transformers', 'onnxruntime', 'horovod', 'mujoco', 'pyarrow'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"


def test_agent_console_script_help():
    agent = Path(sys.executable).with_name("agent")
    proc = subprocess.run([str(agent), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "doctor" in proc.stdout


def test_a_missing_extra_is_named_not_a_traceback():
    """`agent serve` without pyarrow (the `serve` extra) says what to install."""
    code = (
        "import sys\n"
        "sys.modules['pyarrow'] = None  # as if the extra were not installed\n"
        "from agent.cli import main\n"
        "sys.exit(main(['serve', '--env', 'tabletop/PickPlace-v0']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pip install 'embodied-agent[serve]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_trainer_without_torch_names_its_extra():
    """`python -m trainer` checks its extra before the script imports torch at its top."""
    code = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None  # as if the learn extra were not installed\n"
        "sys.argv = ['trainer', '--episodes', 'x', '--out', 'y']\n"
        "runpy.run_module('trainer', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pip install 'embodied-agent[learn]'" in proc.stderr and "Traceback" not in proc.stderr


if __name__ == "__main__":
    print(import_table())
