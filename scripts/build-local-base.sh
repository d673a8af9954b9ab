#!/usr/bin/env bash
# Make a local stand-in for the CPU image's public base (python:3.11-slim-bookworm)
# on a machine that reaches Debian's package mirror but no container registry:
# debootstrap a minimal Debian bookworm with Python 3.11 and `podman import` it.
#
#   bash scripts/build-local-base.sh            # prints the image name
#   podman build --isolation chroot -f docker/Dockerfile --target cpu \
#       --build-arg CPU_BASE="$(bash scripts/build-local-base.sh)" .
#
# Idempotent and cached: the image is kept in podman's store, and its root
# filesystem as a tarball under $INSPECTION_BASE_CACHE (default
# /var/cache/inspection-ci), so a second run costs a second, and a run after
# podman's store was wiped costs a few seconds instead of a debootstrap (~1 min).
# Needs root, debootstrap and podman (scripts/install-system-deps.sh).
set -euo pipefail

image="localhost/inspection-base:bookworm-python3.11"
cache_dir="${INSPECTION_BASE_CACHE:-/var/cache/inspection-ci}"
# Bump when the package list below changes, so an old tarball is not reused.
recipe="v1"
tarball="$cache_dir/debian-bookworm-python3.11-$recipe.tar"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if podman image exists "$image" \
    && [ "$(podman image inspect --format '{{ index .Labels "recipe" }}' "$image" 2>/dev/null)" = "$recipe" ]; then
    echo "$image"
    exit 0
fi

mkdir -p "$cache_dir"
if [ ! -s "$tarball" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo "build-local-base: debootstrap bookworm into $work (about a minute)" >&2
    # python3-venv: the image makes a venv; ca-certificates: pip talks TLS.
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # What python:*-slim also leaves out.
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
        "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/tmp/*
    tar -C "$work/rootfs" --numeric-owner -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi
podman import --quiet \
    --change 'CMD ["python3"]' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL recipe=$recipe" \
    --change 'LABEL org.opencontainers.image.description=local stand-in for python:3.11-slim-bookworm' \
    "$tarball" "$image" >/dev/null
echo "$image"
