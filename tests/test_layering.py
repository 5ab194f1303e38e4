"""The import rules of docs/architecture.md, checked two ways.

1. Transitively: each light entry point is imported in a fresh interpreter
   and `sys.modules` must hold nothing forbidden, so a module that imports a
   light module that imports torch is caught.
2. On the source: imports at any depth (lazy ones inside functions count) of
   every file a rule covers, so a forbidden import that only runs later is
   caught too.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "onnxruntime", "horovod"}
SIM = {"mujoco", "gymnasium"}
WIRE_ALLOWED_AGENT = {"agent", "agent.messages", "agent.protocol", "agent.client", "agent.curve"}
TRAINER_ALLOWED_AGENT = {"agent", "agent.messages", "agent.store", "agent.extras"}

# entry point -> (forbidden top-level packages, allowed agent.* modules or None for any)
TRANSITIVE = {
    "agent.messages": (HEAVY | SIM | {"pyarrow", "envs"}, WIRE_ALLOWED_AGENT),
    "agent.protocol": (HEAVY | SIM | {"pyarrow", "envs"}, WIRE_ALLOWED_AGENT),
    "agent.client": (HEAVY | SIM | {"pyarrow", "envs"}, WIRE_ALLOWED_AGENT),
    "agent.store": (HEAVY | SIM | {"envs"}, {"agent", "agent.messages", "agent.store"}),
    "envs": (HEAVY | {"trainer", "shadowsync", "export"}, None),
    "envs.rollout": (HEAVY | {"trainer", "shadowsync", "export"}, None),
    "envs.plugin": (HEAVY | {"trainer", "shadowsync", "export"}, None),
    "shadowsync": ({"agent", "envs", "trainer", "export"}, None),
    "trainer": (HEAVY | SIM | {"pyarrow"}, TRAINER_ALLOWED_AGENT),
    "trainer.features": (HEAVY | SIM | {"pyarrow"}, TRAINER_ALLOWED_AGENT),
    "trainer.student": (HEAVY | SIM | {"pyarrow"}, TRAINER_ALLOWED_AGENT),
    "trainer.train": (HEAVY | SIM, TRAINER_ALLOWED_AGENT),
    "export.edge": ({"torch", "transformers", "horovod", "pyarrow"}, TRAINER_ALLOWED_AGENT),
}

# (files, forbidden top-level modules), read from the source at any depth
STATIC = [
    (["agent/messages.py", "agent/protocol.py", "agent/client.py"], HEAVY | SIM | {"envs"}),
    (["agent/store.py"], HEAVY | SIM | {"envs"}),
    (["envs/**/*.py"], HEAVY | {"trainer", "shadowsync", "export"}),
    (["shadowsync/**/*.py"], {"agent", "envs", "trainer", "export"}),
    (["trainer/features.py", "export/edge.py"], {"torch", "horovod"}),
]


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


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def static_cases():
    for patterns, forbidden in STATIC:
        for pattern in patterns:
            for path in sorted(ROOT.glob(pattern)):
                yield pytest.param(path, forbidden, id=str(path.relative_to(ROOT)))


@pytest.mark.parametrize(("path", "forbidden"), list(static_cases()))
def test_import_rules_on_the_source(path, forbidden):
    bad = imported_modules(path) & forbidden
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def agent_modules_imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "agent")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.update({node.module} if node.module.split(".")[0] == "agent" else set())
    return names


@pytest.mark.parametrize("path", sorted(ROOT.glob("trainer/*.py")), ids=lambda p: p.name)
def test_the_trainer_uses_only_the_episode_store_and_the_wire_types(path):
    bad = agent_modules_imported(path) - TRAINER_ALLOWED_AGENT
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_rules_cover_existing_files():
    assert len(list(static_cases())) > 20, "the layering rules match too few modules"


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
