#!/usr/bin/env bash
# Changing a plugin while its devices run: write one with `drover new`, push it, give a
# device some history, change the behavior, see the difference on that history with a
# dry-run, deploy it (state kept), and roll back.
source "$(dirname "$0")/lib.sh"

start_server

step "a new plugin crate, built for wasm32-wasip2"
(cd "$WORK" && run "$DROVER" new sensor)
cd "$WORK/sensor"
run cargo build --quiet --release --target wasm32-wasip2
WASM="$WORK/sensor/target/wasm32-wasip2/release/sensor.wasm"

step "version 1, a device, some history"
run "$DROVER" plugin push sensor "$WASM"
run "$DROVER" provision s-1 --plugin sensor --config '{"threshold": 30}'
for v in 12 29 31 28; do
    "$DROVER" send s-1 "{\"type\":\"reading\",\"value\":$v}"
done
run "$DROVER" state s-1

step "version 2: the alarm needs 5 degrees more; uploading it changes nothing yet"
sed -i 's/let high = value > self.threshold;/let high = value > self.threshold + 5.0;/' src/lib.rs
run cargo build --quiet --release --target wasm32-wasip2
run "$DROVER" plugin push sensor "$WASM"
run "$DROVER" plugin list

step "what would version 2 have decided on s-1's recorded events?"
run "$DROVER" plugin diff sensor 2

step "deploy: s-1's journal is replayed into version 2, its state kept"
run "$DROVER" plugin deploy sensor 2
run "$DROVER" send s-1 '{"type":"reading","value":33}'
run "$DROVER" state s-1

step "and back"
run "$DROVER" plugin rollback sensor
run "$DROVER" devices
