#!/usr/bin/env bash
# A plugin with a bug: the events it fails on are answered with the error and kept as dead
# letters, the device is quarantined after three failures in a row (reads still answer its
# last state and say why), and an operator resumes it once the cause is known.
source "$(dirname "$0")/lib.sh"

start_server

step "a plugin crate whose version 1 panics on a negative reading"
(cd "$WORK" && run "$DROVER" new sensor)
cd "$WORK/sensor"
sed -i 's/let high = value > self.threshold;/assert!(value >= 0.0, "negative reading {value}");\n                let high = value > self.threshold;/' src/lib.rs
grep -q 'negative reading' src/lib.rs
run cargo build --quiet --release --target wasm32-wasip2
run "$DROVER" plugin push sensor target/wasm32-wasip2/release/sensor.wasm
run "$DROVER" provision s-1 --plugin sensor --config '{"threshold": 30}'
run "$DROVER" send s-1 '{"type":"reading","value":12}'

# expect_failure CODE COMMAND...: runs the command, which must fail with the API error CODE.
expect_failure() {
    local code="$1" err
    shift
    printf '$ %s\n' "$*"
    if err="$("$@" 2>&1)"; then
        echo "expected it to fail with $code" >&2
        exit 1
    fi
    echo "$err"
    # The CLI prints `error: MESSAGE (CODE, HTTP STATUS)`.
    grep -q "^error: .*($code, HTTP [0-9]*)\$" <<<"$err" || { echo "expected $code" >&2; exit 1; }
}

step "three events it traps on: each answered with the error (the command exits 1)"
for v in -1 -2 -3; do
    expect_failure trap "$DROVER" send s-1 "{\"type\":\"reading\",\"value\":$v}"
done

# The quarantine lasts 5 s (within ±25%): what follows reads it at once.
step "quarantined: events are refused without running the guest"
expect_failure quarantined "$DROVER" send s-1 '{"type":"reading","value":13}'

step "reads still answer the last durable state, with the reason"
state="$("$DROVER" state s-1)"
echo "$state"
grep -q 'quarantined after 3 failures' <<<"$state"
view="$(curl -sS "$DROVER_SERVER/v1/devices/s-1")"
grep -q '"quarantine":{"failures":3' <<<"$view"

step "the fleet's quarantined devices, and the count to alert on"
listed="$("$DROVER" devices --quarantined)"
echo "$listed"
grep -q '^s-1 .* 3 failures, .* left: .*trapped' <<<"$listed"
metrics="$(curl -sS "$DROVER_SERVER/metrics")"
grep '^drover_quarantined_devices ' <<<"$metrics"
grep -q '^drover_quarantined_devices 1$' <<<"$metrics"

step "the events it failed on, kept to re-send after a fix"
run "$DROVER" dead-letters s-1

step "resumed by hand: the next event runs the guest again"
run "$DROVER" resume s-1
run "$DROVER" send s-1 '{"type":"reading","value":13}'
run "$DROVER" state s-1
