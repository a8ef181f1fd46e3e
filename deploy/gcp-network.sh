#!/usr/bin/env bash
# The network cluster.yaml's nodes run in, created once per project: a VPC of their own with three ingress rules.
# The project's `default` network would not do: its default-allow-internal rule opens every port of every VM to
# the whole VPC, and Ray's GCS, raylet and workers listen on all interfaces (only the dashboard keeps to loopback).
#   bash deploy/gcp-network.sh PROJECT ADMIN_CIDR [REGION]   # ADMIN_CIDR: where `ray up` runs from, e.g. 203.0.113.7/32
# A custom VPC denies all other ingress. Egress stays open (pip, the run directory's bucket, MLflow's server).
set -euo pipefail
usage="usage: deploy/gcp-network.sh PROJECT ADMIN_CIDR [REGION]"
project=${1:?$usage}
admin=${2:?$usage}
region=${3:-us-central1}
network=vim-ray   # cluster.yaml's networkInterfaces / networkConfig name it
here=$(cd "$(dirname "$0")" && pwd)
gcloud=(gcloud --project="$project" --quiet)
"${gcloud[@]}" compute networks create "$network" --subnet-mode=custom
"${gcloud[@]}" compute networks subnets create "$network" --network="$network" --region="$region" \
  --range=10.64.0.0/20
# SSH from the admin's address only: `ray up` and `ray dashboard` (the tunnel to the head's loopback dashboard)
"${gcloud[@]}" compute firewall-rules create vim-ray-ssh --network="$network" --direction=INGRESS \
  --allow=tcp:22 --source-ranges="$admin" --target-tags=vim-ray
# The head: the Ray ports other nodes use (GCS, raylet, object manager, workers and drivers), from the cluster's
# nodes only; the list comes from the script that starts the head with exactly those ports.
"${gcloud[@]}" compute firewall-rules create vim-ray-head --network="$network" --direction=INGRESS \
  --allow="$(bash "$here/../scripts/ray_head.sh" firewall-ports)" --source-tags=vim-ray --target-tags=vim-ray-head
# Workers: any port, from the cluster's nodes only (NCCL, gloo and torch_xla open ports of their choosing;
# the head's autoscaler reaches them by SSH)
"${gcloud[@]}" compute firewall-rules create vim-ray-workers --network="$network" --direction=INGRESS \
  --allow=tcp,udp,icmp --source-tags=vim-ray --target-tags=vim-ray-worker
