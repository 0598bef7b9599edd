#!/bin/bash
# Applies the webhook-worker migrations and creates the sidecar's login role.
#
# Run by the postgres image's entrypoint on the first start (it sets POSTGRES_USER and
# POSTGRES_DB and points psql at the server it is initialising). Also usable by hand against
# any server: PGHOST=... PGPORT=... POSTGRES_USER=postgres POSTGRES_DB=app docker/postgres/initdb.sh
#
#   MIGRATIONS_DIR           where the sql/NNNN_*.sql files and sql/definitions/ are (default /webhook-worker/sql)
#   WEBHOOK_WORKER_PASSWORD  creates the login role webhook_worker IN ROLE rule_nats_worker (this
#                            database's worker role: rule_nats_role('worker'))
#   NATS_URL                 sets rule_nats_config 'default' (e.g. nats://nats:4222)
set -euo pipefail

dir="${MIGRATIONS_DIR:-/webhook-worker/sql}"
psql_args=(-v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-${POSTGRES_USER:-postgres}}")

applied=0
if [ "$(psql "${psql_args[@]}" -tA -c "SELECT to_regclass('public.rule_nats_schema_migrations') IS NOT NULL")" = "t" ]; then
    applied=$(psql "${psql_args[@]}" -tA -c "SELECT coalesce(max(version), 0) FROM public.rule_nats_schema_migrations")
fi

shopt -s nullglob
files=("$dir"/[0-9][0-9][0-9][0-9]_*.sql)
if [ ${#files[@]} -eq 0 ]; then
    echo "webhook-worker: no migrations in $dir" >&2
    exit 1
fi
migrated=0
for f in "${files[@]}"; do
    version=$((10#$(basename "$f" | cut -c1-4)))
    if [ "$version" -le "$applied" ]; then
        continue
    fi
    echo "webhook-worker: applying $(basename "$f")"
    psql "${psql_args[@]}" --single-transaction -f "$f"
    migrated=1
done

# The definition files (functions, procedures, views: docs/schema.md), after the migrations that
# were applied now, as `webhook-worker migrate` does, each with its checksum so that the migrate
# job finds them current. (A new image on an existing volume does not run this script: the
# migrate job applies what changed.)
if [ "$migrated" -eq 1 ]; then
    for f in "$dir"/definitions/[0-9][0-9]_*.sql; do
        name=$(basename "$f")
        sum=$(sha256sum "$f" | cut -c1-64)
        echo "webhook-worker: applying definitions/$name"
        psql "${psql_args[@]}" --single-transaction -f "$f" \
            -c "UPDATE public.rule_nats_schema_definitions SET checksum = '$sum' WHERE filename = '$name'"
    done
fi

# The failure log (docs/security.md): failed rule_nats_publish() calls are recorded despite the
# caller's rollback, through a loopback login that may only insert failure rows. The image's
# pg_hba.conf trusts 127.0.0.1, and that works (since 0017 the failure log connects with
# dblink_connect_u, which needs no password); the password matters where pg_hba.conf asks for one.
psql "${psql_args[@]}" <<'SQL'
SELECT rule_nats_private.enable_failure_log(md5(gen_random_uuid()::text) || md5(gen_random_uuid()::text))
 WHERE (SELECT conninfo FROM rule_nats_private.failure_log) IS NULL;
SQL

if [ -n "${WEBHOOK_WORKER_PASSWORD:-}" ]; then
    psql "${psql_args[@]}" -v pw="$WEBHOOK_WORKER_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE webhook_worker LOGIN PASSWORD %L IN ROLE %I', :'pw', rule_nats_role('worker'))
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'webhook_worker') \gexec
SQL
    echo "webhook-worker: login role webhook_worker (rule_nats_worker) ready"
fi
if [ -n "${NATS_URL:-}" ]; then
    # (psql variables are interpolated in scripts read from stdin, not in -c commands)
    psql "${psql_args[@]}" -v url="$NATS_URL" <<'SQL'
UPDATE rule_nats_config SET nats_url = :'url' WHERE config_name = 'default';
SQL
fi
