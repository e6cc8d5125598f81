#!/usr/bin/env bash
# Bring up what the benchmark and `make compat` need, on 127.0.0.1 only: PostgreSQL
# (with the pgbroker role and databases), Redis and RabbitMQ. Installs Redis/RabbitMQ
# when absent. Tests (`make test`) need none of this but PostgreSQL.
set -euo pipefail

if ! command -v redis-server >/dev/null || ! command -v rabbitmq-server >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server rabbitmq-server
fi

if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no
fi
# A second Redis that fsyncs every write (AOF, appendfsync always): the benchmark's
# "redis-durable", durable like pgbroker's default commits.
if ! redis-cli -h 127.0.0.1 -p 6380 ping >/dev/null 2>&1; then
  mkdir -p /tmp/pgbroker-bench-redis-durable
  redis-server --bind 127.0.0.1 --port 6380 --daemonize yes --dir /tmp/pgbroker-bench-redis-durable \
    --save '' --appendonly yes --appendfsync always
fi

if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached
  for _ in $(seq 1 90); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 1; done
fi
rabbitmq-diagnostics -q ping >/dev/null

if [ -d /etc/postgresql ] && ! pg_isready -h 127.0.0.1 -q; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  for _ in $(seq 1 60); do pg_isready -h 127.0.0.1 -q && break; sleep 1; done
fi
su postgres -c "psql -v ON_ERROR_STOP=1 -q" <<'SQL'
SELECT 'CREATE ROLE pgbroker LOGIN SUPERUSER PASSWORD ''pgbroker'''
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbroker') \gexec
SELECT 'CREATE DATABASE pgbroker OWNER pgbroker'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'pgbroker') \gexec
SELECT 'CREATE DATABASE pgbroker_bench OWNER pgbroker'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'pgbroker_bench') \gexec
SELECT 'CREATE DATABASE pgbroker_bench_async OWNER pgbroker'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'pgbroker_bench_async') \gexec
SELECT 'CREATE DATABASE pgbroker_bench_sqla OWNER pgbroker'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'pgbroker_bench_sqla') \gexec
SQL
echo "services up: postgres, redis (6379, and 6380 fsyncing every write), rabbitmq on 127.0.0.1"
