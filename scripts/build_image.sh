#!/usr/bin/env bash
# Build HyperGen's CPU container image with `bentoml containerize --backend buildah`, start it,
# and check /health and one generation through the official OpenAI client.
#
#   pip install -c constraints.txt torch==2.13.0 -e '.[client]'   # the README's install
#   scripts/build_image.sh                  # as root: buildah needs it here (no Docker daemon)
#   sudo env "PATH=$PATH" scripts/build_image.sh    # from a venv, as another user
#
# Steps: install buildah + debootstrap (Debian packages) if missing; bootstrap a local base
# image that stands in for `python:3.11-slim` (Debian bookworm has Python 3.11; the host's CA
# bundle goes in so the build reaches the package registries); build a Bento that carries the
# embedded model (`hypergen build`: the store copy only) and names the CPU torch build; containerize
# it with scripts/cpu-image.Dockerfile.j2 (BentoML's Dockerfile without compilers or caches)
# while the torch wheel and constraints.txt are mounted into the build, never copied into the
# image; run it with `buildah run` on the host network; ask it for a picture.
#
# Settings (environment): IMAGE (hypergen:cpu), PORT (3300), WORK (/var/tmp/hypergen-image),
# STORAGE_DRIVER (overlay, falling back to vfs), KEEP_RUNNING=1 to leave the container serving,
# PYTHON (python3: the interpreter HyperGen is installed in), TORCH_WHEEL (a CPU torch wheel;
# default: `pip download torch==<installed version>`, which must resolve to a +cpu build, e.g.
# with PIP_EXTRA_INDEX_URL naming PyTorch's CPU index).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-hypergen:cpu}
PORT=${PORT:-3300}
WORK=${WORK:-/var/tmp/hypergen-image}
PYTHON=${PYTHON:-python3}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
BASE_IMAGE=localhost/python:3.11-slim
export BUILDAH_ISOLATION=chroot
mkdir -p "$WORK"

if ! "$PYTHON" -c "import hypergen, openai, torch, yaml" 2>/dev/null; then
    echo "$PYTHON cannot import hypergen, openai and torch: install HyperGen first (README:" >&2
    echo "  pip install -c constraints.txt torch==2.13.0 -e '.[client]'), and run this script with that" >&2
    echo "  environment's python (PYTHON=/path/to/venv/bin/python, or sudo env \"PATH=\$PATH\" ...)." >&2
    exit 1
fi

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "tools"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends "${missing[@]}" fuse-overlayfs
fi
buildah --version

# overlay copies nothing per layer; vfs copies every layer in full but works everywhere.
if [[ -z "${STORAGE_DRIVER:-}" ]]; then
    if buildah --storage-driver overlay images >/dev/null 2>&1 && buildah --storage-driver overlay from --name hypergen-probe scratch >/dev/null 2>&1 \
        && buildah --storage-driver overlay mount hypergen-probe >/dev/null 2>&1; then
        STORAGE_DRIVER=overlay
    else
        STORAGE_DRIVER=vfs
    fi
    buildah --storage-driver "$STORAGE_DRIVER" rm hypergen-probe >/dev/null 2>&1 || true
fi
export STORAGE_DRIVER
step "buildah storage driver: $STORAGE_DRIVER"

if ! buildah images --quiet "$BASE_IMAGE" >/dev/null 2>&1; then
    step "bootstrapping $BASE_IMAGE (Debian bookworm, Python 3.11)"
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian
    cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED  # like python:3.11-slim, pip may install
    ln -sf python3 "$rootfs/usr/bin/python"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    container=$(buildah from scratch)
    mountpoint=$(buildah mount "$container")
    cp -a "$rootfs/." "$mountpoint/"
    buildah umount "$container"
    buildah config \
        --env LANG=C.UTF-8 \
        --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
        --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        --env UV_NATIVE_TLS=1 \
        --cmd python3 "$container"
    buildah commit --rm "$container" "$BASE_IMAGE"
    rm -rf "$rootfs"
fi

step "building the Bento (embedded model in the store, CPU torch named)"
inputs="$WORK/build-inputs"  # mounted into the image build at /build-inputs, never copied into it
rm -rf "$inputs" && mkdir -p "$inputs"
torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
if [[ -n "${TORCH_WHEEL:-}" ]]; then
    cp "$TORCH_WHEEL" "$inputs/"
