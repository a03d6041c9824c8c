#!/usr/bin/env bash
# Prepare and start nginx in front of chargers, checking revocation with chargepki (see
# nginx.conf.template): a server certificate for nginx from the hierarchy, the client CA file,
# the CRL bundle, the rendered configuration; then nginx in the foreground.
#
# Usage: examples/nginx/run.sh WORKDIR
# Environment (defaults in brackets):
#   CHARGEPKI      the chargepki command [chargepki]; CHARGEPKI_HOME as for every command
#   ORG            the organisation of the hierarchy [Acme Charging]
#   ENVIRONMENT    which hierarchy [production]
#   OCSP_URL       chargepki's OCSP responder [http://127.0.0.1:8081/ocsp]
#   PORT_OCSP      nginx port for option A [8443];  PORT_CRL  for option B [8444]
#   NGINX          the nginx binary [nginx]
set -euo pipefail
work=$(realpath -m "${1:?usage: run.sh WORKDIR}")
here=$(dirname "$(realpath "$0")")
export WORK=$work PKI=$work/pki
export ENVIRONMENT=${ENVIRONMENT:-production} OCSP_URL=${OCSP_URL:-http://127.0.0.1:8081/ocsp}
export PORT_OCSP=${PORT_OCSP:-8443} PORT_CRL=${PORT_CRL:-8444}
chargepki=${CHARGEPKI:-chargepki} org=${ORG:-Acme Charging} nginx=${NGINX:-nginx}
mkdir -p "$work/tmp"
umask 077

# nginx's TLS key is an ordinary server key (not a CA key), generated here for nginx alone.
if [ ! -s "$work/server.key" ]; then
    openssl ecparam -genkey -name prime256v1 -noout -out "$work/server.key"
fi
openssl req -new -key "$work/server.key" -subj "/O=$org/CN=localhost" \
    -addext "subjectAltName=DNS:localhost" -out "$work/server.csr"
$chargepki issue --profile csms-server --environment "$ENVIRONMENT" --csr "$work/server.csr" --out "$work/server.pem"

# `ca chain` prints the issuing CA, then the root.
$chargepki ca chain --environment "$ENVIRONMENT" > "$work/client-ca.pem"
awk '/BEGIN CERT/{n++} n==1' "$work/client-ca.pem" | cat "$work/server.pem" - > "$work/server-chain.pem"

$chargepki crl publish --dir "$PKI" > /dev/null
sed -e "s|\${WORK}|$WORK|g" -e "s|\${PKI}|$PKI|g" -e "s|\${ENVIRONMENT}|$ENVIRONMENT|g" \
    -e "s|\${OCSP_URL}|$OCSP_URL|g" -e "s|\${PORT_OCSP}|$PORT_OCSP|g" -e "s|\${PORT_CRL}|$PORT_CRL|g" \
    "$here/nginx.conf.template" > "$work/nginx.conf"
"$nginx" -t -q -e "$work/error.log" -p "$work" -c "$work/nginx.conf"
echo "nginx: OCSP-checked on https://localhost:$PORT_OCSP, CRL-checked on https://localhost:$PORT_CRL"
exec "$nginx" -e "$work/error.log" -p "$work" -c "$work/nginx.conf" -g "daemon off;"
