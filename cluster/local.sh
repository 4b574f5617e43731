#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine: a head node and N worker nodes, each its own
# `ray start` (its own raylet, object store and resources; GPU counts may be fake), to try
# distmeta's cluster mode (`launch.py --address`, `ray job submit`) without a cloud.
#
#   cluster/local.sh start [--workers N] [--cpus C] [--gpus G] [--head-cpus C] [--port P] [--dashboard-port D]
#   cluster/local.sh status [--port P]
#   cluster/local.sh stop [--port P]
#
# Defaults: 2 worker nodes x 1 CPU x 0 GPUs, a head with 1 CPU and the custom resource `head`
# (cluster.server_resource=head puts the parameter server and task generators there), GCS port
# 6390 (Ray Client: GCS port + 10; each node's dashboard agent, which runs submitted jobs: + 20,
# + 21, ...: on one machine they would all take Ray's default and only one would answer), dashboard
# (and job server) port 8275. Every process of the cluster runs in one session
# whose id is kept in /tmp/distmeta-cluster-PORT/sid, so `stop` ends this cluster and nothing else
# (`ray stop` would end every Ray on the machine). Token authentication is off (RAY_AUTH_MODE=disabled),
# as the cluster only listens on this machine's own addresses.
set -euo pipefail

command=${1:-}
[[ -n "$command" ]] && shift
workers=2 cpus=1 gpus=0 head_cpus=1 port=6390 dashboard_port=8275
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --head-cpus) head_cpus=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dashboard-port) dashboard_port=$2; shift 2 ;;
    *) echo "unknown option $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
state=/tmp/distmeta-cluster-$port
export RAY_AUTH_MODE=disabled

running() { [[ -f $state/sid ]] && pgrep -s "$(cat "$state/sid")" > /dev/null; }

case "$command" in
  start)
    if running; then
      echo "a cluster already runs on port $port (cluster/local.sh stop --port $port ends it)" >&2
      exit 1
    fi
    rm -rf "$state" && mkdir -p "$state"
    echo "starting a head node (port $port, dashboard $dashboard_port) and $workers worker node(s) of $cpus CPU(s), $gpus GPU(s)"
    # One new session for all of the cluster's processes: stop signals that session alone.
    STATE=$state PORT=$port DASHBOARD_PORT=$dashboard_port HEAD_CPUS=$head_cpus \
      WORKERS=$workers CPUS=$cpus GPUS=$gpus setsid --wait bash -c '
        set -euo pipefail
        ps -o sid= -p $$ | tr -d " " > "$STATE/sid"
        export RAY_actor_scheduling_queue_max_reorder_wait_seconds=5  # as the embedded Ray: a stuck worker costs 5 s, not 30
        ray start --head --port="$PORT" --num-cpus="$HEAD_CPUS" --num-gpus=0 --resources="{\"head\": 1000}" \
          --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
          --ray-client-server-port=$((PORT + 10)) --dashboard-agent-listen-port=$((PORT + 20)) \
          --temp-dir="$STATE/ray" --disable-usage-stats > "$STATE/head.log" 2>&1
        for i in $(seq 1 "$WORKERS"); do
          ray start --address="127.0.0.1:$PORT" --num-cpus="$CPUS" --num-gpus="$GPUS" \
            --dashboard-agent-listen-port=$((PORT + 20 + i)) \
            --temp-dir="$STATE/ray" --disable-usage-stats > "$STATE/worker-$i.log" 2>&1
        done
      ' < /dev/null || { echo "the cluster did not start; logs in $state" >&2; exit 1; }
    echo "cluster up: --address 127.0.0.1:$port, jobs: ray job submit --address http://127.0.0.1:$dashboard_port"
    ;;
  status)
    running || { echo "no cluster on port $port" >&2; exit 1; }
    ray status --address="127.0.0.1:$port"
    ;;
  stop)
    running || { echo "no cluster on port $port"; exit 0; }
    sid=$(cat "$state/sid")
    pkill -TERM -s "$sid" || true
    for _ in $(seq 1 20); do  # Ray's own daemons take a few seconds to exit on SIGTERM
      pgrep -s "$sid" > /dev/null || break
      sleep 0.5
    done
    pkill -KILL -s "$sid" || true
    rm -f "$state/sid"
    echo "cluster on port $port stopped (logs in $state)"
    ;;
  *)
    echo "usage: $0 start|status|stop [options] (see the top of $0)" >&2
    exit 2
    ;;
esac
