# Shared by the example scripts: start a server on a free port in a temporary data dir.
set -euo pipefail

DROVER="${DROVER:-drover}"
WORK="$(mktemp -d)"
DATA="$WORK/data"

stop_server() {
    if [[ -n "${SERVER_PID:-}" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" || true
    fi
    rm -rf "$WORK"
}
trap stop_server EXIT

# start_server [extra serve flags...]: sets SERVER_PID and URL, exports DROVER_SERVER.
start_server() {
    "$DROVER" serve --data "$DATA" --listen 127.0.0.1:0 "$@" >"$WORK/stdout" 2>"$WORK/server.log" &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        if URL="$(sed -n 's/^drover listening on //p' "$WORK/stdout")" && [[ -n "$URL" ]]; then
            export DROVER_SERVER="$URL"
            echo "server: $URL (data in $DATA)"
            return
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
        sleep 0.1
    done
    echo "server did not start" >&2
    exit 1
}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
