-- sql/definitions/20_installation.sql: the current definition of these objects (docs/schema.md).
--
-- The installation: which roles this database grants (rule_nats_role), moving grants from
-- the public rule_nats_* names to them (rule_nats_private.isolate, run by `webhook-worker migrate`
-- after every migration and after these files), random secrets, and the trigger functions that
-- keep the tables' bookkeeping columns and notifications.
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

CREATE OR REPLACE FUNCTION rule_nats_touch_updated_at()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_touch_updated_at() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_touch_updated_at() IS 'Trigger function: sets updated_at on UPDATE.';

CREATE OR REPLACE FUNCTION rule_nats_notify_config_change()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('rule_nats_config_changed',
                      json_build_object('table', TG_TABLE_NAME, 'op', TG_OP)::text);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_notify_config_change() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_notify_config_change() IS
    'Statement trigger: NOTIFY rule_nats_config_changed with {"table","op"} so sidecars reload their configuration.';

CREATE OR REPLACE FUNCTION rule_nats_outbox_notify()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    -- Delivered at commit only, so the relay never wakes up for a rolled-back event.
    PERFORM pg_notify('rule_nats_outbox', '');
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_outbox_notify() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_outbox_notify() IS 'Statement trigger: wakes the outbox relay (NOTIFY rule_nats_outbox) when events are committed.';

-- NOTIFY rule_nats_endpoint_health when a circuit opens or closes.
CREATE OR REPLACE FUNCTION rule_nats_endpoint_state_notify()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.circuit IS DISTINCT FROM OLD.circuit THEN
        PERFORM pg_notify('rule_nats_endpoint_health',
                          json_build_object('webhook_id', NEW.webhook_id, 'event', 'circuit_' || NEW.circuit,
                                            'consecutive_failures', NEW.consecutive_failures)::text);
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_endpoint_state_notify() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_endpoint_state_notify() IS
    'Row trigger: NOTIFY rule_nats_endpoint_health with {"webhook_id","event":"circuit_<state>"} when a circuit changes.';

CREATE OR REPLACE FUNCTION rule_nats_private.random_secret()
RETURNS text LANGUAGE plpython3u VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
import base64
import secrets
return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
$$;
REVOKE ALL ON FUNCTION rule_nats_private.random_secret() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_private.random_secret() TO rule_nats_definer;

CREATE OR REPLACE FUNCTION rule_nats_streams_check_overlap()
RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_other text;
    v_mine text;
    v_theirs text;
BEGIN
    -- One writer of stream subjects at a time: two transactions cannot each add half of an overlap.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rule_nats_streams.subjects'));
    SELECT s.stream_name, mine, theirs INTO v_other, v_mine, v_theirs
      FROM public.rule_nats_streams s
     CROSS JOIN LATERAL unnest(NEW.subjects) AS mine
     CROSS JOIN LATERAL unnest(s.subjects) AS theirs
     WHERE s.config_name = NEW.config_name
       AND s.stream_id <> NEW.stream_id
       AND s.stream_name <> NEW.stream_name  -- INSERT ... ON CONFLICT (stream_name) of the row itself
       AND public.rule_nats_subjects_overlap(mine, theirs)
     ORDER BY s.stream_name
     LIMIT 1;
    IF v_other IS NOT NULL THEN
        RAISE EXCEPTION 'subjects of stream "%" overlap those of stream "%"', NEW.stream_name, v_other
            USING ERRCODE = 'exclusion_violation',
                  DETAIL = format('%L (stream %s) and %L (stream %s) capture some of the same subjects on NATS '
                                  'connection %L; JetStream would refuse the stream (err 10065, subjects overlap).',
                                  v_mine, NEW.stream_name, v_theirs, v_other, NEW.config_name),
                  HINT = format('A subject belongs to one stream per NATS account: change the subjects of one of '
                                'them, or remove stream "%s" first (DELETE FROM rule_nats_streams WHERE stream_name '
                                '= %L; the sidecar leaves it in JetStream: nats stream rm %s).',
                                v_other, v_other, v_other);
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_streams_check_overlap() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_streams_check_overlap() IS
    'Trigger: refuses a stream whose subjects overlap those of another stream on the same NATS connection '
    '(23P01, naming the other stream).';

