#!/bin/sh
# A Pillion sidecar in its app's network namespace (compose: network_mode "service:<app>").
#
# The container's address is given out by the compose network, so it is looked up here (the
# source address of the route to the control server; a UDP connect sends nothing) and reported
# with --instance-ip; the control server registers the workload in WORKLOAD_GROUP at it.
# Environment: APP, VERSION, SERVICE_ACCOUNT, WORKLOAD_GROUP; optional PILLION_XDS, LOG_LEVEL.
set -eu
xds="${PILLION_XDS:-control:15010}"
ip=$(python3 -c 'import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, int(port)))
print(s.getsockname()[0])' "$xds")
exec pillion proxy --xds "$xds" --token-file "/var/run/pillion/tokens/$SERVICE_ACCOUNT" --intercept \
    --instance-ip "$ip" --workload-group "$WORKLOAD_GROUP" --name "$WORKLOAD_GROUP" \
    --labels "app=$APP,version=$VERSION" --service-account "$SERVICE_ACCOUNT" \
    --status-port 15021 --prometheus-port 15090 --log-level "${LOG_LEVEL:-info}"
