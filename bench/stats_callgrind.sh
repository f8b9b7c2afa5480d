#!/bin/bash
# What per-query statistics cost the pooler, counted in instructions (callgrind), which do not
# move with the machine's load as CPU time and tps do (bench/stats_cost.py's intervals on a
# shared 2-core machine are 20 to 50 % wide; perf's hardware counters are not available in a VM).
#
#   bench/stats_callgrind.sh QUERY_STATS CASE TRANSACTIONS DATABASE
#
# QUERY_STATS 0 or 1; CASE one of bench/pooler.py's pgbench cases: tpcb (TPC-B, -M simple, 50
# clients), simple (-S -M simple, 100 clients), extended (-S -M extended, 100 clients) or prep
# (-S -M prepared, 100 clients); TRANSACTIONS per client (pgbench -t); DATABASE a PostgreSQL database at 127.0.0.1:5432 (user postgres, trust) holding
# pgbench's tables (pgbench -i). Runs the pooler of this tree under callgrind, runs the workload
# once to warm up, zeroes the counters, runs it again and dumps: prints the total instructions
# of the measured run, the pooler's statistics functions (qs_*) and the engine's event work
# (serve_event, inclusive). Callgrind slows the pooler down about 50 times: the once-a-second
# Python work (in the total, not in the engine's) weighs about 50 times more per transaction
# than it does at full speed, and varies from run to run with the machine's load; the engine's
# per-statement work is counted exactly.
set -euo pipefail
QS=$1 CASE=$2 TX=$3 DB=$4
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
PORT=$((47000 + RANDOM % 1000))
PY=$(python -c "import sys; print(sys.executable)")
echo '"postgres" ""' > "$WORK/users.txt"
cat > "$WORK/p.ini" <<INI
[databases]
$DB = host=127.0.0.1 port=5432 dbname=$DB user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/users.txt
pool_mode = transaction
default_pool_size = 20
max_db_connections = 100
max_client_conn = 1000
log_connections = 0
log_disconnections = 0
query_stats = $QS
logfile = $WORK/log
INI
PYTHONPATH="$HERE/src" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
    "$PY" -m pgpilot proxy --config "$WORK/p.ini" > /dev/null 2> "$WORK/valgrind.err" &
PID=$!
for _ in $(seq 300); do pg_isready -q -h 127.0.0.1 -p $PORT && break; sleep 0.5; done
case "$CASE" in
    tpcb) ARGS="-M simple -c 50 -j 2 -t $TX" ;;
    simple) ARGS="-S -M simple -c 100 -j 2 -t $TX" ;;
    extended) ARGS="-S -M extended -c 100 -j 2 -t $TX" ;;
    prep) ARGS="-S -M prepared -c 100 -j 2 -t $TX" ;;
    *) echo "CASE: tpcb, simple, extended or prep" >&2; exit 2 ;;
esac
pgbench -n -h 127.0.0.1 -p $PORT -U postgres $ARGS "$DB" > /dev/null
callgrind_control -z $PID > /dev/null
pgbench -n -h 127.0.0.1 -p $PORT -U postgres $ARGS "$DB" | grep processed
callgrind_control -d $PID > /dev/null
kill $PID
wait $PID || true
callgrind_annotate --threshold=100 --inclusive=no "$WORK/cg.out.1" | grep -E "PROGRAM TOTALS|^ *[0-9,]+ \([ 0-9.]+%\)  [^=]*querystats.c:qs_"
# The engine's own work: everything done for the sockets' events (serve_event, inclusive, with
# what Python it calls from there), which is per transaction; the rest is the asyncio loop's
# timed work (the once-a-second folds among it), which is per second of the run.
callgrind_annotate --threshold=100 --inclusive=yes "$WORK/cg.out.1" | grep -E "engine.c:serve_event " | sed 's/$/  (engine)/'
# CG_KEEP=FILE: the whole profile (callgrind_annotate, exclusive counts per function) kept there.
if [ -n "${CG_KEEP:-}" ]; then
    callgrind_annotate --threshold=100 --inclusive=no --auto=no "$WORK/cg.out.1" > "$CG_KEEP"
    cp "$WORK/cg.out.1" "$CG_KEEP.out"
fi
rm -rf "$WORK"
