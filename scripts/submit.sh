#!/usr/bin/env bash
# ray job submit to the dashboard on 127.0.0.1: the local head, or a cluster's through its tunnel (`ray dashboard
# cluster.yaml`, `kubectl port-forward`), retried while a just-started head's job agent is not up yet.
# Exits 0 only for a job that ends SUCCEEDED: `ray job submit` exits 1 for FAILED but 0 for STOPPED, so the
# job's final status is asked for by its submission id. RAY_DASHBOARD_PORT: the head's dashboard (8265).
# Heads started by scripts/ray_head.sh (and the KubeRay manifest's) require Ray's auth token: `ray job submit` and
# the status query send the one they use (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token).
set -uo pipefail
export RAY_AUTH_MODE=token
address=http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}
python=$(dirname "$(command -v ray)")/python  # the interpreter that has Ray, beside the `ray` command
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  id="vim-$(date +%Y%m%d-%H%M%S)-$$-$RANDOM"
  out=$(mktemp)
  ray job submit --address "$address" --submission-id "$id" --working-dir . -- "$@" 2>&1 | tee "$out"
  status=${PIPESTATUS[0]}
  if grep -q "No available agent" "$out"; then
    rm -f "$out"; echo "job agent not up yet; retrying ($attempt)"; sleep 3; continue
  fi
  rm -f "$out"
  if [ "$status" -ne 0 ]; then exit "$status"; fi
  final=$("$python" -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$address" "$id") || {
    echo "could not read the final status of job $id" >&2; exit 1; }
  if [ "$final" = SUCCEEDED ]; then exit 0; fi
  echo "job $id ended $final" >&2; exit 1
done
exit 1
