"""README's commands run as written: the CLI block (after `make demo`, with `.venv/bin` on PATH as
`source .venv/bin/activate` puts it) and the Python API snippet."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def block_after(heading: str, lang: str, marker: str) -> str:
    section = README.split(heading, 1)[1]
    for block in re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S):
        if marker in block:
            return block
    raise AssertionError(f"no {lang} block with {marker!r} after {heading!r}")


def commands(block: str) -> list[str]:
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def test_cli_block_runs_as_written(tmp_path):
    cmds = commands(block_after("## Command line", "sh", "source .venv/bin/activate"))
    assert cmds[0] == "source .venv/bin/activate" and len(cmds) >= 8
    bin_dir = Path(sys.executable).parent  # what activating the venv puts first on PATH
    assert (bin_dir / "sdlite").exists()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for cmd in cmds[1:]:
        r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    for name in ("out.png", "out.jpg", "noise.webp", "taesd.png", "trace.json", "tiny", "tiny-int8"):
        assert (tmp_path / name).exists(), name


def test_python_api_snippet_runs_as_written(tmp_path, monkeypatch):
    code = block_after("## Python API", "python", "Pipeline.load(")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "out.png").is_file()
