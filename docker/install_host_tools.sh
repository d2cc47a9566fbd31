#!/usr/bin/env bash
# Host tools the container test (tests/docker/) needs; installs only what is missing.
#   podman + runc: builds and runs the image without a Docker daemon (crun is not used:
#                  it fails on some hosts; the test passes `--runtime runc`)
#   debootstrap:   makes the local Debian bookworm base image (no registry needed)
#   uidmap:        newuidmap/newgidmap, so podman can map the image's non-root user
# Needs root (or sudo) and Debian/Ubuntu apt. Safe to run again.
set -euo pipefail
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v newuidmap >/dev/null || need+=(uidmap)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_host_tools: no apt-get here; please install: ${need[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install_host_tools: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
