#!/usr/bin/env bash
# ray job submit to the local head, retried while a just-started head's job agent is not up yet.
set -uo pipefail
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  out=$(mktemp)
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- "$@" 2>&1 | tee "$out"
  status=${PIPESTATUS[0]}
  if ! grep -q "No available agent" "$out"; then rm -f "$out"; exit "$status"; fi
  rm -f "$out"; echo "job agent not up yet; retrying ($attempt)"; sleep 3
done
exit 1
