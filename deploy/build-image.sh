#!/usr/bin/env bash
# Build the bentoformers container image offline: no container registry, no package index during the
# image build. Run it from an environment where `bentoformers build` has filled BENTOML_HOME.
#
#   deploy/build-image.sh [--gpu] [--tag NAME]
#
# Steps (each cached where it can be):
#   1. a Debian base image from the host's Debian mirror (debootstrap), imported into podman;
#   2. uv and the wheelhouse (pip download of the bento's pinned packages, once per package list);
#   3. `bentoml build` with the base image set to that local image;
#   4. `bentoml containerize --backend podman` with no network, the wheelhouse mounted read-only.
# --gpu swaps onnxruntime for onnxruntime-gpu with its CUDA/cuDNN wheels (deploy/image/gpu-packages.txt)
# and serves whatever variants the store holds (build fp16 on a GPU machine first).
#
# Needs: podman, runc, debootstrap, python3 with this project installed ('.[serve]' at least).
# Environment: DEBIAN_MIRROR (default: the first mirror in the host's apt sources),
# BENTOFORMERS_IMAGE_CACHE (default ~/.cache/bentoformers-image), CONTAINERS_CONF (default: ours).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$ROOT/deploy/image
GPU=0
TAG=localhost/bentoformers:latest
while [ $# -gt 0 ]; do
  case $1 in
    --gpu) GPU=1; TAG=localhost/bentoformers-gpu:latest ;;
    --tag) TAG=$2; shift ;;
    *) echo "usage: $0 [--gpu] [--tag NAME]" >&2; exit 2 ;;
  esac
  shift
done

CACHE=${BENTOFORMERS_IMAGE_CACHE:-$HOME/.cache/bentoformers-image}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}
export BENTOML_DO_NOT_TRACK=True
mkdir -p "$CACHE"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SECONDS=0
step() { printf '[build-image %4ss] %s\n' "$SECONDS" "$*"; }

for tool in podman runc debootstrap python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install podman runc debootstrap)" >&2; exit 1; }
done
python3 -c "import bentoml, bentoformers" 2>/dev/null \
  || { echo "run this with the project's virtual environment active" >&2; exit 1; }

# bentoml build calls uv even with lock_packages: false; keep it out of the project's environment.
if ! command -v uv >/dev/null; then
  [ -x "$CACHE/tools/bin/uv" ] || { python3 -m venv "$CACHE/tools" && "$CACHE/tools/bin/pip" install -q uv; }
  mkdir -p "$CACHE/bin" && ln -sf "$CACHE/tools/bin/uv" "$CACHE/bin/uv"
  export PATH=$CACHE/bin:$PATH
fi

# 1. Base image. build-essential, git and gnupg2 are there because BentoML's Dockerfile apt-installs
# them; offline, that apt step is a no-op only if they are already present.
DEBIAN_IMAGE=localhost/bentoformers-debian:bookworm
BASE_IMAGE=localhost/bentoformers-base:bookworm-py311
if ! podman image exists "$DEBIAN_IMAGE"; then
  mirror=${DEBIAN_MIRROR:-$(grep -hoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '{print $2}' | grep -v security | head -1 || true)}
  [ -n "$mirror" ] || { echo "set DEBIAN_MIRROR to a Debian mirror URL" >&2; exit 1; }
  step "debootstrap bookworm from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,build-essential,git,gnupg2 \
    bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  step "import the root file system"
  tar -C "$WORK/rootfs" -c . | podman import -q - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
fi
cp "$(command -v uv)" "$WORK/uv"
cp "$HERE/Containerfile.base" "$WORK/Containerfile"
step "base image $BASE_IMAGE"
podman build -q --network=none --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$BASE_IMAGE" "$WORK" >/dev/null

# 2. The bentofile for this build: ours, with the local base image (and the GPU packages).
python3 - "$ROOT/bentofile.yaml" "$WORK/bentofile.yaml" "$BASE_IMAGE" "$GPU" "$HERE/gpu-packages.txt" <<'EOF'
import sys, yaml
src, dst, base, gpu, gpu_file = sys.argv[1:]
bento = yaml.safe_load(open(src))
bento["docker"] = {"base_image": base}  # python_version/distro come from the base image
packages = bento["python"]["packages"]
if gpu == "1":
    extra = [l.strip() for l in open(gpu_file) if l.strip() and not l.startswith("#")]
    swapped = {p.split("[")[0].split("=")[0].replace("-gpu", "") for p in extra}
    packages = [p for p in packages if p.split("==")[0] not in swapped] + extra
    bento.setdefault("labels", {})["device"] = "cuda"
bento["python"]["packages"] = packages
open(dst, "w").write(yaml.safe_dump(bento, sort_keys=False))
open(dst + ".txt", "w").write("\n".join(packages) + "\n")
EOF

# 3. Wheelhouse, one per package list (the image build itself never reaches an index).
key=$( (cat "$WORK/bentofile.yaml.txt"; python3 -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels-$key
if [ ! -f "$WHEELS/.complete" ]; then
  step "wheelhouse $WHEELS"
  rm -rf "$WHEELS"
  python3 -m pip download -q -d "$WHEELS" -r "$WORK/bentofile.yaml.txt" --python-version 3.11 --only-binary=:all:
  touch "$WHEELS/.complete"
fi

# 4. Bento, then image.
step "bentoml build"
# The bento lists every service the image can start: composed with the models in processes of their own, as the
# gpu component runs them (`start-http-server --service-name=model-…`). At run time the CPU default is still the
# models in the gateway's process: the service is composed again from the runtime settings.
BENTO=$(cd "$ROOT" && BENTOFORMERS_MODEL_PROCESS=separate bentoml build -f "$WORK/bentofile.yaml" --output tag . 2>"$WORK/bentoml-build.log" | tail -1) \
  || { cat "$WORK/bentoml-build.log" >&2; exit 1; }
BENTO=${BENTO#__tag__:}
step "containerize $BENTO as $TAG"
bentoml containerize "$BENTO" --backend podman -t "$TAG" \
  --opt network=none --opt volume="$WHEELS:/wheels:ro" >"$WORK/containerize.log" 2>&1 \
  || { tail -40 "$WORK/containerize.log" >&2; exit 1; }
size=$(podman image inspect "$TAG" --format '{{.Size}}')
step "done: $TAG ($BENTO), $((size / 1000000)) MB"
