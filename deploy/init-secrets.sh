#!/bin/sh
# The compose stack's secrets, made once: run by the one-shot service `secrets-init`
# (deploy/docker-compose.yml) before anything else starts, as
#
#   init-secrets.sh SECRETS_DIR [NATS_DATA_DIR...]
#
# - SECRETS_DIR/nats/: one NATS identity per process (`tierflow nats-auth generate`:
#   admin, observer, registry, autoscaler, supervisor, router-r0, node-prefill-0,
#   node-decode-0, node-decode-1) and nats-auth.conf, the servers' `authorization` block.
#   Run again, it keeps every identity and adds missing ones.
# - SECRETS_DIR/router.yaml: the router's tenants, one tenant `default` whose API key is
#   stored only as a salted hash; the key itself goes to SECRETS_DIR/api-key, once (an
#   existing router.yaml is never touched: edit it to add tenants or rotate keys).
#
# Ownership: every container of the stack runs as uid 10001 (the tierflow image's user;
# NATS is told to), and each is given only its own files, so the NATS files become
# 10001's (mode 0600), as do the NATS data volumes. api-key goes to whoever owns
# SECRETS_DIR on the host (the person who cloned the repository), so they can read it.
# Root is needed for that (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, nothing else); run
# as another user it writes the files and leaves ownership alone.
set -eu

secrets=${1:?usage: init-secrets.sh SECRETS_DIR [NATS_DATA_DIR...]}
shift
uid=10001

mkdir -p "$secrets"
tierflow nats-auth generate --out "$secrets/nats" >/dev/null

if [ ! -s "$secrets/router.yaml" ]; then
  umask 077
  # `tierflow keys new` prints the key alone on its first line and its api_keys entry
  # (`      - sha256:<salt>:<digest>`) on a line of its own, between comment lines.
  tierflow keys new --tenant default > "$secrets/.new-key"
  head -n 1 "$secrets/.new-key" > "$secrets/api-key"
  {
    echo "# The router's tenants (deploy/init-secrets.sh made it; services/router/config.py reads it)."
    echo "# Add a tenant or rotate a key with the lines \`tierflow keys new --tenant NAME\` prints."
    echo "tenants:"
    echo "  - name: default"
    echo "    api_keys:"
    grep -E '^[[:space:]]*-[[:space:]]+sha256:' "$secrets/.new-key" | sed -E 's/^[[:space:]]*-[[:space:]]+/      - /'
  } > "$secrets/.router.yaml"
  rm -f "$secrets/.new-key"
  if ! grep -q 'sha256:' "$secrets/.router.yaml"; then
    rm -f "$secrets/.router.yaml" "$secrets/api-key"
    echo "init-secrets: no api_keys entry in the output of \`tierflow keys new\`" >&2
    exit 1
  fi
  chmod 0644 "$secrets/.router.yaml"  # hashes only; the router (uid 10001) reads it
  mv "$secrets/.router.yaml" "$secrets/router.yaml"
  echo "init-secrets: a new API key for tenant 'default' is in $secrets/api-key"
fi

if [ "$(id -u)" = 0 ]; then
  chown -R "$uid:$uid" "$secrets/nats"
  chown "$(stat -c %u:%g "$secrets")" "$secrets/api-key" 2>/dev/null || true
  for data in "$@"; do
    chown -R "$uid:$uid" "$data"
  done
fi