else
    "$PYTHON" -m pip download --no-deps --dest "$inputs" "torch==$torch_version" >/dev/null
fi
torch_wheel=$(ls "$inputs"/torch-*.whl | head -1)
case "$torch_wheel" in *+cpu*) ;; *) echo "expected a CPU torch wheel, got $torch_wheel (set TORCH_WHEEL)" >&2; exit 1 ;; esac
cp "$ROOT/constraints.txt" "$inputs/"
"$PYTHON" - "$ROOT" "$WORK/bentofile-cpu.yaml" "$torch_wheel" <<'PY'
import os, re, sys, yaml
root, target, wheel = sys.argv[1:]
config = yaml.safe_load(open(os.path.join(root, "bentofile.yaml")))
python = config["python"]
# Name the CPU build exactly (e.g. torch==2.13.0+cpu): only the wheel in /build-inputs has that
# version, so the resolver takes it there and peft and accelerate pull no CUDA torch; every
# other version comes from constraints.txt, as in the README's install.
torch = "torch==" + re.match(r"torch-([^-]+)-", os.path.basename(wheel)).group(1)
requirements = [line.strip() for line in open(os.path.join(root, python.pop("requirements_txt")))]
python["packages"] = [torch if line.startswith("torch") else line for line in requirements if line and not line.startswith("#")]
python["find_links"] = ["/build-inputs"]
python["pip_args"] = "--constraint /build-inputs/constraints.txt"
config["docker"]["dockerfile_template"] = "scripts/cpu-image.Dockerfile.j2"
yaml.safe_dump(config, open(target, "w"), sort_keys=False)
PY
# `hypergen build` reuses the store's model versions when their content is unchanged, and leaves
# the copies under hypergen/assets out of the Bento (the store carries them).
(cd "$ROOT" && "$PYTHON" -m hypergen.cli build --bentofile "$WORK/bentofile-cpu.yaml")

step "bentoml containerize --backend buildah -> $IMAGE"
# BentoML 1.4.36+ refuses a Bento's dockerfile_template at containerize time unless its temporary
# build context lies under the working directory (BentoML issue #5566): run it from its TMPDIR.
context="$WORK/context"
rm -rf "$context" && mkdir -p "$context"
(cd "$context" && TMPDIR="$context" "$PYTHON" -m bentoml containerize hypergen:latest --backend buildah --image-tag "$IMAGE" \
    --opt "volume=$inputs:/build-inputs:ro")
buildah images "$IMAGE"

step "starting the image on port $PORT"
buildah rm hypergen-run >/dev/null 2>&1 || true
buildah from --name hypergen-run "$IMAGE" >/dev/null
buildah run --network host hypergen-run -- bentoml serve /home/bentoml/bento --port "$PORT" >"$WORK/serve.log" 2>&1 &
server=$!
cleanup() {
    if [[ "${KEEP_RUNNING:-0}" != 1 ]]; then
        pkill -f "bentoml serve /home/bentoml/bento --port $PORT" 2>/dev/null || true
        pkill -f "_bentoml_impl.worker.service /home/bentoml/bento" 2>/dev/null || true  # its services outlive it
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        buildah rm hypergen-run >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then cat "$WORK/serve.log"; echo "the container exited" >&2; exit 1; fi
    sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/health"; echo

step "one generation through the official client"
(cd "$ROOT" && "$PYTHON" - "$PORT" <<'PY'
import base64, io, sys
from openai import OpenAI
from PIL import Image
from training.shapes import Scene, judge

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="x", max_retries=0)
print("models:", [model.id for model in client.models.list().data])
prompt = "a red circle on a blue background"
result = client.images.generate(prompt=prompt, size="64x64", response_format="b64_json", extra_body={"seed": 1})
image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
verdict = judge(image)
print(f"{prompt!r} -> {image.size} image; judge reads: {verdict.colour} {verdict.shape} on {verdict.background}")
sys.exit(0 if verdict.colour == "red" and verdict.background == "blue" else 1)
PY
)
step "done: $IMAGE built, served and answered (server log: $WORK/serve.log)"
