#!/usr/bin/env bash
# Installs the Debian packages the test suite needs beyond the Python venv, only what is missing.
#   bash scripts/install_system_deps.sh                  # the defaults below
#   bash scripts/install_system_deps.sh CMD:PACKAGE ...  # others (docker/install_host_tools.sh)
# CMD is a command (looked up on PATH) or a shared library file name (lib*.so*, looked up in
# ld.so's cache). Defaults: slurmctld/slurmd/slurm-client, a real single-node SLURM that the
# SLURM launcher test starts itself; pdsh, what `deepspeed --hostfile` uses to reach other
# nodes; tcmalloc, which training processes preload on the CPU (launcher/train/allocator.py).
# Needs root (or sudo) and apt.
set -euo pipefail
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client pdsh:pdsh
  libtcmalloc_minimal.so.4:libtcmalloc-minimal4)
have() {
  case "$1" in
    lib*.so*) /sbin/ldconfig -p | grep -qF "$1" ;;
    *) command -v "$1" >/dev/null ;;
  esac
}
need=()
for pair in "${wanted[@]}"; do
  have "${pair%%:*}" || need+=("${pair#*:}")
done
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_system_deps: no apt-get here; please install: ${need[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install_system_deps: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
