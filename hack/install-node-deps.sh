#!/usr/bin/env bash
# Install (idempotently) the Debian packages the real node of the local cluster and the image
# builds need: runc, the CNI plugins, iptables, conntrack, and mmdebstrap for image root
# filesystems. Root is needed (CI runs as root). Packages already present are not touched, and
# `apt-get update` runs only when something is missing.
set -euo pipefail

PACKAGES=(runc containernetworking-plugins iptables conntrack iproute2 mmdebstrap)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[install-node-deps] all present: ${PACKAGES[*]}" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[install-node-deps] missing ${missing[*]}; installing them needs root" >&2
  exit 1
fi
echo "[install-node-deps] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
