"""`sdlite doctor`: this machine as it is, and a Pi 4 / Pi 5 from copies of their /proc and /sys files
(tests/fixtures/boards): every finding fires where it should and stays silent where it should not."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlite import cli, doctor
from sdlite.doctor import FINDINGS, TorchInfo, diagnose, read_system
from sdlite.runtime import precision as precision_mod
from sdlite.runtime.cpu_features import arm32_refusal, is_32bit_arm_os
from sdlite.runtime.memory import Cgroup
from sdlite.units import GiB, MiB

BOARDS = Path(__file__).parent / "fixtures" / "boards"
CPU_TORCH = TorchInfo("2.13.0+cpu", None, [], 0, 4, True, "DEFAULT")
CUDA_TORCH = TorchInfo("2.13.0", "12.8", ["nvidia-cublas-cu12==12.8.4.1", "nvidia-cudnn-cu12==9.10.2.21"],
                       3 * GiB, 4, True, "DEFAULT")
SDLITE = [sys.executable, "-m", "sdlite"]


def run(board, *, machine="aarch64", bits=64, env=None, torch_info=CPU_TORCH, disk_free=20 * GiB, **kw):
    kw.setdefault("check_model_fit", False)
    return diagnose(root=board, machine=machine, bits=bits, env=env or {}, torch_info=torch_info,
                    disk_free=disk_free, **kw)


def ids(report) -> set:
    return {f.id for f in report.findings}


def board_copy(tmp_path, name) -> Path:
    """A writable copy of a fixture board, for the variants a test makes of it."""
    dst = tmp_path / name
    shutil.copytree(BOARDS / name, dst)
    return dst


def set_file(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


SWAPS_HEAD = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


# --- the machine these tests run on -------------------------------------------------------------------

def test_doctor_json_on_this_machine():
    r = subprocess.run(SDLITE + ["doctor", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"sdlite", "verdict", "findings", "system", "torch", "threads", "precision", "disk",
                        "budget", "model", "probe"}
    s = out["system"]
    assert s["machine"] == platform.machine() and s["bits"] == 64 and not s["arm32"]
    assert s["cpu"]["logical_cpus"] == os.cpu_count() and 1 <= s["cpu"]["physical_cores"] <= os.cpu_count()
    assert 1 <= out["threads"] <= os.cpu_count()
    assert 0 < s["mem_available"] <= s["mem_total"]
    own = Cgroup.of_self()
    if own is None:
        assert s["cgroup"] is None
    else:  # (cgroup v1 on the machine this was written on)
        assert s["cgroup"]["version"] == own.version and s["cgroup"]["limit"] == own.limit_in_force()
    assert out["torch"]["version"] == torch.__version__ and out["torch"]["threads"] >= 1
    assert out["disk"]["free"] > 0 and Path(out["disk"]["path"]).exists()
    assert out["model"]["shipped"] and out["model"]["error"] is None and out["model"]["native"] == 64
    assert out["model"]["peak"] <= out["budget"]["bytes"] and out["probe"] is None
    assert out["precision"]["requested"] == "fp32"  # (conftest pins $SDLITE_PRECISION)
    assert out["verdict"] in ("ok", "warnings") and all(f["level"] == "warning" for f in out["findings"])
    assert all(f["id"] in FINDINGS for f in out["findings"])


def test_doctor_text_screen(capsys):
    assert cli.main(["doctor"]) == 0
    text = capsys.readouterr().out
    for head in ("system ", "cpu ", "memory ", "cgroup ", "disk ", "torch ", "compute ", "budget ", "model ",
                 "fit      yes", "verdict "):
        assert f"\n{head}" in text, head
    assert len(text.splitlines()) <= 20


def test_probe_times_the_unet_of_the_model(tiny_model, capsys):
    assert cli.main(["doctor", str(tiny_model), "--probe", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    probe, model = out["probe"], out["model"]
    assert not model["shipped"] and model["path"] == str(tiny_model) and model["error"] is None
    assert (probe["width"], probe["height"]) == (model["native"], model["native"])
    assert probe["steps"] == model["settings"]["steps"] == 20
    assert 0 < probe["step_s"] < 10 and probe["first_step_s"] > 0 and 1 <= probe["warm_calls"] <= 3
    assert probe["per_image_s"] == pytest.approx(probe["text_encoder_s"] + 20 * probe["step_s"], abs=0.02)


def test_model_that_does_not_fit_is_an_error(tiny_model, capsys):
    assert cli.main(["doctor", str(tiny_model), "--memory-budget", "50M"]) == 1
    text = capsys.readouterr().out
    assert "[model-does-not-fit]" in text and "verdict  error" in text and "--memory-budget" in text
    assert cli.main(["doctor", str(tiny_model), "--memory-budget", "2G"]) == 0
    assert "fit      yes" in capsys.readouterr().out


def test_a_model_that_cannot_be_read_is_an_error(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    assert cli.main(["doctor", str(tmp_path / "not-a-model"), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [f["id"] for f in out["findings"] if f["level"] == "error"] == ["model-unreadable"]
    assert out["model"]["readable"] is False and "cannot read the model" in out["model"]["error"]


# --- a Pi 4 and a Pi 5 ----------------------------------------------------------------------------------

def test_pi4_as_read():
    s = read_system(BOARDS / "pi4", machine="aarch64", bits=64, env={})
    assert (s.cpu.model, s.cpu.physical_cores, s.board) == ("Cortex-A72", 4, "Raspberry Pi 4 Model B Rev 1.4")
    assert s.os_name == "Debian GNU/Linux 12 (bookworm)" and s.kernel == "6.6.51+rpt-rpi-v8"
    assert (s.mem_total, s.mem_available) == (1892384 * 1024, 1489164 * 1024)
    [swap] = s.swaps
    assert (swap.name, swap.kind, swap.size, swap.device) == ("/var/swap", "file", 102396 * 1024, "/dev/mmcblk0p2")
    assert swap.on_sd_card and not swap.zram and s.zram == []
    assert s.cgroup.version == 2 and s.cgroup.path == "/user.slice/user-1000.slice/session-3.scope"
    assert s.cgroup.limit is None and s.memory_controller is True and s.service is None


def test_pi5_as_read():
    s = read_system(BOARDS / "pi5", machine="aarch64", bits=64, env={"INVOCATION_ID": "0f3e"})
    assert (s.cpu.model, s.cpu.fp16, s.cpu.int8_dot, s.cpu.bf16) == ("Cortex-A76", True, True, False)
    assert s.os_name == "Debian GNU/Linux 13 (trixie)" and s.board == "Raspberry Pi 5 Model B Rev 1.0"
    [swap] = s.swaps
    assert swap.zram and not swap.on_sd_card and swap.size == 1018160 * 1024
    [z] = s.zram
    assert (z.name, z.disksize, z.algorithm, z.swap) == ("zram0", 1042612224, "zstd", True)
    assert s.service == "sdlite.service"
    assert (s.cgroup.limit, s.cgroup.swap_limit, s.cgroup.usage) == (1400 * MiB, 0, 702349312)


def test_physical_cores_and_board_from_cpuinfo():
    from sdlite.runtime.cpu_features import parse_cpuinfo
    smt = "".join(f"processor\t: {i}\nmodel\t\t: 142\nphysical id\t: 0\ncore id\t\t: {i // 2}\n\n" for i in range(4))
    cpu = parse_cpuinfo(smt, "x86_64")
    assert (cpu.logical_cpus, cpu.physical_cores, cpu.board) == (4, 2, "")  # (x86's `model` is a number)
    pi4 = read_system(BOARDS / "pi4", machine="aarch64", bits=64, env={}).cpu
    assert (pi4.logical_cpus, pi4.physical_cores) == (4, 4)


def test_pi4_pi5_verdicts_and_screens():
    pi4 = run(BOARDS / "pi4")
    assert ids(pi4) == {"swap-on-sd-card"} and pi4.verdict == "warnings"
    assert "Raspberry Pi 4 Model B" in pi4.text() and "[swap-on-sd-card]" in pi4.text()
    pi5 = run(BOARDS / "pi5", env={"INVOCATION_ID": "0f3e"})
    assert ids(pi5) == set() and pi5.verdict == "ok"
    assert "zram0" in pi5.text() and "service sdlite.service" in pi5.text()
    json.dumps(pi4.to_dict()), json.dumps(pi5.to_dict())  # (JSON-able)
    assert pi4.to_dict()["system"]["swaps"][0]["on_sd_card"] is True


def test_budget_is_the_smaller_of_available_and_the_cgroup_limit_less_headroom(tmp_path):
    pi5 = run(BOARDS / "pi5")   # 1.15 GiB available, a 1400 MiB limit
    assert pi5.budget == 1203456 * 1024 - doctor.HEADROOM and pi5.budget_source.startswith("available memory")
    root = board_copy(tmp_path, "pi5")
    set_file(root, "sys/fs/cgroup/system.slice/sdlite.service/memory.max", str(800 * MiB))
    tight = run(root)
    assert tight.budget == 600 * MiB and tight.budget_source.startswith("cgroup limit")
    assert run(root, memory_budget_bytes=512 * MiB).budget == 512 * MiB


def test_the_model_fits_the_board_or_says_why_not(tmp_path):
    pi4 = run(BOARDS / "pi4", check_model_fit=True)
    assert pi4.model.shipped and pi4.model.error is None and pi4.model.peak <= pi4.budget
    assert "model-does-not-fit" not in ids(pi4)
    root = board_copy(tmp_path, "pi4")
    meminfo = (root / "proc/meminfo").read_text().replace("MemAvailable:    1489164 kB", "MemAvailable:     409600 kB")
    set_file(root, "proc/meminfo", meminfo)
    starved = run(root, check_model_fit=True)
    assert starved.model.error and "does not fit in 200 MiB" in starved.model.error
    assert {"model-does-not-fit", "low-memory-available"} <= ids(starved) and starved.verdict == "error"
    assert "fit      no:" in starved.text()


# --- each finding: fires, and stays silent ---------------------------------------------------------------

@pytest.mark.parametrize("machine,bits", [("armv7l", 32), ("armv6l", 32), ("aarch64", 32)])
def test_32bit_arm_os_is_an_error(machine, bits):
    r = run(BOARDS / "pi4", machine=machine, bits=bits)
    assert "os-32bit" in ids(r) and r.verdict == "error" and doctor.main_exit_code(r) == 1
    assert "64-bit Raspberry Pi OS" in next(f.message for f in r.findings if f.id == "os-32bit")
    assert is_32bit_arm_os(machine, bits) and "install the 64-bit Raspberry Pi OS" in arm32_refusal(machine, bits)


def test_64bit_is_not_refused():
    assert "os-32bit" not in ids(run(BOARDS / "pi4", machine="aarch64", bits=64))
    assert arm32_refusal("aarch64", 64) is None and arm32_refusal("x86_64", 64) is None


def test_swap_partition_on_the_sd_card(tmp_path):
    root = board_copy(tmp_path, "pi4")
    set_file(root, "proc/swaps", SWAPS_HEAD + "/dev/mmcblk0p3                          partition\t1048572\t\t0\t\t-2\n")
    r = run(root)
    assert "swap-on-sd-card" in ids(r) and "/dev/mmcblk0p3" in r.text()


def test_swap_file_on_a_usb_disk_or_behind_dev_root(tmp_path):
    root = board_copy(tmp_path, "pi4")
    mounts = (root / "proc/self/mounts").read_text()
    set_file(root, "proc/self/mounts", mounts.replace("/dev/mmcblk0p2 /", "/dev/sda2 /", 1))
    assert "swap-on-sd-card" not in ids(run(root))
    # an older Raspberry Pi OS lists the root as /dev/root: the kernel command line's PARTUUID says where it is
    set_file(root, "proc/self/mounts", mounts.replace("/dev/mmcblk0p2 /", "/dev/root /", 1))
    (root / "dev/disk/by-partuuid").mkdir(parents=True)
    (root / "dev/disk/by-partuuid/4e639091-02").symlink_to("../../mmcblk0p2")
    assert "swap-on-sd-card" in ids(run(root))


def test_zram_swap_is_not_on_the_sd_card():
    assert "swap-on-sd-card" not in ids(run(BOARDS / "pi5"))


def test_no_swap_and_no_zram_on_a_2gb_board(tmp_path):
    root = board_copy(tmp_path, "pi4")
    set_file(root, "proc/swaps", SWAPS_HEAD)
    r = run(root)
    assert "no-swap-no-zram" in ids(r) and "swap-on-sd-card" not in ids(r)
    assert "no-swap-no-zram" not in ids(run(BOARDS / "pi4")) and "no-swap-no-zram" not in ids(run(BOARDS / "pi5"))
    # an 8 GB board without swap: not a pitfall
    meminfo = (root / "proc/meminfo").read_text().replace("MemTotal:        1892384 kB", "MemTotal:        8245120 kB")
    set_file(root, "proc/meminfo", meminfo)
    assert "no-swap-no-zram" not in ids(run(root))


def test_service_without_a_memory_limit(tmp_path):
    root = board_copy(tmp_path, "pi5")
    set_file(root, "sys/fs/cgroup/system.slice/sdlite.service/memory.max", "max\n")
    r = run(root)
    assert "service-without-memory-limit" in ids(r) and "sdlite.service" in r.text()
    # a limit on the slice above is in force too
    set_file(root, "sys/fs/cgroup/system.slice/memory.max", f"{1536 * MiB}\n")
    r = run(root)
    assert "service-without-memory-limit" not in ids(r) and r.system.cgroup.limit == 1536 * MiB
    assert "service-without-memory-limit" not in ids(run(BOARDS / "pi5", env={"INVOCATION_ID": "0f3e"}))


def test_a_login_session_is_not_a_service(tmp_path):
    # a shell over SSH, even one that inherited INVOCATION_ID (a terminal started by a user service)
    assert run(BOARDS / "pi4", env={"INVOCATION_ID": "0f3e"}).system.service is None
    root = board_copy(tmp_path, "pi4")
    set_file(root, "proc/1/comm", "bash\n")  # a container: no systemd
    set_file(root, "proc/self/cgroup", "0::/system.slice/sdlite.service\n")
    assert run(root, env={"INVOCATION_ID": "0f3e"}).system.service is None
    set_file(root, "proc/1/comm", "systemd\n")
    assert run(root).system.service == "sdlite.service"
    # inside deploy/sdlite.service, ProtectProc=invisible hides PID 1: systemd's INVOCATION_ID tells instead
    (root / "proc/1/comm").unlink()
    assert run(root, env={"INVOCATION_ID": "0f3e"}).system.service == "sdlite.service"
    assert run(root).system.service is None


def test_memory_cgroup_controller_off(tmp_path):
    root = board_copy(tmp_path, "pi4")
    cgroups = (root / "proc/cgroups").read_text().replace("memory\t0\t71\t1", "memory\t0\t71\t0")
    set_file(root, "proc/cgroups", cgroups)
    r = run(root)
    assert "memory-cgroup-disabled" in ids(r) and "cgroup_enable=memory" in r.text()
    assert "memory-cgroup-disabled" not in ids(run(BOARDS / "pi4"))


def test_low_memory_available(tmp_path):
    root = board_copy(tmp_path, "pi5")
    assert "low-memory-available" not in ids(run(root))
    set_file(root, "sys/fs/cgroup/system.slice/sdlite.service/memory.max", str(640 * MiB))
    assert "low-memory-available" in ids(run(root))  # the cgroup's limit is what this process has


def test_low_disk():
    assert "low-disk" in ids(run(BOARDS / "pi4", disk_free=900 * MiB))
    assert "low-disk" not in ids(run(BOARDS / "pi4", disk_free=8 * GiB))


def test_16_bit_precision_the_cpu_does_not_compute(tmp_path, monkeypatch):
    assert "bf16-not-native" in ids(run(BOARDS / "pi5", precision="bf16"))
    assert "bf16-not-native" in ids(run(BOARDS / "pi5", env={"SDLITE_PRECISION": "bf16"}))
    assert "fp16-not-native" in ids(run(BOARDS / "pi4", precision="fp16"))
    assert "fp16-not-native" not in ids(run(BOARDS / "pi5", precision="fp16"))  # ARMv8.2 fp16
    for name in ("auto", "fp32"):
        assert not ids(run(BOARDS / "pi5", precision=name)) & {"bf16-not-native", "fp16-not-native"}
    root = tmp_path / "amx"
    set_file(root, "proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    monkeypatch.setattr(precision_mod, "onednn_bf16", lambda: (True, ""))
    r = run(root, machine="x86_64", precision="bf16")
    assert "bf16-not-native" not in ids(r) and r.precision_auto.startswith("bf16")


def test_torch_with_cuda_libraries_on_a_board(tmp_path):
    r = run(BOARDS / "pi5", torch_info=CUDA_TORCH)
    assert "torch-cuda-on-arm" in ids(r) and "download.pytorch.org/whl/cpu" in r.text()
    assert "torch-cuda-on-arm" not in ids(run(BOARDS / "pi5", torch_info=CPU_TORCH))
    assert "torch-cuda-on-arm" not in ids(run(BOARDS / "x86-avx2", machine="x86_64", torch_info=CUDA_TORCH))
    root = board_copy(tmp_path, "pi5")
    set_file(root, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.0\n")  # a Jetson: CUDA is real there
    assert "torch-cuda-on-arm" not in ids(run(root, torch_info=CUDA_TORCH))


def test_every_finding_is_tested_and_has_a_level():
    assert set(FINDINGS.values()) <= {"error", "warning"}
    text = Path(__file__).read_text()
    for finding in FINDINGS:
        assert f'"{finding}"' in text, finding


# --- generate and serve refuse a 32-bit ARM OS ------------------------------------------------------------

@pytest.mark.parametrize("argv", [["generate", "a lighthouse"], ["serve"]])
def test_generate_and_serve_refuse_a_32bit_arm_os(argv, monkeypatch, capsys):
    monkeypatch.setattr(platform, "machine", lambda: "armv7l")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlite: error: this is a 32-bit ARM OS (armv7l") and "64-bit Raspberry Pi OS" in err
    assert "\n" not in err


def test_doctor_reports_a_32bit_arm_os_with_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(platform, "machine", lambda: "armv7l")
    assert cli.main(["doctor", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "error" and "os-32bit" in [f["id"] for f in out["findings"]]
