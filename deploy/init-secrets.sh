#!/bin/sh
# The deployment's secrets, made once: run by compose's one-shot service `secrets-init`
# before anything else starts, and by hand before `kubectl apply -k deploy/`:
#
#   init-secrets.sh SECRETS_DIR [NATS_DATA_DIR...]
#   TIERFLOW_TLS=1 init-secrets.sh SECRETS_DIR ...     (also the TLS files, see below)
#
# - SECRETS_DIR/nats/: one NATS identity per process (`tierflow nats-auth generate`) and
#   nats-auth.conf, the servers' `authorization` block. Compose's: admin, observer,
#   registry, autoscaler, supervisor, router-r0, node-prefill-0, node-decode-0,
#   node-decode-1. Kubernetes' (deploy/k8s), whose routers and node pools are StatefulSets
#   and each pod's id its pod name: router-router-0 .. (ROUTERS), and one node identity per
#   ordinal a pool may reach, node-tierflow-default-decode-0 .. (POOLS: NAME=MAX_REPLICAS;
#   keep them in step with examples/fleet.yaml's max_replicas; tests/deploy checks it).
#   Run again, it keeps every identity and adds missing ones (raise a pool's count, run it
#   again, re-apply: the pool's Secret gains the new ordinals).
# - With TIERFLOW_TLS=1: SECRETS_DIR/tls/ (`tierflow tls generate`): ca.pem (+ ca-key.pem,
#   never mounted), server.pem/server-key.pem for every service and NATS server, named for
#   every host below plus TIERFLOW_TLS_HOSTS (space-separated: the names clients reach the
#   router by), client.pem/client-key.pem for the CLI; and SECRETS_DIR/tls/kustomization.yaml,
#   the Secret `tierflow-tls` that deploy-tls adds. Used by
#   docker-compose.tls.yml and deploy-tls.
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

# Kubernetes: the router StatefulSet's pods, and NAME=MAX_REPLICAS per node pool StatefulSet.
ROUTERS=${ROUTERS:-"router-0 router-1"}
POOLS=${POOLS:-"tierflow-default-decode=4 tierflow-default-prefill=1"}

flags="--router r0 --node prefill-0 --node decode-0 --node decode-1"
for r in $ROUTERS; do flags="$flags --router $r"; done
for p in $POOLS; do flags="$flags --pool $p"; done
# shellcheck disable=SC2086  # word splitting wanted: ids are subject tokens, no spaces
tierflow nats-auth generate --out "$secrets/nats" $flags >/dev/null

if [ "${TIERFLOW_TLS:-0}" = 1 ]; then
  # Every name a service or NATS server is reached by, in compose and in Kubernetes
  # (namespace tierflow): NATS clients, the routes between NATS servers, router, registry.
  hosts="nats nats-1 nats-2 nats-3 nats-1-routes nats-2-routes nats-3-routes router model-registry"
  hosts="$hosts nats.tierflow nats.tierflow.svc nats.tierflow.svc.cluster.local"
  for i in 0 1 2; do
    hosts="$hosts nats-$i.nats-headless nats-$i.nats-headless.tierflow.svc nats-$i.nats-headless.tierflow.svc.cluster.local"
  done
  hosts="$hosts router.tierflow router.tierflow.svc router.tierflow.svc.cluster.local"
  hosts="$hosts model-registry.tierflow model-registry.tierflow.svc model-registry.tierflow.svc.cluster.local"
  host_flags=""
  for h in $hosts ${TIERFLOW_TLS_HOSTS:-}; do host_flags="$host_flags --host $h"; done
  # shellcheck disable=SC2086
  tierflow tls generate --out "$secrets/tls" $host_flags >/dev/null
  {
    echo "# The Secret deploy-tls mounts in every pod (deploy/init-secrets.sh made it)."
    echo "# The CA's key (ca-key.pem) stays here: no pod gets it."
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "secretGenerator:"
    echo "  - name: tierflow-tls"
    echo "    files: [ca.pem, server.pem, server-key.pem, client.pem, client-key.pem]"
  } > "$secrets/tls/kustomization.yaml"
fi

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
  if [ -d "$secrets/tls" ]; then
    chown -R "$uid:$uid" "$secrets/tls"
  fi
  chown "$(stat -c %u:%g "$secrets")" "$secrets/api-key" 2>/dev/null || true
  for data in "$@"; do
    chown -R "$uid:$uid" "$data"
  done
fi
