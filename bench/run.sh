#!/usr/bin/env bash
# The benchmark suite. Every figure is measured next to a baseline started in the same run
# and reported as a ratio, because absolute numbers drift on shared machines.
#
#   bash bench/run.sh            # the full suite, release build (a few minutes)
#   bash bench/run.sh --smoke    # a short run on the debug build: checks that it works
#
# Needs wrk (apt-get install wrk). Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0; [[ ${1:-} == --smoke ]] && smoke=1
if (( smoke )); then
  profile=debug; secs=2; rate=300; lat_secs=2; rules=(10 1000); backlog=5000; reload_sizes=(100 1000)
  cargo build -q --bins
else
  profile=release; secs=10; rate=5000; lat_secs=10; rules=(10 1000 100000); backlog=1000000; reload_sizes=(1000 10000)
  cargo build -q --release --bins
fi
command -v wrk >/dev/null || { echo "wrk is required: apt-get install -y wrk" >&2; exit 1; }
# POSTBACKD_BIN runs the suite against another build of the daemon, to compare two commits.
bin=${POSTBACKD_BIN:-target/$profile/postbackd}
tool=target/$profile/postbackd-bench
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [[ -n ${KEEP:-} ]] || rm -rf "$work"' EXIT

# Ports below the ephemeral range: an outgoing connection (the daemon retrying a destination
# that is down, wrk, the forwarder) can never take one of them, or connect to itself on one.
low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
(( low > 11000 )) || low=32768
base=$((10000 + RANDOM % (low - 10000 - 10)))
port() { echo $((base + $1)); }
SINK=127.0.0.1:$(port 0); BARE=127.0.0.1:$(port 1); DAEMON=127.0.0.1:$(port 2); FWD=127.0.0.1:$(port 3)

