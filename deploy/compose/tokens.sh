#!/bin/sh
# One-shot, as root, before the control server starts: create the CA state directory's token key
# (`pillion control token` creates it if missing; the control server then uses it and adds its
# root CA) and mint one bootstrap token per service account into the tokens volume. Both volumes
# are then handed to uid 1337, the image's user, which runs the control server and the sidecars.
set -eu
state=/var/lib/pillion/ca
out=/var/run/pillion/tokens
for sa in bookinfo-productpage bookinfo-details bookinfo-reviews bookinfo-ratings; do
    pillion control token --state-dir "$state" --namespace default --service-account "$sa" --out "$out/$sa"
done
chown -R 1337:1337 "$state" "$out"
chmod 0700 "$state"
echo "minted tokens for 4 service accounts"
