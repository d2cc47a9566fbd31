#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv:
#   slurmctld/slurmd/slurm-client: a real single-node SLURM that the SLURM launcher test starts itself
#   pdsh: what `deepspeed --hostfile` uses to reach other nodes
# Installs only what is missing; needs root (or sudo) and Debian/Ubuntu apt.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v pdsh >/dev/null || need+=(pdsh)
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
