-- 0017_isolation: databases of one cluster that cannot read each other, credentials that are
-- data, and a failure log that works on any cluster (issue 19: defects 6, 9, 10 and 13).
--
--  * Roles per installation. The rule_nats_* roles are cluster-wide: a login granted
--    rule_nats_worker for database A read database B's signing secrets. The first database that
--    installs the schema keeps the public names (rule_nats_admin, _monitor, _worker, _publisher,
--    _failure_writer); every other database of the cluster gets roles of its own, named
--    rule_nats_<kind>_<database>_<oid>, and its grants are moved to them (rule_nats_role('worker')
--    says which role to grant in this database). rule_nats_private.isolate() does the move; it is
--    idempotent, runs at the end of this migration and after every `webhook-worker migrate`.
--  * The failure log connects with dblink_connect_u (the definer alone may call it), as this
--    installation's own failure-writer role, on a connection the session keeps: it works on a
--    trust-configured cluster (dblink refuses a non-superuser connection that used no password),
--    enabling it in one database changes nothing in another, and rule_nats_failure_log_check()
--    no longer opens a backend per call. The role has a connection limit and an idle timeout.
--  * Credentials are data: auth_credentials (the text of a .creds file), tls_ca_pem, tls_cert_pem
--    and tls_key_pem. The *_file columns, which PL/Python opens as the server's OS user, may be
--    set only by a superuser or a member of pg_read_server_files (whose right reading server files
--    is); existing values keep working (the superuser who applies this migration approves them,
--    and a NOTICE lists them). A file that cannot be read gives one message, whatever the reason.
--  * rule_nats_private.uninstall() (and `webhook-worker uninstall`) removes the schema and the
--    roles no other database uses.

-- ---------------------------------------------------------------------------
-- Roles per installation.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_installation_roles (
    singleton     boolean     PRIMARY KEY DEFAULT true,
    database_oid  oid         NOT NULL,
    role_suffix   text,
    installed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT "one row" CHECK (singleton),
    CONSTRAINT "role_suffix: lower-case letters, digits and _" CHECK (role_suffix ~ '^[a-z0-9_]{1,40}$')
);
COMMENT ON TABLE rule_nats_installation_roles IS
    'This database''s installation of the NATS webhook worker: role_suffix NULL means it uses the public role names '
    '(rule_nats_admin, ...); otherwise its roles are rule_nats_<kind>_<role_suffix> (rule_nats_role() names them).';
GRANT SELECT ON rule_nats_installation_roles TO PUBLIC;  -- role names only, nothing secret

-- The first installation of a cluster keeps the public names; a database whose schema arrives
-- while the public roles hold privileges in another database gets roles of its own. A copy made
-- with CREATE DATABASE ... TEMPLATE shares its template's installation (docs/security.md).
INSERT INTO rule_nats_installation_roles (database_oid, role_suffix)
SELECT d.oid,
       CASE WHEN EXISTS (
                SELECT 1 FROM pg_catalog.pg_shdepend s
                  JOIN pg_catalog.pg_database o ON o.oid = s.dbid
                 WHERE s.refclassid = 'pg_catalog.pg_authid'::regclass
                   AND s.refobjid IN (SELECT oid FROM pg_catalog.pg_roles
                                       WHERE rolname IN ('rule_nats_admin', 'rule_nats_monitor', 'rule_nats_worker',
                                                         'rule_nats_publisher', 'rule_nats_failure_writer'))
                   AND s.dbid <> d.oid)
            THEN left(trim(BOTH '_' FROM regexp_replace(lower(d.datname), '[^a-z0-9]+', '_', 'g')), 20)
                 || '_' || d.oid::text
       END
  FROM pg_catalog.pg_database d
 WHERE d.datname = current_database();

CREATE FUNCTION rule_nats_role(p_kind text)
RETURNS name LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p_kind IN ('admin', 'monitor', 'worker', 'publisher', 'failure_writer')
                THEN ('rule_nats_' || p_kind || coalesce('_' || i.role_suffix, ''))::name END
      FROM public.rule_nats_installation_roles i
