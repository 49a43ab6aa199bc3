#!/usr/bin/env bash
# A gateway forwards the events of several devices in one request: POST /v1/events.
# Each item gets its own result, in request order; a device's items are handled in order.
source "$(dirname "$0")/lib.sh"

start_server

step "three devices"
run "$DROVER" provision kitchen --plugin thermostat --config '{"setpoint": 21}'
run "$DROVER" provision bedroom --plugin thermostat --config '{"setpoint": 18}'
run "$DROVER" provision front-door --plugin door-lock --config '{"code": "4711"}'

step "one batch: six events for three devices, one refused by its plugin, one for an unknown device"
run curl -sSf -X POST "$URL/v1/events" -d '{"events": [
  {"device": "kitchen",    "event": {"type": "reading", "celsius": 19.5}},
  {"device": "bedroom",    "event": {"type": "reading", "celsius": 18.9}},
  {"device": "front-door", "event": {"type": "unlock", "code": "4711"}},
  {"device": "kitchen",    "event": {"type": "set_point", "celsius": 45}},
  {"device": "kitchen",    "event": {"type": "reading", "celsius": 21.8}},
  {"device": "garage",     "event": {"type": "lock"}}
]}'
echo

step "the kitchen's journal: its accepted events in request order"
run "$DROVER" journal kitchen
