"""The README's set-up is what CI runs, and a reader meets the CPU advice before any command.

CI (.ci/run) must run the README's test command verbatim, so a README that drifts from what passes
fails here instead of in a new user's first hour.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Set-up on a fresh machine")
    return text[start:text.index("\n## ", start + 1)]


def _commands(section: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_setup_is_cpu_step_then_two_commands():
    cmds = _commands(_setup_section())
    assert cmds == ["pip install torch==2.13.0",
                    "pip install -e . && moecomm demo",
                    'pip install -q -e ".[test]" && python -m pytest -q tests'], cmds


def test_cpu_advice_comes_before_the_first_command():
    section = _setup_section()
    advice = section.index("Without a GPU, install the CPU build of torch first")
    assert advice < section.index("```bash"), "the CPU advice must precede every command"


def test_ci_runs_the_readmes_commands_verbatim():
    cpu_step, _, test_cmd = _commands(_setup_section())
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert cpu_step in ci and test_cmd in ci, ci
    assert ci.index(cpu_step) < ci.index(test_cmd)
