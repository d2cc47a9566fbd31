#!/usr/bin/env bash
# rtdspeed container entrypoint (installed as /usr/local/bin/rtdspeed): the project's commands
# by name, anything else runs as given. With RTDSPEED_SSHD=1 an sshd for multi-node launches
# (`deepspeed --hostfile`, mpirun over ssh) starts first, in the background.
set -euo pipefail

readonly SRC=/opt/rtdspeed

usage() {
  cat <<'EOF'
usage: rtdspeed COMMAND [ARGS...]     (in the image: docker run IMAGE COMMAND [ARGS...])

  train-tokenizer ARGS   python -m data_pipeline.train_tokenizer ARGS
  build-shards ARGS      python -m data_pipeline.build_shards ARGS
  verify-shards DIR      python -m data_pipeline.verify DIR (or s3://BUCKET/PREFIX)
  pretrain ARGS          python launcher/pretrain.py ARGS (one process)
  export ARGS            python -m launcher.hf.export ARGS
  demo                   python -m launcher.demo (the whole pipeline on the bundled sample)
  sshd                   run sshd in the foreground (a worker node of a multi-node job)
  help                   this text
  anything else          run as given, e.g. `deepspeed --num_gpus 8 launcher/pretrain.py ...`

Working directory: /opt/rtdspeed (read-only code; relative outputs go to work/, mount a
volume there). Every command has --help. Environment: RTDSPEED_SSHD=1 starts sshd before the
command; RTDSPEED_SSHD_PORT (2222) its port. See docker/README.md.
EOF
}

# sshd as the container's user: keys from ~/.ssh/authorized_keys, a host key made per start
# (nodes do not check host keys, see /etc/ssh/ssh_config.d/rtdspeed.conf). Commands run over
# ssh get this environment's PATH, so the venv's python, deepspeed and mpirun are found.
sshd() {
  local dir="${TMPDIR:-/tmp}/rtdspeed-sshd-$(id -u)"
  mkdir -p "${dir}"
  chmod 700 "${dir}"
  [ -f "${dir}/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "${dir}/host_ed25519"
  if [ ! -s "${HOME}/.ssh/authorized_keys" ]; then
    echo "rtdspeed sshd: no ${HOME}/.ssh/authorized_keys; nobody can log in" >&2
  fi
  /usr/sbin/sshd -f /etc/rtdspeed/sshd_config -h "${dir}/host_ed25519" \
    -p "${RTDSPEED_SSHD_PORT:-2222}" \
    -o "SetEnv=PATH=${PATH} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} VIRTUAL_ENV=${VIRTUAL_ENV:-}" \
    "$@"
}

cmd="${1:-help}"
[ $# -eq 0 ] || shift

if [ "${RTDSPEED_SSHD:-0}" = 1 ] && [ "${cmd}" != sshd ]; then
  sshd  # forks into the background
fi

case "${cmd}" in
  train-tokenizer) exec python -m data_pipeline.train_tokenizer "$@" ;;
  build-shards) exec python -m data_pipeline.build_shards "$@" ;;
  verify-shards) exec python -m data_pipeline.verify "$@" ;;
  pretrain) exec python "${SRC}/launcher/pretrain.py" "$@" ;;
  export) exec python -m launcher.hf.export "$@" ;;
  demo) exec python -m launcher.demo "$@" ;;
  sshd) sshd -D -e "$@" ;;
  help | -h | --help) usage ;;
  *) exec "${cmd}" "$@" ;;
esac
