#!/bin/sh
# Alertmanager's configuration from alertmanager.yml and the receiver a plant
# sets in the environment, then (given a command) Alertmanager started on it.
# Alertmanager itself expands no environment variables in its configuration.
#
#   render.sh BASE OUT [COMMAND ARGS...]
#
# BASE ends with the receiver `  - name: plant`; its integrations are
# appended, each only where its variables are set:
#   ALERT_WEBHOOK_URL       POST each notification (Alertmanager's webhook JSON) here
#   ALERT_SMTP_SMARTHOST    the mail relay, host:port; with it ALERT_EMAIL_TO
#                           (comma-separated) and ALERT_EMAIL_FROM
#   ALERT_SMTP_USERNAME, ALERT_SMTP_PASSWORD   where the relay wants a login
#   ALERT_SMTP_REQUIRE_TLS  true (default: STARTTLS required) or false
# Values go in YAML single quotes, so any character but a line break is safe.
# POSIX sh: runs in the prom/alertmanager image (busybox) and on a host.
set -eu

fail() {
    printf 'render.sh: %s\n' "$*" >&2
    exit 1
}

[ $# -ge 2 ] || fail "usage: render.sh BASE OUT [COMMAND ARGS...]"
base=$1
out=$2
shift 2

[ "$(tail -n 1 "$base")" = "  - name: plant" ] ||
    fail "$base must end with the receiver line '  - name: plant'"

# Everything is checked before anything is written.
nl='
'
for name in ALERT_WEBHOOK_URL ALERT_SMTP_SMARTHOST ALERT_EMAIL_TO ALERT_EMAIL_FROM \
    ALERT_SMTP_USERNAME ALERT_SMTP_PASSWORD ALERT_SMTP_REQUIRE_TLS; do
    eval "value=\${$name:-}"
    case $value in
    *"$nl"*) fail "$name holds a line break" ;;
    esac
done
webhook=${ALERT_WEBHOOK_URL:-}
relay=${ALERT_SMTP_SMARTHOST:-}
tls=${ALERT_SMTP_REQUIRE_TLS:-true}
if [ -n "$relay" ]; then
    [ -n "${ALERT_EMAIL_TO:-}" ] || fail "ALERT_SMTP_SMARTHOST is set: set ALERT_EMAIL_TO too"
    [ -n "${ALERT_EMAIL_FROM:-}" ] || fail "ALERT_SMTP_SMARTHOST is set: set ALERT_EMAIL_FROM too"
    case $tls in
    true | false) ;;
    *) fail "ALERT_SMTP_REQUIRE_TLS is '$tls', not true or false" ;;
    esac
fi

# `KEY: 'value'`, indented: a YAML single-quoted scalar, its quotes doubled.
line() {
    printf "%s%s: '%s'\n" "$1" "$2" "$(printf '%s' "$3" | sed "s/'/''/g")"
}

umask 077 # the file may hold the relay's password
{
    cat "$base"
    if [ -n "$webhook" ]; then
        printf '    webhook_configs:\n'
        line "      - " url "$webhook"
        printf '        send_resolved: true\n'
    fi
    if [ -n "$relay" ]; then
        printf '    email_configs:\n'
        line "      - " to "$ALERT_EMAIL_TO"
        line "        " from "$ALERT_EMAIL_FROM"
        line "        " smarthost "$relay"
        printf '        require_tls: %s\n' "$tls"
        printf '        send_resolved: true\n'
        if [ -n "${ALERT_SMTP_USERNAME:-}" ]; then
            line "        " auth_username "$ALERT_SMTP_USERNAME"
            line "        " auth_password "${ALERT_SMTP_PASSWORD:-}"
        fi
    fi
} >"$out.tmp"
mv "$out.tmp" "$out"

if [ -z "$webhook" ] && [ -z "$relay" ]; then
    printf '%s\n' "render.sh: neither ALERT_WEBHOOK_URL nor ALERT_SMTP_SMARTHOST is set:" \
        "alerts reach no one (docs/deployment.md, Alerting)" >&2
fi

if [ $# -gt 0 ]; then
    exec "$@"
fi