CREATE OR REPLACE FUNCTION rule_nats_role(p_kind text)
RETURNS name LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p_kind IN ('admin', 'monitor', 'worker', 'publisher', 'failure_writer')
                THEN ('rule_nats_' || p_kind || coalesce('_' || i.role_suffix, ''))::name END
      FROM public.rule_nats_installation_roles i
$$;
REVOKE ALL ON FUNCTION rule_nats_role(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_role(text) TO rule_nats_admin, rule_nats_monitor, rule_nats_worker, rule_nats_publisher, rule_nats_definer;
COMMENT ON FUNCTION rule_nats_role(text) IS
    'The role to grant for admin | monitor | worker | publisher in THIS database (e.g. '
    'SELECT format(''GRANT %I TO app'', rule_nats_role(''publisher''))): rule_nats_<kind> in the first installation '
    'of a cluster, rule_nats_<kind>_<database>_<oid> in the others. NULL for an unknown kind.';

CREATE OR REPLACE FUNCTION rule_nats_private.isolate()
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
REVOKE ALL ON FUNCTION rule_nats_private.isolate() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_private.isolate() IS
    'Superusers (webhook-worker migrate): moves the privileges the public rule_nats_* roles hold in this database to '
    'this installation''s own roles when it has some (rule_nats_installation_roles.role_suffix); idempotent. Returns how many moved.';

CREATE OR REPLACE FUNCTION rule_nats__guard_file_paths()
RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_has_role(current_user, 'pg_read_server_files', 'USAGE')
       OR num_nonnulls(NEW.auth_credentials_file, NEW.tls_ca_file, NEW.tls_cert_file, NEW.tls_key_file) = 0 THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT'
       OR NEW.auth_credentials_file IS DISTINCT FROM OLD.auth_credentials_file
       OR NEW.tls_ca_file IS DISTINCT FROM OLD.tls_ca_file
       OR NEW.tls_cert_file IS DISTINCT FROM OLD.tls_cert_file
       OR NEW.tls_key_file IS DISTINCT FROM OLD.tls_key_file THEN
        RAISE EXCEPTION 'only a superuser or a member of pg_read_server_files may set a file path in rule_nats_config'
            USING ERRCODE = '42501',
                  HINT = 'PostgreSQL reads these files as its own OS user: put the credentials in the table instead '
                         '(auth_credentials, tls_ca_pem, tls_cert_pem, tls_key_pem).';
    END IF;
    -- A file a superuser approved is presented to the servers the row names: whoever changes
    -- where it goes (servers, TLS, how it is used) could otherwise have PL/Python present the
    -- server's .creds JWT and nonce signature (or client certificate) to a server of their choice.
    IF NEW.nats_url IS DISTINCT FROM OLD.nats_url
       OR NEW.nats_cluster_urls IS DISTINCT FROM OLD.nats_cluster_urls
       OR NEW.auth_type IS DISTINCT FROM OLD.auth_type
       OR NEW.tls_enabled IS DISTINCT FROM OLD.tls_enabled
       OR NEW.tls_ca_pem IS DISTINCT FROM OLD.tls_ca_pem
       OR NEW.tls_cert_pem IS DISTINCT FROM OLD.tls_cert_pem
       OR NEW.tls_key_pem IS DISTINCT FROM OLD.tls_key_pem THEN
        RAISE EXCEPTION 'only a superuser or a member of pg_read_server_files may change the servers, TLS settings or '
                        'auth_type of configuration %, which reads files on the database server', NEW.config_name
            USING ERRCODE = '42501',
                  HINT = 'Move the credentials into auth_credentials, tls_ca_pem, tls_cert_pem and tls_key_pem '
                         '(and set the *_file columns to NULL) first; then the admin may change the rest.';
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION rule_nats__guard_file_paths() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats__guard_file_paths() IS
    'Trigger: a file path in rule_nats_config (read by PostgreSQL''s OS user), and the servers, TLS settings and '
    'auth_type of a row that has one, are set by a superuser or a member of pg_read_server_files only.';

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('20_installation.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
