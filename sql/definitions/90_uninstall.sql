-- sql/definitions/90_uninstall.sql: the current definition of these objects (docs/schema.md).
--
-- Uninstall: the names of the objects in schema public that are ours (a new table, view or
-- function adds its name to rule_nats_private.objects), everything of ours with its parts, and
-- rule_nats_private.uninstall() (`webhook-worker uninstall`).
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

-- What uninstall drops: the relations and functions of schema public that the migrations
-- create, by name (an application's own nats_import_log or nats_app_helper is not ours, whatever
-- its name). A migration that adds an object to public adds its name here (CREATE OR REPLACE);
-- tests/security/test_isolation.py fails until it does.
CREATE OR REPLACE FUNCTION rule_nats_private.objects(p_kind text)
RETURNS name[] LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE p_kind
    WHEN 'relation' THEN ARRAY[
        'nats_consumer_status', 'nats_delivery_attempts', 'nats_endpoint_health', 'nats_failure_log_status',
        'nats_performance_stats', 'nats_publish_summary', 'nats_recent_failures', 'nats_stream_status',
        'nats_webhooks', 'nats_worker_status', 'rule_nats_attempt_log', 'rule_nats_attempt_log_attempt_id_seq',
        'rule_nats_config', 'rule_nats_config_config_id_seq', 'rule_nats_consumer_state', 'rule_nats_consumer_stats',
        'rule_nats_consumer_stats_consumer_id_seq', 'rule_nats_consumer_stats_stats_id_seq', 'rule_nats_consumers',
        'rule_nats_consumers_consumer_id_seq', 'rule_nats_dead_letters', 'rule_nats_dead_letters_dead_letter_id_seq',
        'rule_nats_delivery_attempts', 'rule_nats_delivery_settings', 'rule_nats_endpoint_state',
        'rule_nats_history_routes', 'rule_nats_history_routes_route_id_seq', 'rule_nats_installation',
        'rule_nats_installation_roles', 'rule_nats_outbox', 'rule_nats_outbox_outbox_id_seq',
        'rule_nats_publish_history', 'rule_nats_publish_history_publish_id_seq', 'rule_nats_retention',
        'rule_nats_retries', 'rule_nats_retries_retry_id_seq', 'rule_nats_schema_definitions',
        'rule_nats_schema_migrations', 'rule_nats_stats_hourly', 'rule_nats_stats_minute', 'rule_nats_stream_state',
        'rule_nats_streams', 'rule_nats_streams_stream_id_seq', 'rule_nats_success_minutes', 'rule_nats_workers',
        'rule_webhook_queue', 'rule_webhook_secrets', 'rule_webhook_secrets_secret_id_seq', 'rule_webhooks',
        'rule_webhooks_webhook_id_seq'
    ]::name[]
    WHEN 'function' THEN ARRAY[
        'rule_nats__check_publish', 'rule_nats__config_compat', 'rule_nats__config_invalidate',
        'rule_nats__config_ref_compat', 'rule_nats__flush_history', 'rule_nats__guard_file_paths',
        'rule_nats__insert_failure', 'rule_nats__load', 'rule_nats__null_argument', 'rule_nats__pgnats_source',
        'rule_nats__publish', 'rule_nats__publish_args_valid', 'rule_nats__raise',
        'rule_nats__record_failure_autonomously', 'rule_nats__webhook_compat', 'rule_nats__webhook_publish',
        'rule_nats__webhook_publish_as', 'rule_nats_adopt_consumer', 'rule_nats_cleanup_expired',
        'rule_nats_cleanup_old_history', 'rule_nats_config_info', 'rule_nats_configure',
        'rule_nats_consumer_add_stats', 'rule_nats_consumer_update_stats', 'rule_nats_count_successes',
        'rule_nats_delivery_attempts_write', 'rule_nats_endpoint_disable', 'rule_nats_endpoint_enable',
        'rule_nats_endpoint_state_notify', 'rule_nats_enqueue_row_event', 'rule_nats_failure_log_check',
        'rule_nats_health_check', 'rule_nats_hist_add', 'rule_nats_hist_agg', 'rule_nats_hist_merge',
        'rule_nats_hist_quantile', 'rule_nats_hist_sum', 'rule_nats_history_partitions',
        'rule_nats_history_route_id', 'rule_nats_history_upgrade', 'rule_nats_init', 'rule_nats_latency_bucket',
        'rule_nats_message_id_reserved', 'rule_nats_nats_header_allowed', 'rule_nats_nats_headers_allowed',
        'rule_nats_notify_config_change', 'rule_nats_outbox_notify', 'rule_nats_outbox_retry',
        'rule_nats_outcome_code', 'rule_nats_publish', 'rule_nats_publish_on_commit', 'rule_nats_purge',
        'rule_nats_purge_batch', 'rule_nats_purge_due', 'rule_nats_redact_url', 'rule_nats_refresh_status',
        'rule_nats_register_consumer', 'rule_nats_replay_dead_letter', 'rule_nats_replay_dead_letters',
        'rule_nats_role', 'rule_nats_rollup_attempts', 'rule_nats_rollup_publishes', 'rule_nats_stats',
        'rule_nats_stream_create', 'rule_nats_streams_check_overlap', 'rule_nats_subject_matches',
        'rule_nats_subject_reserved', 'rule_nats_subjects_overlap', 'rule_nats_subjects_pattern',
        'rule_nats_subjects_reserved', 'rule_nats_table_trigger', 'rule_nats_test_connection',
        'rule_nats_touch_updated_at', 'rule_nats_try_publish', 'rule_nats_valid_header_name',
        'rule_nats_valid_header_value', 'rule_nats_valid_headers', 'rule_nats_valid_message_id',
        'rule_nats_valid_name', 'rule_nats_valid_nats_headers', 'rule_nats_valid_server_url',
        'rule_nats_valid_server_urls', 'rule_nats_valid_subject', 'rule_nats_valid_subjects',
        'rule_nats_valid_webhook_url', 'rule_nats_webhook_enabled', 'rule_nats_webhooks_list',
        'rule_webhook_call_unified', 'rule_webhook_disable_nats', 'rule_webhook_enable_nats',
        'rule_webhook_publish_nats', 'rule_webhook_secret_create', 'rule_webhook_secret_revoke',
        'rule_webhook_secret_rotate'
    ]::name[]
    END