$$;
COMMENT ON FUNCTION rule_nats_role(text) IS
    'The role to grant for admin | monitor | worker | publisher in THIS database (e.g. '
    'SELECT format(''GRANT %I TO app'', rule_nats_role(''publisher''))): rule_nats_<kind> in the first installation '
    'of a cluster, rule_nats_<kind>_<database>_<oid> in the others. NULL for an unknown kind.';

CREATE FUNCTION rule_nats_private.isolate()
RETURNS integer LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_suffix text;
    v_kind text;
    v_public name;
    v_own name;
    v_moved integer := 0;
    r record;
BEGIN
    SELECT role_suffix INTO v_suffix FROM public.rule_nats_installation_roles;
    IF v_suffix IS NULL THEN
        RETURN 0;  -- this installation uses the public names
    END IF;
    FOREACH v_kind IN ARRAY ARRAY['admin', 'monitor', 'worker', 'publisher', 'failure_writer'] LOOP
        v_public := 'rule_nats_' || v_kind;
        v_own := v_public || '_' || v_suffix;
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_own) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS', v_own);
        END IF;
        EXECUTE format('COMMENT ON ROLE %I IS %L', v_own, format(
            'NATS webhook worker: %s of database %s only (what %s is in the first installation of the cluster).',
            v_kind, current_database(), v_public));
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_public);
        -- Every privilege the public role holds in THIS database moves to the installation's role.
        FOR r IN
            SELECT c.oid::regclass::text AS obj, c.relkind, a.privilege_type AS priv, a.is_grantable AS g
              FROM pg_class c, aclexplode(c.relacl) a
             WHERE a.grantee = v_public::text::regrole
        LOOP
            EXECUTE format('GRANT %s ON %s %s TO %I%s', r.priv, CASE WHEN r.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
                           r.obj, v_own, CASE WHEN r.g THEN ' WITH GRANT OPTION' ELSE '' END);
            EXECUTE format('REVOKE %s ON %s %s FROM %I CASCADE', r.priv,
                           CASE WHEN r.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.obj, v_public);
            v_moved := v_moved + 1;
        END LOOP;
        FOR r IN
            SELECT t.attrelid::regclass::text AS obj, t.attname AS col, a.privilege_type AS priv
              FROM pg_attribute t, aclexplode(t.attacl) a
             WHERE a.grantee = v_public::text::regrole AND NOT t.attisdropped
        LOOP
            EXECUTE format('GRANT %s (%I) ON TABLE %s TO %I', r.priv, r.col, r.obj, v_own);
            EXECUTE format('REVOKE %s (%I) ON TABLE %s FROM %I CASCADE', r.priv, r.col, r.obj, v_public);
            v_moved := v_moved + 1;
        END LOOP;
        FOR r IN
            SELECT p.oid::regprocedure::text AS obj, p.prokind, a.privilege_type AS priv
              FROM pg_proc p, aclexplode(p.proacl) a
             WHERE a.grantee = v_public::text::regrole
        LOOP
            EXECUTE format('GRANT %s ON %s %s TO %I', r.priv, CASE WHEN r.prokind = 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END,
                           r.obj, v_own);
            EXECUTE format('REVOKE %s ON %s %s FROM %I CASCADE', r.priv,
                           CASE WHEN r.prokind = 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, r.obj, v_public);
            v_moved := v_moved + 1;
        END LOOP;
        FOR r IN
            SELECT quote_ident(n.nspname) AS obj, a.privilege_type AS priv
              FROM pg_namespace n, aclexplode(n.nspacl) a
             WHERE a.grantee = v_public::text::regrole
        LOOP
            EXECUTE format('GRANT %s ON SCHEMA %s TO %I', r.priv, r.obj, v_own);
            EXECUTE format('REVOKE %s ON SCHEMA %s FROM %I CASCADE', r.priv, r.obj, v_public);
            v_moved := v_moved + 1;
        END LOOP;
        FOR r IN
            SELECT a.privilege_type AS priv
              FROM pg_database d, aclexplode(d.datacl) a
             WHERE d.datname = current_database() AND a.grantee = v_public::text::regrole
        LOOP
            EXECUTE format('GRANT %s ON DATABASE %I TO %I', r.priv, current_database(), v_own);
            EXECUTE format('REVOKE %s ON DATABASE %I FROM %I CASCADE', r.priv, current_database(), v_public);
            v_moved := v_moved + 1;
        END LOOP;
        IF EXISTS (SELECT 1 FROM pg_shdepend s
                    WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = v_public::text::regrole
                      AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())) THEN
            RAISE WARNING 'rule_nats: % still holds something in database % that could not be moved to %',
                v_public, current_database(), v_own
                USING HINT = 'A superuser looks at pg_shdepend for that role (an object it owns, a privilege granted by another role).';
        END IF;
    END LOOP;
    IF v_moved > 0 THEN
        RAISE NOTICE 'rule_nats: this database has roles of its own (%): grant those, not the public names, to its logins',
            (SELECT string_agg('rule_nats_' || k || '_' || v_suffix, ', ')
               FROM unnest(ARRAY['admin', 'monitor', 'worker', 'publisher']) k)
            USING HINT = 'SELECT rule_nats_role(''worker''); a login granted rule_nats_worker before this migration '
                         'no longer reaches this database (docs/security.md, "Several databases").';
    END IF;
    RETURN v_moved;
