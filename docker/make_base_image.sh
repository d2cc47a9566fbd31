#!/usr/bin/env bash
# A Debian bookworm base image made locally with debootstrap, for building docker/Dockerfile
# where no container registry is reachable (the container test does this).
#
#   docker/make_base_image.sh [IMAGE]        default IMAGE: localhost/rtdspeed-bookworm-base
#
# Cached on this machine: the image itself (kept if present) and the root filesystem tarball
# in $RTDSPEED_CACHE_DIR (default /var/cache/rtdspeed, else ~/.cache/rtdspeed), so a wiped
# image store only costs the import, not a new debootstrap.
# Environment: RTDSPEED_DEBIAN_MIRROR (default: the first deb.debian.org-style mirror of this
# machine's apt sources, else http://deb.debian.org/debian), PODMAN (default: podman with
# runc and cgroupfs). Needs root (debootstrap) and the tools of docker/install_host_tools.sh.
set -euo pipefail

IMAGE="${1:-localhost/rtdspeed-bookworm-base}"
PODMAN="${PODMAN:-podman --runtime runc --cgroup-manager cgroupfs}"
SUITE=bookworm

if [ -n "${RTDSPEED_CACHE_DIR:-}" ]; then
  CACHE="${RTDSPEED_CACHE_DIR}"
elif mkdir -p /var/cache/rtdspeed 2>/dev/null && [ -w /var/cache/rtdspeed ]; then
  CACHE=/var/cache/rtdspeed
else
  CACHE="${HOME}/.cache/rtdspeed"
fi
mkdir -p "${CACHE}"
TARBALL="${CACHE}/${SUITE}-minbase.tar"

if ${PODMAN} image exists "${IMAGE}"; then
  echo "make_base_image: ${IMAGE} exists"
  exit 0
fi

mirror() {
  if [ -n "${RTDSPEED_DEBIAN_MIRROR:-}" ]; then
    echo "${RTDSPEED_DEBIAN_MIRROR}"
    return
  fi
  # deb822 "URIs:" or one-line "deb URI suite ..." entries whose path ends in /debian
  local uri
  uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | sed -n -E 's#^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?(https?://[^[:space:]]*/debian/?)([[:space:]].*)?$#\3#p' \
    | head -n 1)"
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -s "${TARBALL}" ]; then
  command -v debootstrap >/dev/null || {
    echo "make_base_image: debootstrap missing; run docker/install_host_tools.sh" >&2
    exit 1
  }
  root="$(mktemp -d "${CACHE}/rootfs.XXXXXX")"
  trap 'rm -rf "${root}"' EXIT
  echo "make_base_image: debootstrap ${SUITE} from $(mirror)"
  debootstrap --variant=minbase "${SUITE}" "${root}" "$(mirror)" >"${CACHE}/debootstrap.log" 2>&1 || {
    tail -n 20 "${CACHE}/debootstrap.log" >&2
    exit 1
  }
  # the suite, its updates and security fixes, as Debian's own images have them
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s-security %s-security main\n' \
    "$(mirror)" "${SUITE}" "$(mirror)" "${SUITE}" "$(mirror)" "${SUITE}" >"${root}/etc/apt/sources.list"
  # no apt caches in the image
  rm -rf "${root}"/var/cache/apt/archives/*.deb "${root}"/var/lib/apt/lists/*
  tar --numeric-owner -C "${root}" -cf "${TARBALL}.tmp" .
  mv "${TARBALL}.tmp" "${TARBALL}"
fi

echo "make_base_image: importing ${TARBALL} as ${IMAGE}"
${PODMAN} import --quiet --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
  "${TARBALL}" "${IMAGE}" >/dev/null
