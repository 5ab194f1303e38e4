"""The import rules of docs/architecture.md, checked on every module's source.

Imports are read at any depth (lazy imports inside functions count), so a
robot that vendors `agent.protocol` + `agent.client` or an edge box running an
exported policy never needs torch.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "onnxruntime", "horovod"}

# (files, forbidden top-level modules)
RULES = [
    (["agent/protocol.py", "agent/client.py"], HEAVY),
    (["envs/**/*.py"], {"torch", "transformers", "horovod", "trainer", "shadowsync"}),
    (["shadowsync/**/*.py"], {"agent", "envs", "trainer"}),
    (["export/edge.py"], {"torch", "transformers", "horovod"}),
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def rule_cases():
    for patterns, forbidden in RULES:
        for pattern in patterns:
            for path in sorted(ROOT.glob(pattern)):
                yield pytest.param(path, forbidden, id=str(path.relative_to(ROOT)))


@pytest.mark.parametrize(("path", "forbidden"), list(rule_cases()))
def test_import_rules(path, forbidden):
    bad = imported_modules(path) & forbidden
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_rules_cover_existing_files():
    assert list(rule_cases()), "no module matched the layering rules"


def test_cli_help_imports_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "from agent.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "heavy = {'torch', 'transformers', 'onnxruntime', 'horovod', 'mujoco'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
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
