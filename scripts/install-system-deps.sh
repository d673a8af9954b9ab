#!/usr/bin/env bash
# Debian packages the test suite needs, installed only where missing, so a
# second run on the same machine costs nothing. Needs root (CI runs as root);
# elsewhere it says what to install and carries on.
set -euo pipefail

packages=(
    prometheus  # a real Prometheus scrapes the server in tests; promtool checks configs
    prometheus-alertmanager  # a real Alertmanager delivers a fired alert in tests; amtool checks its config
    # The CPU image is built and run without a Docker engine (tests/integration/test_deploy_image.py):
    podman       # podman build --isolation chroot
    buildah      # buildah run --isolation chroot: runs the server inside the built image
    debootstrap  # makes the local base image (scripts/build-local-base.sh); no registry is reachable
)
# `kubectl kustomize k8s/` renders the manifests. Google's apt repository has
# kubectl but is not reachable from every machine; Debian's kubernetes-client
# (kubectl 1.20, kustomize v2) renders k8s/ the same, so fall back to it.
command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: not root; please install: ${missing[*]}" >&2
    exit 0
fi
echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