$$;
REVOKE ALL ON FUNCTION rule_nats_private.objects(text) FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_private.objects(text) IS
    'Internal (uninstall): the names of the relations (''relation'') and functions (''function'') the migrations create '
    'in schema public.';

-- Everything of ours in this database, with the parts of it (columns' defaults, constraints,
-- indexes, rules, triggers, row types): whatever else depends on one of them is the application's.
CREATE OR REPLACE FUNCTION rule_nats_private.owned()
RETURNS TABLE (classid oid, objid oid) LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH rels AS (
        SELECT c.oid FROM pg_class c
         WHERE (c.relnamespace = 'public'::regnamespace AND c.relname = ANY (rule_nats_private.objects('relation')))
            OR c.relnamespace = 'rule_nats_private'::regnamespace
    ), withtoast AS (
        SELECT oid FROM rels
        UNION SELECT c.reltoastrelid FROM pg_class c WHERE c.oid IN (SELECT oid FROM rels) AND c.reltoastrelid <> 0
    ), allrels AS (
        SELECT oid FROM withtoast
        UNION SELECT i.indexrelid FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM withtoast)
    ), procs AS (
        SELECT p.oid FROM pg_proc p
         WHERE (p.pronamespace = 'public'::regnamespace AND p.proname = ANY (rule_nats_private.objects('function')))
            OR p.pronamespace = 'rule_nats_private'::regnamespace
    ), types AS (
        SELECT t.oid FROM pg_type t WHERE t.typrelid IN (SELECT oid FROM allrels)
                                       OR t.typnamespace = 'rule_nats_private'::regnamespace
    )
    SELECT 'pg_class'::regclass::oid, oid FROM allrels
    UNION ALL SELECT 'pg_proc'::regclass::oid, oid FROM procs
    UNION ALL SELECT 'pg_type'::regclass::oid, oid FROM types
    UNION ALL SELECT 'pg_type'::regclass::oid, a.oid FROM pg_type a WHERE a.typelem IN (SELECT oid FROM types) AND a.typarray = 0
    UNION ALL SELECT 'pg_attrdef'::regclass::oid, d.oid FROM pg_attrdef d WHERE d.adrelid IN (SELECT oid FROM allrels)
    UNION ALL SELECT 'pg_constraint'::regclass::oid, k.oid FROM pg_constraint k WHERE k.conrelid IN (SELECT oid FROM allrels)
    UNION ALL SELECT 'pg_trigger'::regclass::oid, g.oid FROM pg_trigger g
               WHERE g.tgrelid IN (SELECT oid FROM allrels)
                  -- The table trigger on an application's table is ours to drop (a NOTICE names it).
                  OR g.tgfoid IN (SELECT oid FROM procs)
    UNION ALL SELECT 'pg_rewrite'::regclass::oid, r.oid FROM pg_rewrite r WHERE r.ev_class IN (SELECT oid FROM allrels)
    UNION ALL SELECT 'pg_policy'::regclass::oid, y.oid FROM pg_policy y WHERE y.polrelid IN (SELECT oid FROM allrels)
    UNION ALL SELECT 'pg_namespace'::regclass::oid, 'rule_nats_private'::regnamespace::oid
    UNION ALL SELECT 'pg_extension'::regclass::oid, e.oid FROM pg_extension e
               WHERE e.extnamespace = 'rule_nats_private'::regnamespace
$$;
REVOKE ALL ON FUNCTION rule_nats_private.owned() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_private.owned() IS
    'Internal (uninstall): (classid, objid) of every object of the NATS webhook worker in this database and of its parts.';

