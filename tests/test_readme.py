"""The README's two commands are the ones CI runs, and its quickstart example is true."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.DOTALL)


def test_readme_has_exactly_two_commands_and_ci_runs_them():
    install, tests = _readme_commands()
    assert "\n" not in install and "\n" not in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in install and 'pip install -e ".[test]"' in ci
    assert "python -m novarl_jax.train --config=configs/moe.py" in install
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert any(line.startswith(tests) for line in ci_lines), (tests, ci)
    assert "set -euo pipefail" in ci


def test_quickstart_example_prints_its_dict():
    code = (
        "from novarl_jax.core.distributed import ParallelLayout\n"
        "layout = ParallelLayout.from_world_size(total_world_size=8, tensor_parallel_size=2,"
        " pipeline_parallel_size=2, expert_parallel_size=2)\n"
        "print(layout.describe())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{'dp': 1, 'tp': 2, 'pp': 2, 'ep': 2, 'world': 8}"


def test_readme_python_example_runs_as_written():
    # On a machine with one CPU device and no XLA_FLAGS: the example sets up its own devices.
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "{'dp': 1, 'tp': 2, 'pp': 2, 'ep': 2, 'world': 8}"
    assert "'ep_size': 2" in lines[1] and "'--moe-aux-loss-coeff', '0.000625'" in lines[2]
