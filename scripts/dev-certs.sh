#!/usr/bin/env bash
# Makes a local CA and certificates for Shoal's services, etcd and an operator, for dev-up, the
# examples in docs/security.md and local testing. Not for production: use cert-manager
# (deploy/k8s/components/cert-manager) or your own PKI there.
#
# Usage: scripts/dev-certs.sh [DIR]        (default: ./certs; existing files are kept)
#
# Writes DIR/ca.crt and DIR/ca.key, and for each of metrics, decider, provisioner, reconciler,
# etcd and operator: DIR/<name>.crt and DIR/<name>.key. Each certificate's identity (its first
# DNS name) is shoal-<name> (operator: shoal-operator); every one is also valid for localhost,
# 127.0.0.1 and its in-cluster Service names, for both server and client authentication.
set -euo pipefail
dir="${1:-certs}"
mkdir -p "$dir"
cd "$dir"
command -v openssl >/dev/null || { echo "dev-certs: openssl is required (apt-get install openssl)" >&2; exit 1; }

if [ ! -f ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=Shoal development CA" -keyout ca.key -out ca.crt 2>/dev/null
  chmod 600 ca.key
fi

issue() {
  local name="$1" identity="shoal-$1"
  [ -f "$name.crt" ] && return 0
  local ext
  ext="$(mktemp)"
  cat >"$ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:$identity,DNS:localhost,DNS:$identity.shoal,DNS:$identity.shoal.svc,DNS:$identity.shoal.svc.cluster.local,IP:127.0.0.1
EOF
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$identity" \
    -keyout "$name.key" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 397 \
    -extfile "$ext" -out "$name.crt" 2>/dev/null
  chmod 600 "$name.key"
  rm -f "$name.csr" "$ext"
}

for name in metrics decider provisioner reconciler etcd operator; do
  issue "$name"
done
echo "dev-certs: CA and certificates in $(pwd)"
