#!/usr/bin/env bash
# Host tools the container test (tests/docker/) needs; installs only what is missing.
#   podman + runc: builds and runs the image without a Docker daemon (crun is not used:
#                  it fails on some hosts; the test passes `--runtime runc`)
#   debootstrap:   makes the local Debian bookworm base image (no registry needed)
#   uidmap:        newuidmap/newgidmap, so podman can map the image's non-root user
# Needs root (or sudo) and Debian/Ubuntu apt. Safe to run again.
set -euo pipefail
exec bash "$(dirname "$0")/../scripts/install_system_deps.sh" \
  podman:podman runc:runc debootstrap:debootstrap newuidmap:uidmap
