#!/usr/bin/env bash
# A simulated fleet: 300 thermostats and door locks streaming 2,000 events/s for 10 s,
# then a look at one device of each kind.
source "$(dirname "$0")/lib.sh"

start_server

step "the fleet: 300 devices, 2,000 events/s, 10 s"
run "$DROVER" sim --devices 300 --rate 2000 --duration 10 --concurrency 64

step "a thermostat"
run "$DROVER" state sim-000000
run curl -sSf "$URL/v1/devices/sim-000000/journal?from=1&limit=3"
echo

step "a door lock"
run "$DROVER" send sim-000001 '{"type":"unlock","code":"4711"}'
run "$DROVER" state sim-000001

step "what the server counted"
run bash -c "set -o pipefail; curl -sSf $URL/metrics | grep -E '^drover_(events_total|live_actors|devices|journal_commits) '"
