#!/usr/bin/env bash
# Debian packages the tests need (real components, not mocks). Idempotent and quick when all are present;
# installs only as root. `make test` and `.ci/run` call it; on a machine where you are not root it prints
# what is missing and the tests that need it skip with a loud message.
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)          # the HumanEval sandbox
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)       # the SLURM executor's tests
command -v munged >/dev/null 2>&1 || need+=(munge)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${need[*]} (not root: install them with apt-get, or those tests skip)" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
