#!/usr/bin/env bash
# Effects: thermostats that report to a room (messages between actors), command their heating
# (the device's outbox) and notice when their sensor goes quiet (a durable timer), across a
# restart of the server.
source "$(dirname "$0")/lib.sh"

start_server

step "a room and two thermostats that report to it, command their heating, and go offline after 2 s of silence"
run "$DROVER" provision hall --plugin room --config '{"name": "Hall"}'
for t in hall-1 hall-2; do
    run "$DROVER" provision "$t" --plugin thermostat \
        --config '{"setpoint": 21, "room": "hall", "offline_after_ms": 2000, "commands": true}'
done

step "readings: each one is a transition, a report to the room, and (re)sets the heartbeat timer"
run "$DROVER" send hall-1 '{"type":"reading","celsius":19.2}'
run "$DROVER" send hall-2 '{"type":"reading","celsius":22.4}'
run "$DROVER" timers hall-1
sleep 0.5
step "the room heard from both (messages arrive once the senders' records are durable)"
run "$DROVER" state hall

step "hall-1 switched its heating on: a command waits in its outbox for the gateway"
run "$DROVER" commands list hall-1
id="$(curl -sSf "$DROVER_SERVER/v1/devices/hall-1/commands" | grep -o '"id":"[0-9.]*"' | head -1 | cut -d'"' -f4)"
run "$DROVER" commands ack hall-1 "$id"
run "$DROVER" commands list hall-1

step "a restart while the heartbeats are pending: timers are durable"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
start_server
run "$DROVER" timers hall-2

step "2 s without readings: each thermostat's heartbeat fires (once), it marks itself offline and tells the room"
sleep 3
run "$DROVER" state hall-1
run "$DROVER" journal hall-1
run "$DROVER" state hall
# The room's count of online thermostats (theirs are true/false, its count a number).
online="$(curl -sSf "$DROVER_SERVER/v1/devices/hall" | grep -o '"online":[0-9][0-9]*' | cut -d: -f2)"
[[ "$online" == 0 ]] || { echo "expected both thermostats offline, the room says $online online" >&2; exit 1; }