END
$$;
COMMENT ON FUNCTION rule_nats_private.isolate() IS
    'Superusers (webhook-worker migrate): moves the privileges the public rule_nats_* roles hold in this database to '
    'this installation''s own roles when it has some (rule_nats_installation_roles.role_suffix); idempotent. Returns how many moved.';
REVOKE ALL ON FUNCTION rule_nats_private.isolate() FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Credentials are data.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_config
    ADD COLUMN auth_credentials text,
    ADD COLUMN tls_ca_pem       text,
    ADD COLUMN tls_cert_pem     text,
    ADD COLUMN tls_key_pem      text;
COMMENT ON COLUMN rule_nats_config.auth_credentials IS
    'SECRET. The text of a NATS .creds file (user JWT and nkey seed) for auth_type credentials.';
COMMENT ON COLUMN rule_nats_config.tls_ca_pem IS 'CA certificates (PEM) that verify the server (system store when NULL).';
COMMENT ON COLUMN rule_nats_config.tls_cert_pem IS 'Client certificate (PEM) for mutual TLS, with tls_key_pem.';
COMMENT ON COLUMN rule_nats_config.tls_key_pem IS 'SECRET. Client private key (PEM, unencrypted) for mutual TLS, with tls_cert_pem.';
COMMENT ON COLUMN rule_nats_config.auth_credentials_file IS
    'Path of a NATS .creds file, read by the process that connects (PostgreSQL''s OS user for SQL publishes). Only a '
    'superuser or a member of pg_read_server_files may set it: use auth_credentials.';
COMMENT ON COLUMN rule_nats_config.tls_ca_file IS 'Path of a CA bundle (superuser or pg_read_server_files only): use tls_ca_pem.';
COMMENT ON COLUMN rule_nats_config.tls_cert_file IS 'Path of a client certificate (superuser or pg_read_server_files only): use tls_cert_pem.';
COMMENT ON COLUMN rule_nats_config.tls_key_file IS 'Path of a client key (superuser or pg_read_server_files only): use tls_key_pem.';