CREATE OR REPLACE FUNCTION rule_nats_private.uninstall()
RETURNS text LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_roles text[];
    v_role text;
    v_kept text[] := '{}';
    v_dropped text[] := '{}';
    v_blockers text;
    r record;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'only a superuser may uninstall the NATS webhook worker' USING ERRCODE = '42501';
    END IF;
    v_roles := ARRAY(SELECT public.rule_nats_role(k) FROM unnest(ARRAY['admin', 'monitor', 'worker', 'publisher',
                                                                'failure_writer']) k)
               -- The public names too: left behind by a database dropped without uninstalling,
               -- they go once no database uses them.
               || ARRAY['rule_nats_admin', 'rule_nats_monitor', 'rule_nats_worker', 'rule_nats_publisher',
                        'rule_nats_failure_writer', 'rule_nats_definer'];
    v_roles := ARRAY(SELECT DISTINCT unnest(v_roles));
    -- Before anything is dropped: an application object that depends on ours (a view on
    -- nats_webhooks, a CHECK or a DEFAULT that calls one of our functions, a foreign key to
    -- rule_webhooks), or that one of our roles owns, would go with it. Refuse instead.
    CREATE TEMP TABLE rule_nats_owned ON COMMIT DROP AS SELECT * FROM rule_nats_private.owned();
    SELECT string_agg(DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid), '; ')
      INTO v_blockers
      FROM pg_depend d
     WHERE (d.refclassid, d.refobjid) IN (SELECT o.classid, o.objid FROM rule_nats_owned o)
       AND (d.classid, d.objid) NOT IN (SELECT o.classid, o.objid FROM rule_nats_owned o)
       AND d.deptype <> 'e'
       -- Members of an extension of ours (dblink's foreign-data wrapper) go with it.
       AND NOT EXISTS (SELECT 1 FROM pg_depend m
                        WHERE m.classid = d.classid AND m.objid = d.objid AND m.deptype = 'e'
                          AND (m.refclassid, m.refobjid) IN (SELECT o.classid, o.objid FROM rule_nats_owned o));
    SELECT concat_ws('; ', v_blockers, string_agg(DISTINCT pg_describe_object(s.classid, s.objid, s.objsubid)
                                                   || ' (owned by ' || s.refobjid::regrole::text || ')', '; '))
      INTO v_blockers
      FROM pg_shdepend s
     WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND s.deptype = 'o' AND s.refclassid = 'pg_authid'::regclass
       AND s.refobjid IN (SELECT oid FROM pg_roles WHERE rolname = ANY (v_roles))
       AND (s.classid, s.objid) NOT IN (SELECT o.classid, o.objid FROM rule_nats_owned o);
    IF nullif(v_blockers, '') IS NOT NULL THEN
        RAISE EXCEPTION 'cannot uninstall the NATS webhook worker: objects of this database that are not its own depend on it: %',
            v_blockers
            USING ERRCODE = '2BP01',
                  HINT = 'Drop or change those objects (or their dependence on the worker''s views, tables, functions '
                         'and roles) first, then uninstall again; nothing was dropped.';
    END IF;
    -- The table trigger on the application's tables: dropped by name, its table stays.
    FOR r IN SELECT g.tgrelid::regclass::text AS t, g.tgname FROM pg_trigger g
              WHERE g.oid IN (SELECT o.objid FROM rule_nats_owned o WHERE o.classid = 'pg_trigger'::regclass)
                AND g.tgrelid NOT IN (SELECT o.objid FROM rule_nats_owned o WHERE o.classid = 'pg_class'::regclass) LOOP
        RAISE NOTICE 'rule_nats: dropping trigger % on %', r.tgname, r.t;
        EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.t);
    END LOOP;
    -- Nothing but our own objects depends on them now: CASCADE reaches only ours.
    FOR r IN SELECT c.oid::regclass::text AS rel, c.relkind FROM pg_class c
              WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'p', 'S')
                AND c.relname = ANY (rule_nats_private.objects('relation'))
              ORDER BY c.relkind = 'S' LOOP
        BEGIN
            EXECUTE format('DROP %s IF EXISTS %s CASCADE',
                           CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.rel);
        EXCEPTION WHEN undefined_table THEN NULL;  -- gone with an earlier CASCADE
        END;
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure::text AS f, p.prokind FROM pg_proc p
              WHERE p.pronamespace = 'public'::regnamespace AND p.proname = ANY (rule_nats_private.objects('function'))
                AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                  AND d.deptype = 'e') LOOP
        BEGIN
            EXECUTE format('DROP %s IF EXISTS %s CASCADE',
                           CASE WHEN r.prokind = 'p' THEN 'PROCEDURE' WHEN r.prokind = 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END, r.f);
        EXCEPTION WHEN undefined_function THEN NULL;  -- gone with an earlier CASCADE
        END;
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
REVOKE ALL ON FUNCTION rule_nats_private.uninstall() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_private.uninstall() IS
    'Superusers (webhook-worker uninstall): drops the objects of the NATS webhook worker in this database (by name: '
    'rule_nats_private.objects), the table triggers, the private schema, and the roles that no other database of the '
    'cluster uses; refuses, dropping nothing, while an application object depends on one of them.';

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('90_uninstall.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
