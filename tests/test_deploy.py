"""The deployment kit (deploy/): the systemd unit is valid to systemd itself, its limits agree with the flags
in the env file, its command lines parse with sdlite's own parser, and the install script is valid shell."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdlite.cli import build_parser
from sdlite.doctor import HEADROOM
from sdlite.serve.server import STOP_WAIT
from sdlite.units import parse_bytes

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "sdlite.service"
ENV = DEPLOY / "sdlite.env"
INSTALLED_SDLITE = "/opt/sdlite/venv/bin/sdlite"


def unit_sections(text: str) -> dict:
    """A systemd unit file -> {section: {key: [values]}} (comments dropped, backslash continuations joined)."""
    sections, current = {}, None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def expand(command: str, env: dict) -> list[str]:
    """A unit's command line as systemd runs it: ${VAR} one word, $VAR split at whitespace."""
    words = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$[A-Za-z_]\w*", word):
            words += env[word[1:]].split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return words


SERVICE = unit_sections(UNIT.read_text())["Service"]
ENVIRONMENT = env_file(ENV.read_text())


def one(key: str) -> str:
    [value] = SERVICE[key]
    return value


@pytest.fixture
def verifiable_unit(tmp_path) -> Path:
    """The unit with its /opt/sdlite/venv/bin/sdlite pointing at this venv's sdlite: `systemd-analyze verify`
    checks that each command's binary exists, and the kit's target path does not exist at test time."""
    here = Path(sys.executable).parent / "sdlite"
    assert here.exists()
    unit = tmp_path / "sdlite.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_SDLITE, str(here)))
    return unit


def analyze(*args) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt install systemd; .ci/run installs it as root)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_finds_nothing(verifiable_unit):
    r = analyze("verify", "--man=no", str(verifiable_unit))
    # verify exits 0 for an unknown key or a bad value, and says so on stderr: silence is the pass
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_systemd_analyze_would_catch_a_mistake(verifiable_unit):
    text = verifiable_unit.read_text()
    verifiable_unit.write_text(text.replace("MemoryMax=1400M", "MemoryMax=1400Q")
                               .replace("ProtectSystem=strict", "ProtectSystm=strict"))
    r = analyze("verify", "--man=no", str(verifiable_unit))
    assert "Invalid memory limit '1400Q'" in r.stderr and "Unknown key 'ProtectSystm'" in r.stderr


def test_memory_max_is_the_budget_plus_headroom():
    budget = parse_bytes(ENVIRONMENT["SDLITE_MEMORY_BUDGET"])
    assert parse_bytes(one("MemoryMax")) == budget + HEADROOM == parse_bytes("1400M")
    assert one("MemorySwapMax") == "0" and "MemoryHigh" not in SERVICE
    assert -1000 <= int(one("OOMScoreAdjust")) <= 1000


def test_stop_timeout_covers_the_drain():
    grace = float(ENVIRONMENT["SDLITE_GRACE"])
    timeout = float(one("TimeoutStopSec"))
    # grace for admitted work, then up to STOP_WAIT for a cancelled generation to reach its next step
    assert grace + STOP_WAIT < timeout <= grace + STOP_WAIT + 30
    assert (one("KillSignal"), one("Restart")) == ("SIGTERM", "on-failure")


def test_the_command_lines_parse_with_the_env_file():
    parser = build_parser()
    [start] = SERVICE["ExecStart"]
    argv = expand(start, ENVIRONMENT)
    assert argv[0] == INSTALLED_SDLITE
    args = parser.parse_args(argv[1:])
    assert args.command == "serve" and args.model == ENVIRONMENT["SDLITE_MODEL"]
    assert args.memory_budget == parse_bytes(ENVIRONMENT["SDLITE_MEMORY_BUDGET"])
    assert args.grace == float(ENVIRONMENT["SDLITE_GRACE"]) and args.oom_score_adj is None
    assert args.port_file.startswith("/run/sdlite/") and args.host == "127.0.0.1"
    [pre] = SERVICE["ExecStartPre"]
    assert pre.startswith("-")  # the doctor's verdict never stops a start
    doctor = parser.parse_args(expand(pre[1:], ENVIRONMENT)[1:])
    assert doctor.command == "doctor" and doctor.memory_budget == args.memory_budget


def test_files_and_hardening():
    assert one("ProtectSystem") == "strict" and one("User") == "sdlite"
    assert any(ENVIRONMENT["SDLITE_MODEL"].startswith(p.rstrip("/") + "/") for p in one("ReadOnlyPaths").split())
    assert one("RuntimeDirectory") == "sdlite" and one("StateDirectory") == "sdlite"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "LockPersonality", "RestrictSUIDSGID",
                "ProtectControlGroups", "ProtectKernelModules", "RestrictRealtime"):
        assert one(key) == "yes", key
    assert one("ProtectHome") == "yes" and one("CapabilityBoundingSet") == ""
    assert one("RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one("SystemCallArchitectures") == "native"
    # torch's oneDNN JIT needs writable+executable memory; sdlite reads /proc/cpuinfo and /proc/meminfo
    assert "MemoryDenyWriteExecute" not in SERVICE and "ProcSubset" not in SERVICE


def test_install_script_is_valid_shell():
    script = DEPLOY / "install.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "torch==" in script.read_text() and "systemctl daemon-reload" in script.read_text()


def test_install_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt install shellcheck)")
    r = subprocess.run(["shellcheck", str(DEPLOY / "install.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
