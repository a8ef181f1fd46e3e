#!/usr/bin/env bash
# A local Ray head for `ray job submit` (dashboard on 127.0.0.1 only). Same RAY_AUTH_MODE as clients.
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
case "${1:-start}" in
  start)
    # `ray status` retries for minutes when nothing listens: bound it.
    if timeout 15 ray status --address 127.0.0.1:6379 >/dev/null 2>&1; then
      echo "Ray head already running"; exit 0
    fi
    ray start --head --num-cpus="$(nproc)" --dashboard-host=127.0.0.1 --disable-usage-stats ;;
  stop) ray stop --force ;;
esac
