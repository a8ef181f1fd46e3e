#!/usr/bin/env bash
# Starts Ray nodes with Ray's token authentication (RAY_AUTH_MODE=token): the local head of `make ray-up`, and the
# head and workers of cluster.yaml, so the flags and the auth mode live in this one file.
#   start [ARGS]                   a local head for `make demo`; writes a token first when there is none
#   token                          writes a token when there is none (run it before `ray up cluster.yaml`, whose
#                                  file_mounts copy ~/.ray/auth_token to every node)
#   cluster-head [ARGS]            cluster.yaml's head: refuses to start without a token; pins the ports that
#                                  other nodes reach (the firewall of deploy/gcp-network.sh opens only those)
#   cluster-worker HEAD_IP [ARGS]  cluster.yaml's workers: join the head at HEAD_IP with the same token
#   firewall-ports                 those head ports, as `gcloud compute firewall-rules create --allow` takes them
#   stop                           `ray stop --force`
# The token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (per user, mode 600).
# Ray 2.60 cannot keep a node on loopback (a --node-ip-address of 127.0.0.1 is rewritten to the machine's
# address; GCS, raylet and the agents listen on all interfaces), so every client must present the token. The
# nodes' workers and jobs inherit RAY_AUTH_MODE and the token's location; scripts/submit.sh uses the same.
# Only the dashboard (and its job API) listens on 127.0.0.1 alone: reach it by an SSH tunnel or port-forward.
# RAY_HEAD_PORT and RAY_DASHBOARD_PORT pick the GCS and dashboard ports (6379, 8265); ARGS go to `ray start` as
# they are, after this script's flags, so they override them (other ports, --temp-dir, --autoscaling-config).
set -euo pipefail
export RAY_AUTH_MODE=token  # every process of these nodes and their clients: a mismatch makes Ray Data tasks hang
port=${RAY_HEAD_PORT:-6379}
dashboard=${RAY_DASHBOARD_PORT:-8265}
token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
# The head's ports that other nodes connect to: GCS, raylet, object manager, and the range its workers and
# drivers bind (Ray's default range, named so the firewall can list it).
node_manager_port=8076
object_manager_port=8077
min_worker_port=10002
max_worker_port=19999

ensure_token() {  # a random token, written atomically and readable by this user only
  if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
    (umask 077 && mkdir -p "$(dirname "$token_file")" &&
      od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$token_file.$$" && mv "$token_file.$$" "$token_file")
    echo "Generated a Ray auth token in $token_file (mode 600)"
  elif [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -n "$(find "$token_file" -perm /077)" ]; then
    echo "warning: $token_file is readable by other users; chmod 600 it" >&2
  fi
}

require_token() {  # a cluster node must not make up a token of its own: nobody else would hold it
  if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
    echo "error: no Ray auth token (RAY_AUTH_TOKEN, or the file $token_file); cluster.yaml's file_mounts copy" \
      "~/.ray/auth_token from the machine running \`ray up\`: run \`bash scripts/ray_head.sh token\` there first" >&2
    exit 2
  fi
}

head_flags=(--head --port="$port" --dashboard-host=127.0.0.1 --dashboard-port="$dashboard" --disable-usage-stats)
command=${1:-start}
[ $# -gt 0 ] && shift
case "$command" in
  token) ensure_token ;;
  start)
    ensure_token
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
    ray start "${head_flags[@]}" --num-cpus="$(nproc)" "$@" ;;
  cluster-head)
    require_token
    ray start "${head_flags[@]}" --node-manager-port="$node_manager_port" \
      --object-manager-port="$object_manager_port" --min-worker-port="$min_worker_port" \
      --max-worker-port="$max_worker_port" "$@" ;;
  cluster-worker)
    head_ip=${1:?usage: ray_head.sh cluster-worker HEAD_IP [ARGS]}
    shift
    require_token
    ray start --address="$head_ip:$port" --disable-usage-stats "$@" ;;
  firewall-ports)
    echo "tcp:$port,tcp:$node_manager_port,tcp:$object_manager_port,tcp:$min_worker_port-$max_worker_port" ;;
  stop) ray stop --force ;;
  *) echo "usage: ray_head.sh start|token|cluster-head|cluster-worker|firewall-ports|stop" >&2; exit 2 ;;
esac
