#!/usr/bin/env bash
# Start what `bench/run.py` compares against, all on 127.0.0.1 and without systemd:
# Redis, RabbitMQ and PostgreSQL (with the pgbroker role and the two bench databases).
# Idempotent: a service that already answers is left alone; packages are installed
# with apt only when a service is down and its binaries are missing. Run as root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
apt_updated=""
need() {  # need PACKAGE BINARY: install PACKAGE when BINARY is not on PATH
  command -v "$2" >/dev/null && return 0
  [ -n "$apt_updated" ] || { apt-get update -q; apt_updated=1; }
  apt-get install -y -q "$1"
}
wait_until() {  # wait_until SECONDS WHAT COMMAND...: poll once a second, fail after SECONDS
  local secs=$1 what=$2; shift 2
  for _ in $(seq "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "services.sh: $what did not come up within ${secs}s" >&2; return 1
}

# Redis
redis_up() { if command -v redis-cli >/dev/null; then redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; else tcp_open 6379; fi; }
if ! redis_up; then
  need redis-server redis-server
  redis_up || redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no
  wait_until 30 redis redis_up
fi

# RabbitMQ
rabbit_up() { if command -v rabbitmq-diagnostics >/dev/null; then rabbitmq-diagnostics -q ping; else tcp_open 5672; fi; }
if ! rabbit_up >/dev/null 2>&1; then
  need rabbitmq-server rabbitmq-server
  # the package's postinst may have started it already
  if ! rabbit_up >/dev/null 2>&1; then RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached; fi
  wait_until 60 rabbitmq rabbit_up
  wait_until 30 "rabbitmq port 5672" tcp_open 5672
fi

# PostgreSQL
if ! pg_isready -q -h 127.0.0.1 2>/dev/null; then
  if ! compgen -G '/etc/postgresql/*/main' >/dev/null; then
    [ -n "$apt_updated" ] || apt-get update -q
    apt-get install -y -q postgresql
  fi
  pg_isready -q -h 127.0.0.1 2>/dev/null ||
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  wait_until 60 postgresql pg_isready -q -h 127.0.0.1
fi
(cd / && su postgres -c "psql -X -q -v ON_ERROR_STOP=1") <<'SQL'
SELECT 'CREATE ROLE pgbroker LOGIN SUPERUSER PASSWORD ''pgbroker'''
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgbroker') \gexec
SELECT format('CREATE DATABASE %I OWNER pgbroker', d)
FROM unnest(ARRAY['pgbroker_bench', 'pgbroker_bench_sqla']) AS d
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = d) \gexec
SQL

echo "services.sh: redis, rabbitmq and postgresql are up on 127.0.0.1" >&2