wait_http() { for _ in $(seq 1 1200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "not up: $1" >&2; return 1; }
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
wrk_rate() { # url -> requests/s; the request count is left in $work/requests
  wrk -t2 -c64 -d"${secs}s" -s bench/unique.lua "$1" > "$work/wrk.out"
  awk '/requests in/ {print $1}' "$work/wrk.out" > "$work/requests"
  awk '/Requests\/sec/ {print $2}' "$work/wrk.out"
}
# CPU time of the daemon's threads so far, in clock ticks: "writer http_workers other".
cpu_ticks() {
  for t in /proc/"$daemon_pid"/task/*; do echo "$(cat "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"; done |
    awk '{ if ($1 == "store-writer") w += $2; else if ($1 ~ /^tokio-rt-worker/) h += $2; else o += $2 }
         END { print w + 0, h + 0, o + 0 }'
}
# Bytes the daemon has had written to disk so far (the store's log and database).
disk_bytes() { awk '/^write_bytes/ {print $2}' "/proc/$daemon_pid/io"; }
kib_per() { python3 -c "import sys; print(f'{(int(sys.argv[2]) - int(sys.argv[1])) / 1024 / int(sys.argv[3]):.1f}')" "$1" "$2" "$3"; }
# The CPU each request cost, by thread role, between two `cpu_ticks`: "w / h / o" in µs.
cpu_per() { # "before" "after" requests
  python3 -c "import os,sys; t=1e6/os.sysconf('SC_CLK_TCK'); a=sys.argv[1].split(); b=sys.argv[2].split(); n=int(sys.argv[3]); print(' / '.join(f'{(int(y)-int(x))*t/n:.0f}' for x,y in zip(a,b)))" "$1" "$2" "$3"
}
row() { printf '%-58s %14s %8s\n' "$@"; }

# A rule set: `n` postbacks spread over n/10 offers (10 per offer), each with a condition no
# test event meets, plus (unless the 4th argument is `quiet`) one `tracker` postback on
# offer 1 that every test event fires.
rules_dir() { # dir n destination [quiet]
  mkdir -p "$1"
  python3 - "$1" "$2" "$3" "${4:-}" <<'PY'
import sys
root, n, dest, quiet = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "quiet"
offers = max(1, n // 10)
with open(f"{root}/offers.yaml", "w") as f:
    f.write("offers:\n")
    for o in range(1, offers + 1):
        f.write(f"  - id: {o}\n")
with open(f"{root}/rules.yaml", "w") as f:
    f.write("postbacks:\n" if not quiet else "postbacks: []\n")
    if not quiet: f.write(f'  - id: tracker\n    trigger: conversion\n    offers: [1]\n    http: {{ url: "http://{dest}/pb?cid={{clickid}}&sum={{payout}}&t={{{{ params.t | default(\'\') }}}}" }}\n')
# The others in files of 1,000, as a rules repository would split them.
for start in range(0, n - 1, 1000):
    with open(f"{root}/rules-{start // 1000:04}.yaml", "w") as f:
        f.write("postbacks:\n")
        for i in range(start, min(start + 1000, n - 1)):
            f.write(f'  - id: pb-{i}\n    trigger: conversion\n    offers: [{i % offers + 1}]\n    when: {{ sub1: "s{i}" }}\n    http: {{ url: "http://{dest}/pb/{i}?cid={{clickid}}" }}\n')
PY
}

start_daemon() { # dir data [extra args]
  POSTBACKD_LOG=warn "$bin" run "$1" --listen "$DAEMON" --allow-network 127.0.0.1 --data-dir "$2" --no-watch "${@:3}" 2>>"$work/daemon.log" &
  daemon_pid=$!
  wait_http "http://$DAEMON/-/ready"
}
stop_daemon() { kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; }
sink_stats() { curl -s "http://$SINK/__stats"; }

"$tool" sink --listen "$SINK" & wait_http "http://$SINK/__stats" >/dev/null
"$tool" sink --listen "$BARE" &
"$tool" forward --listen "$FWD" --to "http://$SINK/pb" &
wait_http "http://$BARE/__stats"

echo "postbackd benchmark suite ($profile build, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ))"
echo
row "measure" "value" "ratio"

# --- Ingest -------------------------------------------------------------------------------
mkdir -p "$work/none"; echo "postbacks: []" > "$work/none/rules.yaml"
rules_dir "$work/one" 1 "$SINK"
b1=$(wrk_rate "http://$BARE")
row "baseline 1: bare HTTP server, req/s" "$b1" "1.00"
start_daemon "$work/none" "$work/d-none"
c0=$(cpu_ticks); w0=$(disk_bytes); r=$(wrk_rate "http://$DAEMON/postback"); c1=$(cpu_ticks); w1=$(disk_bytes); stop_daemon
row "ingest, durable ack, nothing matched, req/s" "$r" "$(ratio "$r" "$b1")"
row "  CPU per webhook: writer / HTTP / other threads, µs" "$(cpu_per "$c0" "$c1" "$(cat "$work/requests")")" ""
row "  written to disk per webhook, KiB" "$(kib_per "$w0" "$w1" "$(cat "$work/requests")")" ""
start_daemon "$work/one" "$work/d-one"
c0=$(cpu_ticks); w0=$(disk_bytes); r=$(wrk_rate "http://$DAEMON/postback"); sleep 1; c1=$(cpu_ticks); w1=$(disk_bytes); stop_daemon
row "ingest, durable ack, 1 postback queued, req/s" "$r" "$(ratio "$r" "$b1")"
row "  CPU per webhook and postback: writer / HTTP / other, µs" "$(cpu_per "$c0" "$c1" "$(cat "$work/requests")")" ""
row "  written to disk per webhook and postback, KiB" "$(kib_per "$w0" "$w1" "$(cat "$work/requests")")" ""
sink_stats >/dev/null

# --- End to end ---------------------------------------------------------------------------
# Throughput: wrk drives conversions in; the rate is postbacks received at the sink, from the
# first to the last (the queue is drained before the count is taken).
e2e_rate() { # url -> received per second, counting until the sink has everything
  local out total first=0 last=0 count=0 s c f l
  sink_stats >/dev/null
  out=$(wrk -t2 -c64 -d"${secs}s" -s bench/unique.lua "$1")
  total=$(echo "$out" | awk '/requests in/ {print $1}')
  for _ in $(seq 1 1200); do
    s=$(sink_stats)
    c=$(echo "$s" | json '["count"]'); f=$(echo "$s" | json '["first_us"]'); l=$(echo "$s" | json '["last_us"]')
    count=$((count + c)); (( first == 0 && f > 0 )) && first=$f; (( l > last )) && last=$l
    (( count >= total )) && break
    sleep 0.25
  done
  python3 -c "print(round($count / max(1e-6, ($last - $first) / 1e6)))"
}
b2=$(e2e_rate "http://$FWD")
row "baseline 2: bare forwarder to the sink, postbacks/s" "$b2" "1.00"
start_daemon "$work/one" "$work/d-e2e"
r=$(e2e_rate "http://$DAEMON/postback")
row "end to end, postbacks received/s" "$r" "$(ratio "$r" "$b2")"

# Latency at a fixed rate: the sink measures from the send time each request carries.
# `latency` gives p50 and p99; the whole distribution (p50 / p90 / p99 / p99.9 / max) is
# left in $work/dist.
latency() { # url -> "p50 p99" in ms
  sink_stats >/dev/null
  "$tool" load --url "$1" --rate "$rate" --secs "$lat_secs" > "$work/load.json"
  sleep 1
  sink_stats | python3 -c "
import json,sys
s=json.load(sys.stdin); ms=lambda k: f'{s[k]/1000:.2f}'
open(sys.argv[1],'w').write(' / '.join(ms(k) for k in ['p50_us','p90_us','p99_us','p999_us','max_us']))
print(ms('p50_us'), ms('p99_us'))" "$work/dist"
}
read -r bp50 bp99 < <(latency "http://$FWD")
bdist=$(cat "$work/dist")
read -r p50 p99 < <(latency "http://$DAEMON/postback")
stop_daemon
row "baseline 2 latency at $rate/s, p50 / p99 ms" "$bp50 / $bp99" ""
row "  p50 / p90 / p99 / p99.9 / max ms" "$bdist" ""
row "end to end latency at $rate/s, p50 / p99 ms" "$p50 / $p99" ""
row "  p50 / p90 / p99 / p99.9 / max ms" "$(cat "$work/dist")" ""

# --- PostgreSQL ---------------------------------------------------------------------------
# The shared store on a throwaway local cluster (Debian's postgresql; skipped if it is not
# installed): ingest and end to end with one instance, and with two on one database (two
# wrk processes, one per instance; the sink counts what both deliver).
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [[ -n $pg_bin && -x $pg_bin/initdb ]]; then
  pgdir=$work/pg; mkdir -p "$pgdir"; as_pg=()
  # The server runs as postgres, which must reach its directory inside the work directory.
  if [[ $(id -u) -eq 0 ]]; then chmod a+x "$work"; chown postgres "$pgdir"; as_pg=(runuser -u postgres --); fi
  PGPORT=$(port 5)
  "${as_pg[@]}" "$pg_bin/initdb" -D "$pgdir/data" -U postgres --auth=trust --no-instructions >/dev/null
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
    -o "-p $PGPORT -k $pgdir -c listen_addresses=127.0.0.1 -c shared_buffers=256MB -c max_wal_size=4GB" start >/dev/null
  pg_stop() { "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pgdir/data" -m fast -w stop >/dev/null 2>&1 || true; }
  trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; pg_stop; [[ -n ${KEEP:-} ]] || rm -rf "$work"' EXIT
  pg_db() { psql -h 127.0.0.1 -p "$PGPORT" -U postgres -qc "CREATE DATABASE $1" >/dev/null; echo "postgres://postgres@127.0.0.1:$PGPORT/$1"; }
  wal_lsn() { psql -h 127.0.0.1 -p "$PGPORT" -U postgres -Atc "SELECT pg_current_wal_lsn()"; }
  wal_kib_per() { psql -h 127.0.0.1 -p "$PGPORT" -U postgres -Atc "SELECT round(pg_wal_lsn_diff('$2', '$1') / 1024.0 / $3, 1)"; }
  DAEMON2=127.0.0.1:$(port 6)
  start_second() { # dir data store
    POSTBACKD_LOG=warn "$bin" run "$1" --listen "$DAEMON2" --allow-network 127.0.0.1 --data-dir "$2" --store "$3" --no-watch 2>>"$work/daemon.log" &
    daemon2_pid=$!
    wait_http "http://$DAEMON2/-/ready"
  }
  stop_second() { kill -TERM "$daemon2_pid" 2>/dev/null || true; wait "$daemon2_pid" 2>/dev/null || true; }
  # Two wrk at once, one per instance: the sum of their rates; requests in $work/requests.
  wrk_pair() { # url1 url2
    wrk -t1 -c32 -d"${secs}s" -s bench/unique.lua "$1" -- a > "$work/wrk1.out" &
    local w1=$!
    wrk -t1 -c32 -d"${secs}s" -s bench/unique.lua "$2" -- bb > "$work/wrk2.out"
    wait $w1
    cat "$work/wrk1.out" "$work/wrk2.out" | awk '/requests in/ {n += $1} /Non-2xx/ {n -= $NF} END {print n}' > "$work/requests"
    cat "$work/wrk1.out" "$work/wrk2.out" | awk '/Requests\/sec/ {r += $2} END {printf "%.0f\n", r}'
  }
  # Postbacks received per second at the sink until it has one per request sent.
  sink_rate() { # total acknowledged; gives up after 10 s without a new arrival
    local first=0 last=0 count=0 idle=0 s c f l
    for _ in $(seq 1 1200); do
      s=$(sink_stats)
      c=$(echo "$s" | json '["count"]'); f=$(echo "$s" | json '["first_us"]'); l=$(echo "$s" | json '["last_us"]')
      count=$((count + c)); (( first == 0 && f > 0 )) && first=$f; (( l > last )) && last=$l
      (( count >= $1 )) && break
      if (( c == 0 )); then idle=$((idle + 1)); (( idle > 40 )) && { echo "sink: $count of $1 arrived" >&2; break; }; else idle=0; fi
      sleep 0.25
    done
    python3 -c "print(round($count / max(1e-6, ($last - $first) / 1e6)))"
  }
  db=$(pg_db ingest1)
  start_daemon "$work/one" "$work/d-pg1" --store "$db"
  l0=$(wal_lsn); r=$(wrk_rate "http://$DAEMON/postback"); l1=$(wal_lsn); stop_daemon
  row "PostgreSQL: ingest, 1 postback queued, 1 instance, req/s" "$r" "$(ratio "$r" "$b1")"
  row "  WAL written per webhook and postback, KiB" "$(wal_kib_per "$l0" "$l1" "$(cat "$work/requests")")" ""
  db=$(pg_db ingest2)
  start_daemon "$work/one" "$work/d-pg2" --store "$db"; start_second "$work/one" "$work/d-pg2b" "$db"
  r=$(wrk_pair "http://$DAEMON/postback" "http://$DAEMON2/postback"); stop_daemon; stop_second
  row "PostgreSQL: ingest, 1 postback queued, 2 instances, req/s" "$r" "$(ratio "$r" "$b1")"
  sink_stats >/dev/null
  db=$(pg_db e2e1)
  start_daemon "$work/one" "$work/d-pg3" --store "$db"
  r=$(e2e_rate "http://$DAEMON/postback")
  row "PostgreSQL: end to end, 1 instance, postbacks/s" "$r" "$(ratio "$r" "$b2")"
  for lr in 1000 "$rate"; do
    read -r p50 p99 < <(rate=$lr latency "http://$DAEMON/postback")
    row "  latency at $lr/s, p50 / p99 ms" "$p50 / $p99" ""
  done
  stop_daemon
  db=$(pg_db e2e2)
  start_daemon "$work/one" "$work/d-pg4" --store "$db"; start_second "$work/one" "$work/d-pg4b" "$db"
  sink_stats >/dev/null
  wrk_pair "http://$DAEMON/postback" "http://$DAEMON2/postback" >/dev/null
  r=$(sink_rate "$(cat "$work/requests")")
  stop_daemon; stop_second
  row "PostgreSQL: end to end, 2 instances, postbacks/s" "$r" "$(ratio "$r" "$b2")"
  pg_stop
else
  row "PostgreSQL: not installed (apt-get install postgresql), skipped" "" ""
fi

# --- Rule count ---------------------------------------------------------------------------
first=""
# Each test event's offer has 10 postbacks whose conditions are checked and fail: the cost
# of matching, with the rest of the rule set indexed away.
for n in "${rules[@]}"; do
  rules_dir "$work/rules-$n" "$n" "$SINK" quiet
  start_daemon "$work/rules-$n" "$work/d-rules-$n"
  r=$(wrk_rate "http://$DAEMON/postback")
  rss=$(rss_mib "$daemon_pid")
  stop_daemon
  [[ -z $first ]] && first=$r
  row "ingest with $n postbacks loaded (none fires), req/s" "$r" "$(ratio "$r" "$first")"
  row "  RSS with them loaded, MiB" "$rss" ""
done

# --- Reload -------------------------------------------------------------------------------
for n in "${reload_sizes[@]}"; do
  dir=$work/reload-$n; rules_dir "$dir" "$n" "$SINK"
  start_daemon "$dir" "$work/d-reload-$n"
  times=()
  for k in 1 2 3 4 5; do
    echo "# $k" >> "$dir/rules.yaml"
    times+=("$(curl -s -X POST "http://$DAEMON/-/reload" | json '["took_ms"]')")
  done
  median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
  ( end=$((SECONDS + secs)); k=0
    while (( SECONDS < end )); do
      k=$((k + 1)); echo "# load $k" >> "$dir/rules.yaml"
      curl -s -o /dev/null -X POST "http://$DAEMON/-/reload"; sleep 0.2
    done ) &
  reloader=$!
  out=$(wrk -t2 -c32 -d"${secs}s" -s bench/unique.lua "http://$DAEMON/postback")
  wait $reloader
  total=$(echo "$out" | awk '/requests in/ {print $1}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  sockerr=$(echo "$out" | awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}')
  stop_daemon
  row "reload of $n postbacks, ms (median of 5)" "$median" ""
  row "  webhooks failed while reloading 5/s under load" "$(( ${non2xx:-0} + ${sockerr:-0} )) of $total" ""
done

# --- Memory and backlog -------------------------------------------------------------------
n=$(( smoke ? 1000 : 10000 ))
rules_dir "$work/mem" "$n" "$SINK"
start_daemon "$work/mem" "$work/d-mem"; sleep 1
row "idle RSS with $n postbacks, MiB" "$(rss_mib "$daemon_pid")" ""
stop_daemon

# The destination is down (nothing listens): the backlog builds, then the sink comes up.
DOWN=127.0.0.1:$(port 4)
mkdir -p "$work/backlog"
cat > "$work/backlog/rules.yaml" <<YAML
postbacks:
  - id: tracker
    trigger: conversion
    retry: [2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s, 2s]
    http: { url: "http://$DOWN/pb?cid={clickid}" }
YAML
start_daemon "$work/backlog" "$work/d-backlog"
acked=$("$tool" batches --url "http://$DAEMON/v1/events" --events "$backlog" | json '["acked"]')
sleep 2
row "deliveries queued while the destination is down" "$acked" ""
row "  RSS with them queued, MiB" "$(rss_mib "$daemon_pid")" ""
"$tool" sink --listen "$DOWN" &
down_sink=$!
wait_http "http://$DOWN/__stats"
# The destination was paused while down: first the time until a probe finds it back, then
# the drain rate from there.
t0=$(date +%s.%N)
for _ in $(seq 1 600); do
  [[ $(curl -s "http://$DOWN/__stats" | json '["count"]') -gt 0 ]] && break
  sleep 0.1
done
row "  first postback after it is back, s (paused: probe backoff)" "$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")" ""
start=$(curl -s "http://$DOWN/__stats" | json '["count"]')
sleep "$secs"
drained=$(( $(curl -s "http://$DOWN/__stats" | json '["count"]') - start ))
row "  drain rate once it is back, postbacks/s (per_destination 8)" "$(( drained / secs ))" "$(ratio "$(( drained / secs ))" "$b2")"
stop_daemon
kill "$down_sink" 2>/dev/null || true