ALTER TABLE rule_nats_config
    DROP CONSTRAINT "auth_type credentials needs auth_credentials_file",
    ADD CONSTRAINT "auth_type credentials needs auth_credentials (or auth_credentials_file)"
        CHECK (auth_type <> 'credentials' OR auth_credentials IS NOT NULL OR auth_credentials_file IS NOT NULL),
    ADD CONSTRAINT "auth_credentials or auth_credentials_file, not both"
        CHECK (auth_credentials IS NULL OR auth_credentials_file IS NULL),
    ADD CONSTRAINT "auth_credentials holds a user JWT and an nkey seed"
        CHECK (auth_credentials IS NULL OR (auth_credentials ~ 'BEGIN NATS USER JWT' AND auth_credentials ~ 'SU[A-Z2-7]{50,}')),
    ADD CONSTRAINT "tls_cert_pem and tls_key_pem go together"
        CHECK ((tls_cert_pem IS NULL) = (tls_key_pem IS NULL)),
    ADD CONSTRAINT "tls_*_pem or tls_*_file, not both"
        CHECK ((tls_ca_pem IS NULL OR tls_ca_file IS NULL) AND (tls_cert_pem IS NULL OR tls_cert_file IS NULL)),
    ADD CONSTRAINT "tls_*_pem: PEM text"
        CHECK ((tls_ca_pem IS NULL OR tls_ca_pem ~ '-----BEGIN CERTIFICATE-----')
           AND (tls_cert_pem IS NULL OR tls_cert_pem ~ '-----BEGIN CERTIFICATE-----')
           AND (tls_key_pem IS NULL OR tls_key_pem ~ '-----BEGIN [A-Z ]*PRIVATE KEY-----'));

CREATE FUNCTION rule_nats__guard_file_paths()
RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF (NEW.auth_credentials_file IS NOT NULL OR NEW.tls_ca_file IS NOT NULL OR NEW.tls_cert_file IS NOT NULL
        OR NEW.tls_key_file IS NOT NULL)
       AND (TG_OP = 'INSERT'
            OR NEW.auth_credentials_file IS DISTINCT FROM OLD.auth_credentials_file
            OR NEW.tls_ca_file IS DISTINCT FROM OLD.tls_ca_file
            OR NEW.tls_cert_file IS DISTINCT FROM OLD.tls_cert_file
            OR NEW.tls_key_file IS DISTINCT FROM OLD.tls_key_file)
       AND NOT pg_has_role(current_user, 'pg_read_server_files', 'USAGE') THEN
        RAISE EXCEPTION 'only a superuser or a member of pg_read_server_files may set a file path in rule_nats_config'
            USING ERRCODE = '42501',
                  HINT = 'PostgreSQL reads these files as its own OS user: put the credentials in the table instead '
                         '(auth_credentials, tls_ca_pem, tls_cert_pem, tls_key_pem).';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION rule_nats__guard_file_paths() IS
    'Trigger: a file path in rule_nats_config (read by PostgreSQL''s OS user) is set by a superuser or a member of '
    'pg_read_server_files only.';
REVOKE ALL ON FUNCTION rule_nats__guard_file_paths() FROM PUBLIC;
CREATE TRIGGER rule_nats_config_file_paths BEFORE INSERT OR UPDATE ON rule_nats_config
    FOR EACH ROW EXECUTE FUNCTION rule_nats__guard_file_paths();

DO $paths$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT config_name FROM rule_nats_config
              WHERE coalesce(auth_credentials_file, tls_ca_file, tls_cert_file, tls_key_file) IS NOT NULL LOOP
        RAISE NOTICE 'rule_nats: configuration % reads files on the database server; they keep working (you approve them '
                     'by applying this migration) but only a superuser may change them', r.config_name
            USING HINT = 'Move them into auth_credentials, tls_ca_pem, tls_cert_pem and tls_key_pem.';
    END LOOP;
END
$paths$;

