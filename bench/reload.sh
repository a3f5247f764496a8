#!/usr/bin/env bash
# Reload benchmark: how long a reload of 100, 1,000 and 10,000 postbacks takes, and how
# many webhooks fail while the config is reloaded five times a second under load (the
# target is zero). Prints a table. Release build; needs wrk (apt-get install wrk).
#
#   bash bench/reload.sh [seconds-of-load-per-size]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
command -v wrk >/dev/null || { echo "wrk is required: apt-get install -y wrk" >&2; exit 1; }
cargo build --release -q
bin=target/release/postbackd
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000))
sink=127.0.0.1:$port
daemon=127.0.0.1:$((port + 1))
"$bin" sink --listen "$sink" > /dev/null 2>&1 &

# N postbacks over 100 offers, each with a condition and a templated URL.
generate() { # dir n
  mkdir -p "$1"
  {
    echo "offers:"
    for o in $(seq 1 100); do echo "  - { id: $o, goals: [lead, sale] }"; done
    echo "postbacks:"
    for i in $(seq 1 "$2"); do
      cat <<YAML
  - id: pb-$i
    trigger: conversion
    statuses: [approved]
    offers: [$(( i % 100 + 1 ))]
    when: { sub1: "s$i" }
    http:
      url: "http://$sink/pb/$i?cid={clickid}&sum={payout}&tx={txid}&s={sub2:raw}"
YAML
    done
  } > "$1/rules.yaml"
}

printf '%-12s %14s %14s %12s %14s\n' "postbacks" "reload (ms)" "check (ms)" "webhooks" "failed"
for n in 100 1000 10000; do
  dir=$work/cfg-$n
  generate "$dir" "$n"
  t0=$(date +%s%N); "$bin" check "$dir" > /dev/null; t1=$(date +%s%N)
  check_ms=$(( (t1 - t0) / 1000000 ))
  POSTBACKD_LOG=warn "$bin" run "$dir" --listen "$daemon" --data-dir "$work/data-$n" --no-watch 2>"$work/log-$n" &
  pid=$!
  for _ in $(seq 1 100); do curl -sf "http://$daemon/-/healthy" >/dev/null && break; sleep 0.1; done
  # Reload time: a changed file each time, as the daemon reports it (median of 5).
  times=()
  for k in 1 2 3 4 5; do
    echo "# $k" >> "$dir/rules.yaml"
    times+=("$(curl -s -X POST "http://$daemon/-/reload" | sed -E 's/.*"took_ms":([0-9]+).*/\1/')")
  done
  median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
  # Under load: wrk sends webhooks while the config is reloaded five times a second.
  ( end=$((SECONDS + secs)); k=0
    while (( SECONDS < end )); do
      k=$((k + 1)); echo "# load $k" >> "$dir/rules.yaml"
      curl -s -o /dev/null -X POST "http://$daemon/-/reload"; sleep 0.2
    done ) &
  reloader=$!
  out=$(wrk -t2 -c32 -d"${secs}s" -s bench/unique.lua "http://$daemon")
  wait $reloader
  total=$(echo "$out" | awk '/requests in/ {print $1}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  sockerr=$(echo "$out" | awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}')
  failed=$(( ${non2xx:-0} + ${sockerr:-0} ))
  printf '%-12s %14s %14s %12s %14s\n' "$n" "$median" "$check_ms" "$total" "$failed"
  kill -TERM $pid; wait $pid || true
done
