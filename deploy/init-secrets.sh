#!/bin/sh
# The deployment's secrets, made once: run by compose's one-shot service `secrets-init`
# before anything else starts, and by hand before `kubectl apply -k deploy/`:
#
#   init-secrets.sh SECRETS_DIR [NATS_DATA_DIR...]
#
# - SECRETS_DIR/nats/: one NATS identity per process (`tierflow nats-auth generate`:
#   admin, observer, registry, autoscaler, supervisor, router-r0, node-prefill-0,
#   node-decode-0, node-decode-1) and nats-auth.conf, the servers' `authorization` block.
#   Run again, it keeps every identity and adds missing ones.
# - SECRETS_DIR/router.yaml: the router's tenants, one tenant `default` whose API key is
#   stored only as a salted hash; the key itself goes to SECRETS_DIR/api-key.
# - SECRETS_DIR/admin.token: the registry's admin token (Apply, SetTraffic, rollouts), and
#   admin-token.hash, its salted hash (what the Kubernetes registry is given).
# Existing files are never touched (edit router.yaml to add tenants or rotate keys).
#
# Ownership: every container of the compose stack runs as uid 10001 (the tierflow image's
# user; NATS is told to) and is given only its own files, so the NATS files, the admin
# token and the NATS data volumes become 10001's; api-key goes to whoever owns SECRETS_DIR
# on the host (the person who cloned the repository), so they can read it. That needs
# root (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, nothing else); run as another user, as
# for Kubernetes, it writes the files and leaves ownership alone.
set -eu

secrets=${1:?usage: init-secrets.sh SECRETS_DIR [NATS_DATA_DIR...]}
shift
uid=10001

mkdir -p "$secrets"
umask 077

# new_key KEY_FILE HASH_FILE [tierflow keys new options]: a fresh random key (0600) and its
# salted hash. `tierflow keys new` prints the key alone on its first line and its api_keys
# entry (`      - sha256:<salt>:<digest>`) on a line of its own, between comment lines.
new_key() {
  key_file=$1 hash_file=$2
  shift 2
  tierflow keys new "$@" > "$secrets/.new-key"
  head -n 1 "$secrets/.new-key" > "$key_file"
  grep -E '^[[:space:]]*-[[:space:]]+sha256:' "$secrets/.new-key" | sed -E 's/^[[:space:]]*-[[:space:]]+//' > "$hash_file" || true
  rm -f "$secrets/.new-key"
  if [ ! -s "$key_file" ] || ! grep -q '^sha256:' "$hash_file"; then
    rm -f "$key_file" "$hash_file"
    echo "init-secrets: no key and hash in the output of \`tierflow keys new\`" >&2
    exit 1
  fi
  chmod 0644 "$hash_file"  # a salted hash is no secret
}

tierflow nats-auth generate --out "$secrets/nats" >/dev/null

if [ ! -s "$secrets/router.yaml" ]; then
  new_key "$secrets/api-key" "$secrets/.api-key.hash" --tenant default
  {
    echo "# The router's tenants (deploy/init-secrets.sh made it; services/router/config.py reads it)."
    echo "# Add a tenant or rotate a key with the lines \`tierflow keys new --tenant NAME\` prints."
    echo "tenants:"
    echo "  - name: default"
    echo "    api_keys:"
    echo "      - $(cat "$secrets/.api-key.hash")"
  } > "$secrets/.router.yaml"
  rm -f "$secrets/.api-key.hash"
  chmod 0644 "$secrets/.router.yaml"  # hashes only; the router (uid 10001) reads it
  mv "$secrets/.router.yaml" "$secrets/router.yaml"
  echo "init-secrets: a new API key for tenant 'default' is in $secrets/api-key"
fi

if [ ! -s "$secrets/admin.token" ] || [ ! -s "$secrets/admin-token.hash" ]; then
  new_key "$secrets/admin.token" "$secrets/admin-token.hash"
fi

if [ "$(id -u)" = 0 ]; then
  chown -R "$uid:$uid" "$secrets/nats" "$secrets/admin.token"
  chown "$(stat -c %u:%g "$secrets")" "$secrets/api-key" 2>/dev/null || true
  for data in "$@"; do
    chown -R "$uid:$uid" "$data"
  done
fi
