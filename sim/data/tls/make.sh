#!/usr/bin/env bash
# Makes the simulator's TLS credentials (docs/tls.md K11): an Ed25519 CA, a server certificate
# for the name replica.sim and a client certificate, valid 2020-2100 because the simulated clock
# starts in 2022. Ed25519 signatures are deterministic and of one size, so a handshake's bytes
# do not vary between runs of a seed. Run from this directory; the PEM files are committed.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
openssl genpkey -algorithm ed25519 -out ca-key.pem
openssl req -x509 -new -key ca-key.pem -out ca-cert.pem -subj "/CN=ballot-sim CA" -days 3650 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
cat > "$work/ca.cnf" <<CNF
[ca]
default_ca = d
[d]
database = $work/index.txt
new_certs_dir = $work
serial = $work/serial
default_md = default
policy = p
[p]
commonName = supplied
CNF
: > "$work/index.txt"
echo 1000 > "$work/serial"
for who in server client; do
    openssl genpkey -algorithm ed25519 -out "$who-key.pem"
    openssl req -new -key "$who-key.pem" -out "$work/$who.csr" -subj "/CN=$who"
    if [ "$who" = server ]; then
        printf 'subjectAltName=DNS:replica.sim\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n' > "$work/$who.ext"
    else
        printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n' > "$work/$who.ext"
    fi
    openssl ca -batch -notext -config "$work/ca.cnf" -cert ca-cert.pem -keyfile ca-key.pem \
        -startdate 20200101000000Z -enddate 21000101000000Z -extfile "$work/$who.ext" \
        -in "$work/$who.csr" -out "$who-cert.pem" 2>/dev/null
done
rm -f ca-key.pem
