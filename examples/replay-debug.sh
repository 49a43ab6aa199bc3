#!/usr/bin/env bash
# A debugging session: what happened to a device, event by event, and its state at any
# point, from the running server and offline from the data directory.
source "$(dirname "$0")/lib.sh"

# Snapshots every 4 transitions, so replays start from a snapshot and apply a short tail.
start_server --snapshot-every 4

step "a thermostat and some history"
run "$DROVER" provision hall --plugin thermostat --config '{"setpoint": 21, "hysteresis": 0.5}'
for c in 19.8 20.3 20.9 21.6 21.2 20.4 19.9; do
    "$DROVER" send hall "{\"type\":\"reading\",\"celsius\":$c}"
done
run "$DROVER" send hall '{"type":"set_point","celsius":19}'

step "the journal, three records a page"
run "$DROVER" journal hall --limit 3
run "$DROVER" journal hall --from 4 --limit 3

step "when did the heating go off? the state right after seq 4, and now"
run "$DROVER" state hall --at 4
run "$DROVER" state hall

step "offline, from the data directory (beside the running server)"
run "$DROVER" replay hall --data "$DATA" --to 4
run "$DROVER" replay hall --data "$DATA"
run "$DROVER" replay hall --data "$DATA" --genesis
