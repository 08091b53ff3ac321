#!/usr/bin/env bash
# Install (if missing) and start (if not answering) a Docker engine with Compose v2.
#
#   sudo testbed/container/install-docker.sh
#
# Idempotent and fast when everything is already there.  On a Debian/Ubuntu host:
#   * engine: Debian's `docker.io` package (dockerd, containerd, runc) from the host's own apt sources;
#   * Compose v2: Debian's `docker-compose` package from the *trixie* suite (bookworm only has Compose v1);
#     it depends only on libc6 >= 2.34 and is fetched with a throw-away apt configuration pointing at the
#     mirror the host already uses, so the host's apt sources are not modified;
#   * daemon: started through systemd when that is PID 1, otherwise `dockerd` in the background with its log
#     in /var/log/dockerd.log.
# Environment knobs:
#   DOCKERD_WAIT=60            seconds to wait for the daemon to answer
#   DOCKERD_LOG=/var/log/dockerd.log
#   COMPOSE_SUITE=trixie       Debian suite to take docker-compose (v2) from
set -euo pipefail

DOCKERD_WAIT=${DOCKERD_WAIT:-60}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
COMPOSE_SUITE=${COMPOSE_SUITE:-trixie}
export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-docker] %s\n' "$*" >&2; }
die() { printf '[install-docker] ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "must run as root (or with sudo available)"
    SUDO="sudo"
fi

daemon_ok() { timeout 15 docker info >/dev/null 2>&1; }
compose_ok() { timeout 15 docker compose version >/dev/null 2>&1; }

# ---------------------------------------------------------------- fast path
if command -v docker >/dev/null 2>&1 && daemon_ok && compose_ok; then
    log "docker daemon answers; $(docker compose version 2>/dev/null | head -n1)"
    exit 0
fi

# Print the first Debian archive URI (not -security) the host's apt configuration uses.
host_debian_mirror() {
    local f
    {
        # deb822 *.sources files: take URIs of stanzas whose Suites do not end in -security
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -e "$f" ] || continue
            awk 'BEGIN{RS=""}
                 {
                   uri=""; suites=""; comps="";
                   n=split($0, L, "\n");
                   for (i=1;i<=n;i++) {
                     if (L[i] ~ /^URIs:/)       { sub(/^URIs:[ \t]*/, "", L[i]); split(L[i], U, /[ \t]+/); uri=U[1] }
                     if (L[i] ~ /^Suites:/)     { suites=L[i] }
                     if (L[i] ~ /^Components:/) { comps=L[i] }
                     if (L[i] ~ /^Enabled:[ \t]*no/) { uri="" }
                   }
                   if (uri != "" && suites !~ /-security/ && comps ~ /main/ && suites ~ /(bookworm|trixie|sid|stable|testing|unstable)/) print uri
                 }' "$f"
        done
        # one-line format
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -e "$f" ] || continue
            awk '$1=="deb" { i=2; if ($2 ~ /^\[/) { while (i<=NF && $i !~ /\]$/) i++; i++ }
                             uri=$i; suite=$(i+1);
                             if (suite !~ /-security/ && suite ~ /(bookworm|trixie|sid|stable|testing|unstable)/) print uri }' "$f"
        done
    } | head -n1
}

# ---------------------------------------------------------------- engine
if ! command -v dockerd >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "no dockerd and no apt-get: install the Docker engine by hand"
    log "installing docker.io from the host's apt sources"
    t0=$(date +%s)
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends docker.io iptables ca-certificates >/dev/null
    log "docker.io installed in $(( $(date +%s) - t0 ))s"
fi
command -v docker >/dev/null 2>&1 || die "docker.io installed but no docker client on PATH"

# ---------------------------------------------------------------- compose v2
if ! compose_ok; then
    command -v apt-get >/dev/null 2>&1 || die "no 'docker compose' and no apt-get: install Compose v2 by hand"
    log "installing Compose v2 (docker-compose from Debian ${COMPOSE_SUITE})"
    t0=$(date +%s)
    if apt-cache policy docker-compose 2>/dev/null | grep -Eq 'Candidate: 2\.'; then
        # the host's own sources already offer Compose v2 (e.g. trixie hosts)
        $SUDO apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
    else
        mirror=$(host_debian_mirror)
        [ -n "$mirror" ] || die "cannot find a Debian mirror in /etc/apt/sources.list*"
        keyring=/usr/share/keyrings/debian-archive-keyring.gpg
        [ -r "$keyring" ] || die "missing $keyring (apt-get install debian-archive-keyring)"
        work=$(mktemp -d /tmp/compose-apt.XXXXXX)
        trap 'rm -rf "$work"' EXIT
        mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/parts"
        echo "deb [signed-by=$keyring] $mirror $COMPOSE_SUITE main" > "$work/sources.list"
        aptopts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts"
                 -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
                 -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
                 -o "APT::Get::List-Cleanup=0" -o "Dir::Etc::Preferences=/dev/null"
                 -o "Dir::Etc::PreferencesParts=$work/parts"
                 -o "APT::Sandbox::User=root")
        $SUDO apt-get "${aptopts[@]}" update -qq
        (cd "$work" && $SUDO apt-get "${aptopts[@]}" download docker-compose >/dev/null)
        deb=$(ls "$work"/docker-compose_*.deb 2>/dev/null | head -n1)
        [ -n "$deb" ] || die "could not download docker-compose from $COMPOSE_SUITE"
        log "dependencies of $(basename "$deb"): $(dpkg-deb -f "$deb" Depends)"
        $SUDO dpkg -i "$deb" >/dev/null
        # hold it so that a later `apt-get upgrade` on the bookworm sources does not downgrade to v1
        $SUDO apt-mark hold docker-compose >/dev/null 2>&1 || true
    fi
    # the docker CLI finds plugins in /usr/libexec/docker/cli-plugins and /usr/lib/docker/cli-plugins;
    # make sure a CLI that does not look there (or a plain `docker-compose` call) still finds it
    if ! compose_ok; then
        for p in /usr/libexec/docker/cli-plugins/docker-compose /usr/lib/docker/cli-plugins/docker-compose /usr/bin/docker-compose; do
            if [ -x "$p" ] && "$p" version 2>/dev/null | grep -q 'v2\|version 2'; then
                $SUDO mkdir -p /usr/local/lib/docker/cli-plugins
                $SUDO ln -sf "$p" /usr/local/lib/docker/cli-plugins/docker-compose
                break
            fi
        done
    fi
    log "Compose step took $(( $(date +%s) - t0 ))s"
fi

# ---------------------------------------------------------------- daemon
if ! daemon_ok; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        log "starting docker via systemd"
        $SUDO systemctl start docker || true
    fi
fi
if ! daemon_ok; then
    if pgrep -x dockerd >/dev/null 2>&1; then
        log "dockerd is running but not answering yet; waiting"
    else
        log "starting dockerd in the background (log: $DOCKERD_LOG)"
        $SUDO mkdir -p "$(dirname "$DOCKERD_LOG")"
        # setsid + nohup: the daemon survives this script and the calling shell
        $SUDO setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    waited=0
    until daemon_ok; do
        if [ "$waited" -ge "$DOCKERD_WAIT" ]; then
            log "last lines of $DOCKERD_LOG:"
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            die "Docker daemon did not answer within ${DOCKERD_WAIT}s (see $DOCKERD_LOG)"
        fi
        sleep 1; waited=$((waited + 1))
    done
    log "daemon answers after ${waited}s"
fi

compose_ok || die "'docker compose version' fails after installation"
log "$(docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}' 2>/dev/null); $(docker compose version | head -n1)"
