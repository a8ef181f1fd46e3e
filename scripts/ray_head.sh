#!/usr/bin/env bash
# A local Ray head for `ray job submit`, with Ray's token authentication on (RAY_AUTH_MODE=token).
# Ray 2.60 cannot keep a head on loopback (a --node-ip-address of 127.0.0.1 is rewritten to the machine's
# address; GCS, raylet and the agents listen on all interfaces), so every client must present the token:
# RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (per user). `start` writes a new
# random token there (mode 600) when there is none. The head's workers and jobs inherit RAY_AUTH_MODE and the
# token's location from it; scripts/submit.sh uses the same. Only the dashboard listens on 127.0.0.1 alone.
# RAY_HEAD_PORT and RAY_DASHBOARD_PORT pick the GCS and dashboard ports (6379, 8265); arguments after `start`
# go to `ray start` as they are (other ports, --temp-dir, --num-cpus).
set -euo pipefail
export RAY_AUTH_MODE=token  # every process of this head and its clients: a mismatch makes Ray Data tasks hang
port=${RAY_HEAD_PORT:-6379}
dashboard=${RAY_DASHBOARD_PORT:-8265}
command=${1:-start}
[ $# -gt 0 ] && shift
case "$command" in
  start)
    token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
      python=$(dirname "$(command -v ray)")/python
      (umask 077 && mkdir -p "$(dirname "$token_file")" &&
        "$python" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' >"$token_file.$$" &&
        chmod 600 "$token_file.$$" && mv "$token_file.$$" "$token_file")
      echo "Generated a Ray auth token in $token_file (mode 600)"
    elif [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -n "$(find "$token_file" -perm /077)" ]; then
      echo "warning: $token_file is readable by other users; chmod 600 it" >&2
    fi
    # `ray status` retries for minutes when nothing listens: bound it.
    if timeout 15 ray status --address "127.0.0.1:$port" >/dev/null 2>&1; then
      echo "Ray head already running"
      # one started before token auth (or by hand) answers without a token: say so
      if "$(dirname "$(command -v ray)")/python" -c 'import sys, urllib.request as u
u.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/jobs/", timeout=10)' "$dashboard" 2>/dev/null; then
        echo "warning: it accepts requests without a token; restart it with token auth: make ray-down ray-up" >&2
      fi
      exit 0
    fi
    ray start --head --port="$port" --num-cpus="$(nproc)" \
      --dashboard-host=127.0.0.1 --dashboard-port="$dashboard" --disable-usage-stats "$@" ;;
  stop) ray stop --force ;;
esac