-- ---------------------------------------------------------------------------
-- The failure log: this installation's own login, one connection a session keeps, any auth.
-- ---------------------------------------------------------------------------
-- dblink refuses a connection that a non-superuser opens without a password the server asked
-- for, so on a trust-configured cluster (the postgres Docker image trusts 127.0.0.1) failed
-- publishes went unrecorded. dblink_connect_u skips that check; it is safe here because the
-- connection string is the one a superuser stored, with the login and database forced after it,
-- and only rule_nats_definer may call it.
DO $dblink$
BEGIN
    IF to_regprocedure('rule_nats_private.dblink_connect_u(text,text)') IS NOT NULL THEN
        REVOKE ALL ON FUNCTION rule_nats_private.dblink_connect_u(text, text) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION rule_nats_private.dblink_connect_u(text, text),
            rule_nats_private.dblink(text, text), rule_nats_private.dblink_get_connections(),
            rule_nats_private.dblink_disconnect(text) TO rule_nats_definer;
    END IF;
END
$dblink$;

CREATE FUNCTION rule_nats_private.failure_log_connection()
RETURNS text LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c_name constant text := 'rule_nats_failure_log';
    v_conninfo text;
BEGIN
    SELECT conninfo INTO v_conninfo FROM rule_nats_private.failure_log;
    IF v_conninfo IS NULL OR to_regprocedure('rule_nats_private.dblink_connect_u(text,text)') IS NULL THEN
        IF c_name = ANY (coalesce(rule_nats_private.dblink_get_connections(), '{}')) THEN
            PERFORM rule_nats_private.dblink_disconnect(c_name);
        END IF;
        RETURN NULL;
    END IF;
    IF c_name = ANY (coalesce(rule_nats_private.dblink_get_connections(), '{}')) THEN
        BEGIN
            -- The session's connection may have ended (idle_session_timeout, a restart).
            PERFORM 1 FROM rule_nats_private.dblink(c_name, 'SELECT 1') AS t(one integer);
            RETURN c_name;
        EXCEPTION WHEN OTHERS THEN
            PERFORM rule_nats_private.dblink_disconnect(c_name);
        END;
    END IF;
    -- libpq takes the last value of a repeated keyword: the login and the database are ours.
    PERFORM rule_nats_private.dblink_connect_u(c_name, 'connect_timeout=5 ' || v_conninfo
        || ' user=''' || replace(public.rule_nats_role('failure_writer'), '''', '\''')
        || ''' application_name=rule_nats_failure_log dbname='''
        || replace(replace(current_database(), '\', '\\'), '''', '\''') || '''');
    RETURN c_name;
END
$$;
COMMENT ON FUNCTION rule_nats_private.failure_log_connection() IS
    'Internal: the name of this session''s dblink connection through the failure log, opened once and kept (NULL when '
    'the failure log is not enabled); raises when it cannot connect.';
REVOKE ALL ON FUNCTION rule_nats_private.failure_log_connection() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_private.failure_log_connection() TO rule_nats_definer;

CREATE OR REPLACE FUNCTION rule_nats__record_failure_autonomously(
    p_config_name text, p_webhook_id integer, p_subject text, p_payload jsonb, p_headers jsonb,
    p_message_id text, p_error text, p_latency_ms double precision
) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_conn text;
BEGIN
    v_conn := rule_nats_private.failure_log_connection();
    IF v_conn IS NULL THEN
        RETURN false;
    END IF;
    PERFORM 1 FROM rule_nats_private.dblink(v_conn, format(
        'SELECT public.rule_nats__insert_failure(%L, %L, %L, %L, %L, %L, %L, %L)',
        p_config_name, p_webhook_id, p_subject, p_payload, p_headers, p_message_id, p_error, p_latency_ms))
        AS t(inserted text);
    PERFORM setval('rule_nats_private.failure_log_ok_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN true;
EXCEPTION WHEN OTHERS THEN
    -- Marked outside the transaction (a sequence is not rolled back): nats_failure_log_status.
    PERFORM setval('rule_nats_private.failure_log_failed_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    PERFORM nextval('rule_nats_private.failure_log_failures');
    RAISE WARNING 'rule_nats: could not record the failed publish in the failure log: %', SQLERRM
        USING HINT = 'SELECT * FROM nats_failure_log_status; SELECT rule_nats_failure_log_check(); a superuser '
                     'checks rule_nats_private.failure_log and pg_hba.conf (docs/security.md).';
    RETURN false;
END
$$;

CREATE OR REPLACE FUNCTION rule_nats_failure_log_check()
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_detail text;
BEGIN
    IF (SELECT conninfo FROM rule_nats_private.failure_log) IS NULL THEN
        RETURN 'not enabled: a failed publish from SQL is recorded only if its transaction commits; a superuser '
               'enables the failure log with SELECT rule_nats_private.enable_failure_log(''password'')';
    END IF;
    IF to_regprocedure('rule_nats_private.dblink_connect_u(text,text)') IS NULL THEN
        RETURN 'dblink is not installed in schema rule_nats_private';
    END IF;
    -- Opens the session's connection, or checks the one it has with SELECT 1: a caller that checks
    -- in a loop costs one backend, not one per call.
    PERFORM rule_nats_private.failure_log_connection();
    PERFORM setval('rule_nats_private.failure_log_ok_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
    PERFORM setval('rule_nats_private.failure_log_failed_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN SQLERRM || coalesce(': ' || nullif(v_detail, ''), '');
END
$$;

DROP FUNCTION rule_nats_private.enable_failure_log(text, text);
CREATE FUNCTION rule_nats_private.enable_failure_log(
    p_password text, p_conninfo text DEFAULT NULL, p_connection_limit integer DEFAULT 10
) RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_role name := public.rule_nats_role('failure_writer');
BEGIN
    IF p_password IS NULL THEN
        EXECUTE format('ALTER ROLE %I NOLOGIN PASSWORD NULL', v_role);
        UPDATE rule_nats_private.failure_log SET conninfo = NULL, updated_at = now();
        RETURN;
    END IF;
    IF p_connection_limit IS NULL OR p_connection_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'the failure log''s connection limit must be 1 to 1000, not %', p_connection_limit
            USING ERRCODE = '22023', HINT = 'Each session that records a failure keeps one connection while it is busy.';
    END IF;
    -- The installation's own role: enabling it here changes no other database's failure log. A
    -- session keeps its connection; an idle one ends after a minute and is opened again when needed.
    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L CONNECTION LIMIT %s', v_role, p_password, p_connection_limit);
    EXECUTE format('ALTER ROLE %I SET idle_session_timeout = %L', v_role, '60s');
    UPDATE rule_nats_private.failure_log
       SET conninfo = coalesce(p_conninfo, format('host=127.0.0.1 port=%s', current_setting('port')))
                      || ' password=''' || replace(replace(p_password, '\', '\\'), '''', '\''') || '''',
           updated_at = now();
END
$$;
COMMENT ON FUNCTION rule_nats_private.enable_failure_log(text, text, integer) IS
    'Superusers only: lets this installation''s failure-writer role (rule_nats_role(''failure_writer'')) log in with this '
    'password, at most p_connection_limit sessions at once, and records how to reach the server (default host=127.0.0.1 '
    'and this server''s port; any authentication method works, trust included). NULL disables.';
REVOKE ALL ON FUNCTION rule_nats_private.enable_failure_log(text, text, integer) FROM PUBLIC;

-- Existing installations: the limit and the idle timeout for a failure log already enabled.
DO $limit$
DECLARE
    v_role name := rule_nats_role('failure_writer');
BEGIN
    IF (SELECT conninfo FROM rule_nats_private.failure_log) IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role AND rolconnlimit = -1) THEN
        EXECUTE format('ALTER ROLE %I CONNECTION LIMIT 10', v_role);
        EXECUTE format('ALTER ROLE %I SET idle_session_timeout = %L', v_role, '60s');
    END IF;
END
$limit$;

-- ---------------------------------------------------------------------------
-- Uninstall.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_private.uninstall()
RETURNS text LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_roles text[];
    v_role text;
    v_kept text[] := '{}';
    v_dropped text[] := '{}';
    r record;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'only a superuser may uninstall the NATS webhook worker' USING ERRCODE = '42501';
    END IF;
    v_roles := ARRAY(SELECT public.rule_nats_role(k) FROM unnest(ARRAY['admin', 'monitor', 'worker', 'publisher',
                                                                'failure_writer']) k)
               || ARRAY['rule_nats_definer'];
    -- The table trigger on the application's tables goes with the function (DROP ... CASCADE).
    FOR r IN SELECT tgrelid::regclass::text AS t, tgname FROM pg_trigger
              WHERE tgfoid = to_regprocedure('public.rule_nats_table_trigger()') LOOP
        RAISE NOTICE 'rule_nats: dropping trigger % on %', r.tgname, r.t;
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure::text AS f, p.prokind FROM pg_proc p
              WHERE p.pronamespace = 'public'::regnamespace
                AND (p.proname LIKE 'rule\_nats%' OR p.proname LIKE 'rule\_webhook%' OR p.proname LIKE 'nats\_%')
                AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                  AND d.deptype = 'e') LOOP
        EXECUTE format('DROP %s IF EXISTS %s CASCADE', CASE WHEN r.prokind = 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, r.f);
    END LOOP;
    FOR r IN SELECT c.oid::regclass::text AS rel, c.relkind FROM pg_class c
              WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'p', 'S')
                AND (c.relname LIKE 'rule\_nats%' OR c.relname LIKE 'rule\_webhook%' OR c.relname LIKE 'nats\_%')
              ORDER BY c.relkind = 'S' LOOP
        BEGIN
            EXECUTE format('DROP %s IF EXISTS %s CASCADE',
                           CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.rel);
        EXCEPTION WHEN undefined_table THEN NULL;  -- gone with an earlier CASCADE
        END;
    END LOOP;
    FOR r IN SELECT t.oid::regtype::text AS typ FROM pg_type t
              WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('c', 'e', 'd')
                AND (t.typname LIKE 'rule\_nats%' OR t.typname LIKE 'nats\_%')
                AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c') LOOP
        EXECUTE format('DROP TYPE IF EXISTS %s CASCADE', r.typ);
    END LOOP;
    -- Privileges the roles still hold in this database (on the application's own tables, say).
    FOREACH v_role IN ARRAY v_roles LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('DROP OWNED BY %I', v_role);
        END IF;
    END LOOP;
    -- A role another database still uses (privileges, objects) stays; pg_shdepend knows.
    FOREACH v_role IN ARRAY v_roles LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role);
        BEGIN
            EXECUTE format('DROP ROLE %I', v_role);
            v_dropped := v_dropped || v_role;
        EXCEPTION WHEN dependent_objects_still_exist THEN
            v_kept := v_kept || v_role;
        END;
    END LOOP;
    -- Last, the private schema, which holds this function: nothing of it runs after this.
    DROP SCHEMA rule_nats_private CASCADE;
    RETURN format('removed the schema; dropped roles: %s; kept (used by another database): %s',
                  coalesce(nullif(array_to_string(v_dropped, ', '), ''), 'none'),
                  coalesce(nullif(array_to_string(v_kept, ', '), ''), 'none'));
END
$$;
COMMENT ON FUNCTION rule_nats_private.uninstall() IS
    'Superusers (webhook-worker uninstall): drops every object of the NATS webhook worker in this database, the table '
    'triggers, the private schema, and the roles that no other database of the cluster uses.';
REVOKE ALL ON FUNCTION rule_nats_private.uninstall() FROM PUBLIC;

-- Last: the grants above and those of every earlier migration move to this installation's roles.
SELECT rule_nats_private.isolate();

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (17, 'isolation');
