#!/usr/bin/env bash
# Build the project image `collab-testbed:latest` without any image registry.
#
#   testbed/container/build-image.sh            # build what is missing or out of date
#   testbed/container/build-image.sh --force    # rebuild the wheelhouse and the image (not the base)
#
# Phases (each prints one line with its duration):
#   1. base       `testbed-base:bookworm`, made locally when missing: debootstrap of Debian bookworm minbase
#                 (python3, python3-venv, python3-pip, ca-certificates, iproute2) from the apt mirror the
#                 host already uses, then `docker import`.
#   2. wheelhouse `.cache/wheelhouse/`: wheels for every dependency in pyproject.toml (read at run time),
#                 built on the host with the host's pip configuration, for the container's Python (3.11,
#                 linux x86_64).  torch is pinned to its CPU build (`+cpu`); the phase fails if any CUDA
#                 wheel (nvidia-*, triton) ends up in the wheelhouse.  Skipped when its stamp matches.
#   3. image      `docker build --build-arg BASE=testbed-base:bookworm -t collab-testbed:latest .`; the
#                 Dockerfile installs from the wheelhouse with `pip install --no-index --find-links`.
#                 Skipped when the image's `org.testbed.inputs-sha256` label matches the current inputs
#                 (pyproject.toml, Dockerfile, project sources, wheelhouse, base image).
#
# Environment knobs:
#   IMAGE=collab-testbed:latest  BASE_IMAGE=testbed-base:bookworm  SUITE=bookworm
#   PYTHON=python3        host interpreter used to build the wheelhouse (must match the container's X.Y)
#   DEBIAN_MIRROR=...     override the mirror taken from /etc/apt/sources.list*
#   TORCH_VARIANT=cpu     local-version suffix forced on an exact torch pin ("" to keep the pin as written);
#                         where the CPU wheel is not on the host's find-links/indexes, point pip at the
#                         PyTorch CPU wheel index with PIP_EXTRA_INDEX_URL.
#   FORCE=1               same as --force
#   LOG_DIR=/tmp          where the debootstrap and docker-build logs go
#   INSTALL_MISSING=1     0: never install system packages (Docker, debootstrap); fail instead
#   PRUNE_DEPS=1          0: leave superseded dependency-stage images alone (they are shared build cache)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

IMAGE=${IMAGE:-collab-testbed:latest}
BASE_IMAGE=${BASE_IMAGE:-testbed-base:bookworm}
SUITE=${SUITE:-bookworm}
PYTHON=${PYTHON:-python3}
TORCH_VARIANT=${TORCH_VARIANT-cpu}
WHEELHOUSE=.cache/wheelhouse
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates,iproute2
FORCE=${FORCE:-0}
LOG_DIR=${LOG_DIR:-/tmp}
INSTALL_MISSING=${INSTALL_MISSING:-1}
PRUNE_DEPS=${PRUNE_DEPS:-1}
for a in "$@"; do
    case "$a" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $a" >&2; exit 2 ;;
    esac
done

log() { printf "[build-image] %s\n" "$*"; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }
phase_done() { printf '[build-image] phase %-10s %4ds  %s\n' "$1" "$(( $(date +%s) - $2 ))" "$3"; }
T_ALL=$(date +%s)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# ---------------------------------------------------------------- docker daemon
if ! timeout 15 docker info >/dev/null 2>&1; then
    [ "$INSTALL_MISSING" = 1 ] || die "no Docker daemon answers (INSTALL_MISSING=0: not installing one)"
    log "no Docker daemon answers; running install-docker.sh"
    "$ROOT/testbed/container/install-docker.sh"
fi

# First Debian archive URI (suite not *-security / *-updates) of the host's apt configuration;
# with "security" as $1, the first *-security one.
host_debian_mirror() {
    local want=${1:-main} f
    {
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -e "$f" ] || continue
            awk -v want="$want" 'BEGIN{RS=""}
                 { uri=""; suites=""; comps="";
                   n=split($0, L, "\n");
                   for (i=1;i<=n;i++) {
                     if (L[i] ~ /^URIs:/)       { sub(/^URIs:[ \t]*/, "", L[i]); split(L[i], U, /[ \t]+/); uri=U[1] }
                     if (L[i] ~ /^Suites:/)     { suites=L[i] }
                     if (L[i] ~ /^Components:/) { comps=L[i] }
                     if (L[i] ~ /^Enabled:[ \t]*no/) { uri="" }
                   }
                   if (uri == "" || comps !~ /main/) next
                   if (want == "security" && suites ~ /-security/) print uri
                   if (want != "security" && suites !~ /-security/ && suites ~ /(bookworm|trixie|sid|stable|testing|unstable)/) print uri
                 }' "$f"
        done
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -e "$f" ] || continue
            awk -v want="$want" '$1=="deb" { i=2; if ($2 ~ /^\[/) { while (i<=NF && $i !~ /\]$/) i++; i++ }
                 uri=$i; suite=$(i+1);
                 if (want == "security" && suite ~ /-security/) print uri
                 if (want != "security" && suite !~ /-security/ && suite ~ /(bookworm|trixie|sid|stable|testing|unstable)/) print uri }' "$f"
        done
    } | head -n1
}

