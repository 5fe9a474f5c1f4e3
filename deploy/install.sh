#!/usr/bin/env bash
# Install sdlite as a systemd service (deploy/sdlite.service), from this checkout, as root:
#
#   sudo deploy/install.sh
#
# Safe to run again (an upgrade: the venv is updated in place; an existing /etc/sdlite/sdlite.env is kept).
# What it does:
#   1. refuses a 32-bit OS (sdlite needs a 64-bit one: torch ships no 32-bit ARM builds)
#   2. a system user `sdlite` (no login, home /var/lib/sdlite)
#   3. a venv in $PREFIX/venv (default /opt/sdlite): torch==$TORCH_VERSION, CPU build, from $TORCH_INDEX, then
#      sdlite with its serve extra; every package (torch's dependencies too) pinned by constraints.txt
#   4. $PREFIX/models for the model files (read-only to the service), /etc/sdlite/sdlite.env (mode 0600)
#   5. /etc/systemd/system/sdlite.service, then `systemctl daemon-reload`; it does not start the service
# Environment: PREFIX, TORCH_VERSION, TORCH_INDEX (empty: pip's own index), PYTHON (default python3).
# Defaults: x86-64 torch 2.13.0 from the CPU index; aarch64 torch 2.9.1 from PyPI (CPU-only there; newer
# aarch64 wheels on PyPI are CUDA builds, and 2.10.0 dies on a Pi 4 at import: bench/arm64/README.md).
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/sdlite}"
if [ "$(uname -m)" = aarch64 ]; then  # PyPI's 2.9.1 is CPU-only and runs on a Pi 4's ARMv8.0 core (bench/arm64)
  TORCH_VERSION="${TORCH_VERSION:-2.9.1}"; TORCH_INDEX="${TORCH_INDEX-}"
else
  TORCH_VERSION="${TORCH_VERSION:-2.13.0}"; TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
fi
PYTHON="${PYTHON:-python3}"
SERVICE_USER=sdlite
UNIT=/etc/systemd/system/sdlite.service
ENV_FILE=/etc/sdlite/sdlite.env

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
if [ ! -f "$SRC/pyproject.toml" ] || [ ! -f "$SRC/constraints.txt" ]; then die "run from an sdlite checkout ($SRC)"; fi
command -v systemctl >/dev/null 2>&1 || die "no systemctl: this kit is for systemd"

# 1. a 64-bit OS (a 32-bit userland on a 64-bit kernel still says aarch64 in uname -m: ask for the word size)
case "$(uname -m)" in
  armv6l|armv7l|armv8l|arm) die "this is a 32-bit ARM OS ($(uname -m)): install the 64-bit Raspberry Pi OS" ;;
esac
[ "$(getconf LONG_BIT)" = 64 ] || die "this is a 32-bit OS: install the 64-bit Raspberry Pi OS (or another 64-bit OS)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$PYTHON is older than 3.10"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "$PYTHON has no venv module: apt install python3-venv"

# 2. the service user
if ! getent passwd "$SERVICE_USER" >/dev/null; then
  say "creating the system user $SERVICE_USER"
  useradd --system --user-group --home-dir /var/lib/sdlite --no-create-home --shell /usr/sbin/nologin \
    "$SERVICE_USER"
fi

# 3. the venv: torch first (its CPU build: the default one on PyPI pulls several GB of CUDA libraries), then sdlite
install -d -m 0755 "$PREFIX" "$PREFIX/models"
[ -x "$PREFIX/venv/bin/python" ] || { say "creating $PREFIX/venv"; "$PYTHON" -m venv "$PREFIX/venv"; }
PIP=("$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check -c "$SRC/constraints.txt")
if [ -n "$TORCH_INDEX" ]; then  # torch alone from the CPU index; its dependencies come next, pinned, from pip's index
  say "installing torch==$TORCH_VERSION from $TORCH_INDEX"
  "${PIP[@]}" --no-deps --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
fi
say "installing sdlite[serve] from $SRC"  # (--upgrade: rebuilt from the checkout; torch stays, pinned)
"${PIP[@]}" --upgrade "${SRC}[serve]"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"

# 4. the flags (kept when present: they are the operator's) and the unit
install -d -m 0755 /etc/sdlite
if [ ! -e "$ENV_FILE" ]; then
  install -m 0600 -o root -g root "$SRC/deploy/sdlite.env" "$ENV_FILE"
  say "wrote $ENV_FILE: set SDLITE_MODEL and SDLITE_MEMORY_BUDGET there"
else
  say "kept $ENV_FILE (the shipped one is $SRC/deploy/sdlite.env)"
fi
sed "s#/opt/sdlite#$PREFIX#g" "$SRC/deploy/sdlite.service" > "$UNIT.tmp"
chmod 0644 "$UNIT.tmp"
mv "$UNIT.tmp" "$UNIT"
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify "$UNIT" || die "systemd-analyze verify $UNIT failed"
fi
systemctl daemon-reload

say "installed. Next:"
say "  put a model under $PREFIX/models (e.g. sdlite convert MODEL $PREFIX/models/sd15-int8 --weights int8)"
say "  edit $ENV_FILE; keep MemoryMax = SDLITE_MEMORY_BUDGET + 200M (systemctl edit sdlite)"
say "  $PREFIX/venv/bin/sdlite doctor MODEL     (this board, and whether the model fits)"
say "  systemctl enable --now sdlite; journalctl -u sdlite -f"
