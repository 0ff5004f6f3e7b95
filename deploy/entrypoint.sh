#!/bin/sh
# The image's entrypoint: `serve` (default), `drain`, `migrate`, or `check` (print what serve would run).
#
# serve runs the same uvicorn command as `make serve`. Its flags live here once, in ECARD_UVICORN_FLAGS;
# the Makefile's `serve` line must carry the same flags (tests/deploy checks that they agree).
# Read from the environment: HOST, PORT, WEB_CONCURRENCY (workers), PROMETHEUS_MULTIPROC_DIR (emptied
# at each start), ECARD_MIGRATE=1 (upgrade the database first), ECARD_UVICORN_FLAGS; the service itself
# reads DATABASE_URL, REDIS_URL, ECARD_KEYS_DIR, ECARD_MODE and the other ECARD_* settings.
set -eu

cd "$(dirname "$0")/.."

HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
WEB_CONCURRENCY="${WEB_CONCURRENCY:-2}"
PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-var/prometheus}"
ECARD_UVICORN_FLAGS="${ECARD_UVICORN_FLAGS:---no-access-log --log-config deploy/logging.json --loop uvloop --http app.server.http_limits:LimitedHttpToolsProtocol}"
APP="app.asgi:create_app"
export WEB_CONCURRENCY PROMETHEUS_MULTIPROC_DIR

migrate() {
    litestar --app "$APP" ecard db upgrade
}

serve_command() {
    # Word splitting of the flags is intended: they are a list of options.
    # shellcheck disable=SC2086
    set -- uvicorn --factory "$APP" --host "$HOST" --port "$PORT" --workers "$WEB_CONCURRENCY" $ECARD_UVICORN_FLAGS
    printf '%s\n' "$*"
}

mode="${1:-serve}"
case "$mode" in
    serve)
        if [ "${ECARD_MIGRATE:-0}" = "1" ]; then
            migrate
        fi
        # Emptied, not removed: in Kubernetes the directory is an emptyDir mount point.
        mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
        find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -delete
        # shellcheck disable=SC2046
        exec $(serve_command)
        ;;
    drain)
        shift
        exec litestar --app "$APP" ecard events drain "$@"
        ;;
    migrate)
        migrate
        ;;
    check)
        if [ "${ECARD_MIGRATE:-0}" = "1" ]; then
            echo "litestar --app $APP ecard db upgrade"
        fi
        serve_command
        ;;
    *)
        echo "usage: entrypoint.sh [serve|drain [drain options]|migrate|check]" >&2
        exit 2
        ;;
esac
