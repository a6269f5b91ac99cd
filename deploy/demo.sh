#!/usr/bin/env bash
# `make demo`: the whole flow on a real local Apache Kafka.
# Starts the broker, registers three tenants on three tiers, simulates last month's and this
# month's usage, consumes it exactly once into DuckDB, runs the nightly billing job and
# prints the invoices. Data goes to data/demo (fresh each run) and a fresh topic; the last
# lines say how to read it again. DEMO_PERCENT scales the simulated sessions (default 100).
set -euo pipefail
cd "$(dirname "$0")/.."
PF=.venv/bin/pf-metering
export METERING_DATA_DIR="${METERING_DATA_DIR:-data/demo}"
export METERING_TOPIC="${METERING_TOPIC:-pf.usage.demo-$(date +%s)}"
export METERING_GROUP="${METERING_GROUP:-pf-metering-demo}"
if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  KAFKA_BOOTSTRAP_SERVERS="$(deploy/local-kafka start --port "${DEMO_KAFKA_PORT:-9092}" | tail -n 1)"
  export KAFKA_BOOTSTRAP_SERVERS
fi
rm -rf "$METERING_DATA_DIR"
last=$(date -u -d "$(date -u +%Y-%m-01) -1 month" +%Y-%m)
this=$(date -u +%Y-%m)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
sessions() { local n=$(( $1 * ${DEMO_PERCENT:-100} / 100 )); echo $(( n > 0 ? n : 1 )); }

step "broker $KAFKA_BOOTSTRAP_SERVERS, topic $METERING_TOPIC, data in $METERING_DATA_DIR"
$PF tiers

step "three tenants on three tiers"
$PF tenants add acme-corp --tier basic
$PF tenants add globex_eu --tier professional
$PF tenants add initech --tier professional
$PF tenants set-tier initech enterprise --from "$last"
$PF tenants list

step "simulate usage for $last (closed) and $this (open)"
$PF simulate-usage acme-corp "$(sessions 300)" --period "$last" --seed 1
$PF simulate-usage globex_eu "$(sessions 1500)" --period "$last" --seed 2
$PF simulate-usage initech "$(sessions 4000)" --period "$last" --seed 3
$PF simulate-usage acme-corp "$(sessions 50)" --period "$this" --seed 4
$PF simulate-usage acme-corp "$(sessions 300)" --period "$last" --seed 1   # a retry: all duplicates

step "consume until every partition is at its end (exactly once)"
$PF consume --drain

step "usage of acme-corp in $last"
$PF usage acme-corp "$last"

step "nightly billing job"
$PF bill

step "invoices"
for t in acme-corp globex_eu initech; do $PF invoices "$t"; done

step "the invoice of initech for $last as JSON"
$PF generate-invoice initech "$last" -f json

step "a draft preview of the open period $this"
$PF generate-invoice acme-corp "$this"

step "ad-hoc SQL over the documented views"
$PF sql "SELECT tenant_id, period, events, sessions, api_calls FROM usage ORDER BY tenant_id, period"
echo
echo "Look at it again (the demo has its own data folder and topic):"
echo "  export METERING_DATA_DIR=$METERING_DATA_DIR METERING_TOPIC=$METERING_TOPIC"
echo "  $PF usage acme-corp $last"
echo "  $PF invoices initech"
echo "  .venv/bin/duckdb -readonly $METERING_DATA_DIR/query.duckdb"
