#!/usr/bin/env bash
# Build the securecollab image (deploy/Dockerfile) with a running Docker engine, registry or not.
#   Base: BASE_IMAGE if set; else python:3.11-slim (pulled if missing); else, with no registry
#   reachable, a Debian bookworm base made with debootstrap (needs root and Debian's mirror).
#   Wheels: every wheel in WHEELS_DIR (default /opt/wheels, if present) is offered to pip over a
#   local HTTP server; a CPU torch wheel there replaces PyTorch's CPU index.
#   This machine's extra CA certificates (/usr/local/share/ca-certificates) are trusted in the build.
# IMAGE (securecollab:latest) names the result.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-securecollab:latest}
WHEELS_DIR=${WHEELS_DIR:-/opt/wheels}
say() { echo "[build-image $(date +%H:%M:%S)] $*"; }

server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -f deploy/extra-ca/host-*.crt; }
trap cleanup EXIT

if [ -z "${BASE_IMAGE:-}" ]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1 || docker pull -q python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=python:3.11-slim
    else
        BASE_IMAGE=securecollab-base:bookworm
        if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
            [ "$(id -u)" = 0 ] || { say "no registry: building a base image needs root (debootstrap)"; exit 1; }
            command -v debootstrap >/dev/null || deploy/apt-install debootstrap
            rootfs=$(mktemp -d)
            say "no registry: building $BASE_IMAGE with debootstrap (Debian bookworm, Python 3.11)"
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
            tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
            rm -rf "$rootfs"
        fi
    fi
fi

args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$WHEELS_DIR" >/dev/null 2>&1 &
    server=$!
    args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
    compgen -G "$WHEELS_DIR/torch-*+cpu-*.whl" >/dev/null && args+=(--build-arg "PIP_EXTRA_INDEX_URL=")
fi
for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$crt" ] && cp "$crt" "deploy/extra-ca/host-$(basename "$crt")"
done
say "building $IMAGE on $BASE_IMAGE"
# --network host: the build reaches the local wheel server (and, through the host, the index)
docker build -q --network host -f deploy/Dockerfile "${args[@]}" -t "$IMAGE" . >/dev/null
say "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}'))"
