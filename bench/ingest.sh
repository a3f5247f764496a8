#!/usr/bin/env bash
# Ingest benchmark: durably acknowledged webhooks per second (GET tracker-style postbacks,
# 64 connections, wrk), next to a bare HTTP server that answers at once (baseline 1), both
# measured in the same run. Prints a table; the ratio is the number to quote.
#
#   bash bench/ingest.sh [seconds]      (needs wrk: apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
command -v wrk >/dev/null || { echo "wrk is required: apt-get install -y wrk" >&2; exit 1; }
cargo build --release -q
bin=target/release/postbackd
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

port_base=$((20000 + RANDOM % 20000))
sink=127.0.0.1:$port_base
daemon=127.0.0.1:$((port_base + 1))
bare=127.0.0.1:$((port_base + 2))

mkdir -p "$work/none" "$work/one"
echo "postbacks: []" > "$work/none/rules.yaml"
cat > "$work/one/rules.yaml" <<YAML
postbacks:
  - id: tracker
    trigger: conversion
    http:
      url: "http://$sink/pb?cid={clickid}&sum={payout}"
YAML

"$bin" sink --listen "$sink" > "$work/sink.out" 2>&1 &
"$bin" sink --listen "$bare" > /dev/null 2>&1 &
sleep 0.5

rate() { # url -> requests/s
  wrk -t2 -c64 -d"${secs}s" -s bench/unique.lua "$1" | awk '/Requests\/sec/ {print $2}'
}

base=$(rate "http://$bare")
results=()
delivered=""
for cfg in none one; do
  POSTBACKD_LOG=warn "$bin" run "$work/$cfg" --listen "$daemon" --data-dir "$work/data-$cfg" 2>"$work/$cfg.log" &
  pid=$!
  sleep 0.7
  before=$(wc -l < "$work/sink.out")
  r=$(rate "http://$daemon")
  # Postbacks that reached the receiver while wrk ran: delivery keeps pace, or not.
  [[ $cfg == one ]] && delivered=$(( $(wc -l < "$work/sink.out") - before ))
  kill -TERM $pid; wait $pid || true
  results+=("$cfg:$r")
done

printf '%-44s %12s %8s\n' "run (${secs}s, 64 connections, 2 wrk threads)" "req/s" "ratio"
printf '%-44s %12.0f %8s\n' "baseline 1: bare HTTP server" "$base" "1.00"
for r in "${results[@]}"; do
  name=${r%%:*}; val=${r#*:}
  label="postbackd, durable ack, $name postback matched"
  [[ $name == none ]] && label="postbackd, durable ack, no postback matched"
  [[ $name == one ]] && label="postbackd, durable ack, 1 postback queued+sent"
  printf '%-44s %12.0f %8.2f\n' "$label" "$val" "$(echo "$val / $base" | bc -l)"
done
printf '%-44s %12.0f %8s\n' "  postbacks delivered meanwhile, per second" "$(echo "$delivered / $secs" | bc -l)" ""