# ================================================================ 1. base image
T=$(date +%s)
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    phase_done base "$T" "$BASE_IMAGE exists"
else
    if ! command -v debootstrap >/dev/null 2>&1; then
        [ "$INSTALL_MISSING" = 1 ] || die "debootstrap is missing (INSTALL_MISSING=0: not installing it)"
        log "installing debootstrap"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 || {
            $SUDO apt-get update -qq
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
        }
    fi
    MIRROR=${DEBIAN_MIRROR:-$(host_debian_mirror)}
    [ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources.list*; set DEBIAN_MIRROR"
    SEC_MIRROR=$(host_debian_mirror security)
    ROOTFS=$(mktemp -d /tmp/testbed-rootfs.XXXXXX)
    cleanup_rootfs() {
        for m in proc sys dev/pts dev; do
            mountpoint -q "$ROOTFS/$m" 2>/dev/null && $SUDO umount -l "$ROOTFS/$m" || true
        done
        $SUDO rm -rf --one-file-system "$ROOTFS"
    }
    trap cleanup_rootfs EXIT
    log "debootstrap $SUITE minbase from $MIRROR into $ROOTFS"
    TD=$(date +%s)
    $SUDO debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
        > $LOG_DIR/testbed-debootstrap.log 2>&1 || { tail -n 40 $LOG_DIR/testbed-debootstrap.log >&2; die "debootstrap failed (log: $LOG_DIR/testbed-debootstrap.log)"; }
    log "debootstrap took $(( $(date +%s) - TD ))s"
    # apt sources inside the image: the same mirror the host uses
    {
        echo "deb $MIRROR $SUITE main"
        echo "deb $MIRROR $SUITE-updates main"
        [ -z "$SEC_MIRROR" ] || echo "deb $SEC_MIRROR $SUITE-security main"
    } | $SUDO tee "$ROOTFS/etc/apt/sources.list" >/dev/null
    $SUDO chroot "$ROOTFS" apt-get clean
    $SUDO rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/*.log \
        "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* \
        "$ROOTFS"/usr/share/locale/* "$ROOTFS"/usr/share/info/*
    log "importing rootfs as $BASE_IMAGE"
    $SUDO tar --numeric-owner -C "$ROOTFS" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c 'CMD ["/bin/bash"]' \
        -m "debootstrap --variant=minbase --include=$BASE_PACKAGES $SUITE" \
        - "$BASE_IMAGE" >/dev/null
    cleanup_rootfs
    trap - EXIT
    phase_done base "$T" "$BASE_IMAGE imported ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

# Python X.Y inside the base image (the wheelhouse must match it)
CONTAINER_PY=$(docker run --rm --network none --entrypoint "" "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
HOST_PY=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$CONTAINER_PY" = "$HOST_PY" ] || die "host $PYTHON is $HOST_PY but $BASE_IMAGE has Python $CONTAINER_PY; set PYTHON=python$CONTAINER_PY"
[ "$(uname -m)" = "x86_64" ] || [ "$(uname -m)" = "aarch64" ] || die "unsupported host architecture $(uname -m)"

# ================================================================ 2. wheelhouse
T=$(date +%s)
mkdir -p "$WHEELHOUSE"
REQS="$WHEELHOUSE/requirements.txt"
# requirements from pyproject.toml: [project].dependencies + [build-system].requires (to install the project
# itself offline); an exact torch pin gets the +$TORCH_VARIANT local version so the CPU build is chosen.
NEW_REQS=$("$PYTHON" - "$TORCH_VARIANT" <<'PY'
import re, sys, tomllib
variant = sys.argv[1]
with open("pyproject.toml", "rb") as f:
    data = tomllib.load(f)
reqs = list(data["project"].get("dependencies", [])) + list(data.get("build-system", {}).get("requires", []))
reqs += ["wheel"]
out = []
for r in reqs:
    m = re.fullmatch(r"\s*torch\s*==\s*([0-9][0-9A-Za-z.]*)\s*", r)
    if variant and m:
        r = f"torch=={m.group(1)}+{variant}"
    out.append(r)
print("\n".join(out))
PY
)
STAMP=$(printf '%s\n%s\n%s\n' "$NEW_REQS" "$HOST_PY" "$(uname -m)" | sha256sum | cut -c1-16)
if [ "$FORCE" != 1 ] && [ -f "$WHEELHOUSE/.stamp" ] && [ "$(cat "$WHEELHOUSE/.stamp")" = "$STAMP" ]; then
    phase_done wheelhouse "$T" "up to date ($(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1))"
else
    printf '%s\n' "$NEW_REQS" > "$REQS"
    rm -f "$WHEELHOUSE/.stamp"
    log "building wheels for: $(tr '\n' ' ' < "$REQS")"
    # `pip wheel` downloads wheels where they exist and builds the rest (sdist-only packages) into wheels, so
    # the image never needs a compiler or an index.  Wheels already in the wheelhouse are reused.
    # (the grep drops pip's noise about configured find-links entries that are not directories)
    set +o pipefail
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELHOUSE" --find-links "$WHEELHOUSE" -r "$REQS" 2>&1 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2
    rc=${PIPESTATUS[0]}
    set -o pipefail
    [ "$rc" -eq 0 ] || die "pip wheel failed (for the CPU torch wheel, PIP_EXTRA_INDEX_URL may need the PyTorch CPU index)"
    # resolve offline against the wheelhouse alone: proves it is complete, and lists what is needed
    REPORT=$(mktemp)
    "$PYTHON" -m pip install --quiet --dry-run --ignore-installed --no-index --find-links "$WHEELHOUSE" \
        --report "$REPORT" -r "$REQS" || die "the wheelhouse does not satisfy $REQS offline"
    # prune wheels the current requirements no longer need (older versions, removed dependencies)
    "$PYTHON" - "$REPORT" "$WHEELHOUSE" <<'PY'
import json, os, sys, urllib.parse, urllib.request
report, wh = sys.argv[1], sys.argv[2]
keep = set()
for item in json.load(open(report))["install"]:
    url = item["download_info"]["url"]
    keep.add(os.path.basename(urllib.request.url2pathname(urllib.parse.urlparse(url).path)))
bad = sorted(k for k in keep if k.lower().startswith(("nvidia_", "nvidia-", "triton-", "triton_")))
torch = [k for k in keep if k.startswith("torch-")]
if bad:
    sys.exit("CUDA wheels in the wheelhouse (torch is not the CPU build?): " + ", ".join(bad))
print("[build-image] torch wheel: " + (", ".join(torch) or "none"), file=sys.stderr)
for name in os.listdir(wh):
    if name.endswith(".whl") and name not in keep:
        os.remove(os.path.join(wh, name))
        print(f"[build-image] pruned {name}", file=sys.stderr)
PY
    rm -f "$REPORT"
    echo "$STAMP" > "$WHEELHOUSE/.stamp"
    phase_done wheelhouse "$T" "$(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
fi

# ================================================================ 3. project image
T=$(date +%s)
PYPROJECT_SHA=$(sha256sum pyproject.toml | cut -d' ' -f1)
BASE_ID=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")
INPUTS_SHA=$(
    {
        echo "base $BASE_ID"
        echo "wheelhouse $(cat "$WHEELHOUSE/.stamp")"
        inputs=()
        for p in Dockerfile .dockerignore pyproject.toml README.md testbed parties attacks scenarios; do
            [ -e "$p" ] && inputs+=("$p")
        done
        find "${inputs[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 -r sha256sum
    } | sha256sum | cut -d' ' -f1
)
CURRENT=$(docker image inspect -f '{{index .Config.Labels "org.testbed.inputs-sha256"}}' "$IMAGE" 2>/dev/null || true)
if [ "$FORCE" != 1 ] && [ "$CURRENT" = "$INPUTS_SHA" ]; then
    phase_done image "$T" "$IMAGE up to date"
else
    # BuildKit when the buildx plugin is there; otherwise the classic builder (the Dockerfile needs neither
    # BuildKit-only syntax nor a registry-hosted frontend).
    if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi
    log "docker build (DOCKER_BUILDKIT=$DOCKER_BUILDKIT) -> $IMAGE"
    docker build --build-arg BASE="$BASE_IMAGE" \
        --label "org.testbed.inputs-sha256=$INPUTS_SHA" \
        --label "org.testbed.pyproject-sha256=$PYPROJECT_SHA" \
        --label "org.testbed.image=$IMAGE" \
        -t "$IMAGE" . > $LOG_DIR/testbed-docker-build.log 2>&1 \
        || { tail -n 40 $LOG_DIR/testbed-docker-build.log >&2; die "docker build failed (log: $LOG_DIR/testbed-docker-build.log)"; }
    # drop superseded images: this tag's old project images, and dependency stages (kept as build cache)
    # except the newest
    docker image prune -f --filter "label=org.testbed.image=$IMAGE" >/dev/null 2>&1 || true
    if [ "$PRUNE_DEPS" = 1 ]; then
        docker images -q --filter dangling=true --filter label=org.testbed.stage=deps | tail -n +2 \
            | xargs -r docker rmi >/dev/null 2>&1 || true
    fi
    phase_done image "$T" "$IMAGE built ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"
fi
printf '[build-image] total      %4ds\n' "$(( $(date +%s) - T_ALL ))"
