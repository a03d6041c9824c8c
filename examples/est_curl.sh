#!/usr/bin/env bash
# The whole EST (RFC 7030) flow with nothing but curl and openssl:
#   1. fetch the CA certificates, 2. enroll with a one-time secret, 3. re-enroll with the
#   issued certificate (mutual TLS), 4. verify both certificates against the root.
#
# Usage: examples/est_curl.sh BASE_URL ROOT_PEM SERIAL SECRET ORGANISATION [WORKDIR]
#   BASE_URL  e.g. https://localhost:8443/.well-known/est (or …/est/<label>)
#   ROOT_PEM  the trust anchor: `chargepki ca chain --ca production-root-1 > root.pem`
#   SERIAL    a registered device (`chargepki device add SERIAL`)
#   SECRET    its one-time secret (`chargepki token issue SERIAL`)
set -euo pipefail
base=$1 root=$2 serial=$3 secret=$4 org=$5 work=${6:-$(mktemp -d)}
cd "$work"

echo "1. cacerts"
curl -sSf --cacert "$root" "$base/cacerts" | base64 -d | openssl pkcs7 -inform DER -print_certs -out chain.pem
grep -c "BEGIN CERTIFICATE" chain.pem | xargs echo "   certificates in the chain:"

echo "2. simpleenroll as $serial (HTTP Basic with the one-time secret)"
openssl ecparam -genkey -name prime256v1 -noout -out device.key
openssl req -new -key device.key -subj "/O=$org/CN=$serial" -outform DER | base64 > device.csr.b64
curl -sSf --cacert "$root" --user "$serial:$secret" -H "Content-Type: application/pkcs10" \
     --data-binary @device.csr.b64 "$base/simpleenroll" | base64 -d > device.p7
openssl pkcs7 -inform DER -in device.p7 -print_certs -out device.pem
openssl verify -CAfile "$root" -untrusted chain.pem -purpose sslclient device.pem

echo "3. simplereenroll with the issued certificate as TLS client certificate (same key: a renewal)"
curl -sSf --cacert "$root" --cert device.pem --key device.key -H "Content-Type: application/pkcs10" \
     --data-binary @device.csr.b64 "$base/simplereenroll" | base64 -d > renewed.p7
openssl pkcs7 -inform DER -in renewed.p7 -print_certs -out renewed.pem
openssl verify -CAfile "$root" -untrusted chain.pem -purpose sslclient renewed.pem
openssl x509 -in renewed.pem -noout -subject -serial -enddate | sed 's/^/   /'
echo "done: files in $work"
