-- 0001: aggregate tables for finished exercise sessions, their roles and RLS.
--
-- Applied by storage/migrate.py in one transaction, as the owner (DATABASE_URL's
-- user), under an advisory lock. See docs/postgres.md for the model.

-- The sink's login role: no superuser, no BYPASSRLS, owns nothing, inherits nothing.
-- Roles are cluster-wide, so another database's migration may be creating it at the
-- same moment; the unique violation that race produces is the "already exists" case.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'telemetry_sink') THEN
        BEGIN
            CREATE ROLE telemetry_sink LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB
                NOCREATEROLE NOINHERIT NOREPLICATION;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

-- Row-level security for one table: enabled and forced (so the owner is subject to
-- it too), one policy isolating organisations for every role, and one that lets the
-- owner see all rows only after opting in with app.maintenance = 'on' (partition
-- maintenance moves rows out of the DEFAULT partition). Idempotent.
CREATE OR REPLACE FUNCTION telemetry_protect(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    owner_name text;
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = tbl AND polname = 'org_isolation')
    THEN
        EXECUTE format(
            'CREATE POLICY org_isolation ON %s'
            ' USING (org_id = current_setting(''app.org_id'', true))'
            ' WITH CHECK (org_id = current_setting(''app.org_id'', true))', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = tbl AND polname = 'owner_maintenance')
    THEN
        SELECT pg_get_userbyid(relowner) INTO owner_name FROM pg_class WHERE oid = tbl;
        EXECUTE format(
            'CREATE POLICY owner_maintenance ON %s TO %I'
            ' USING (current_setting(''app.maintenance'', true) = ''on'')'
            ' WITH CHECK (current_setting(''app.maintenance'', true) = ''on'')',
            tbl, owner_name);
    END IF;
END
$fn$;

-- One row per finished session; its insert is the idempotency anchor for the rest.
CREATE TABLE pose_session_metrics (
    org_id              text        NOT NULL CHECK (org_id <> ''),
    session_id          text        NOT NULL CHECK (session_id <> ''),
    event_id            text        NOT NULL,
    schema_version      integer     NOT NULL,
    patient_id          text        NOT NULL,
    exercise_kind       text,
    exercise_side       text,
    target_reps         integer,
    started_at          timestamptz NOT NULL,
    ended_at            timestamptz NOT NULL,
    end_reason          text        NOT NULL,
    error               text,
    blob_key            text,
    blob_size           bigint,
    blob_sha256         text,
    blob_encoding       text,
    pose_space          text,
    frames              integer     NOT NULL,
    frames_no_pose      integer     NOT NULL,
    batches             integer     NOT NULL,
    batches_duplicate   integer     NOT NULL,
    batches_skipped     integer     NOT NULL,
    gaps                integer     NOT NULL,
    duration_ms         bigint      NOT NULL,
    effective_fps       double precision,
    mean_visibility     double precision,
    rep_count           integer,
    usable_frame_share  double precision,
    active_ms           bigint,
    paused_ms           bigint,
    rep_profile         text,
    reps_summary        jsonb,
    media_views         integer     NOT NULL DEFAULT 0,
    received_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, session_id)
);
CREATE INDEX pose_session_metrics_org_started ON pose_session_metrics (org_id, started_at);
CREATE INDEX pose_session_metrics_org_patient
    ON pose_session_metrics (org_id, patient_id, started_at);

-- One row per repetition, partitioned by the month (UTC) of the session's start, so
-- a session's reps share a partition and retention drops whole months.
CREATE TABLE pose_rep_metrics (
    org_id              text        NOT NULL CHECK (org_id <> ''),
    session_id          text        NOT NULL,
    session_started_at  timestamptz NOT NULL,
    rep_index           integer     NOT NULL,
    start_ms            double precision,
    end_ms              double precision,
    duration_ms         double precision,
    rom_deg             double precision,
    detail              jsonb       NOT NULL,
    PRIMARY KEY (org_id, session_id, rep_index, session_started_at)
) PARTITION BY RANGE (session_started_at);
CREATE TABLE pose_rep_metrics_default PARTITION OF pose_rep_metrics DEFAULT;

-- One row per media view (a video watched during the session).
CREATE TABLE media_session_metrics (
    org_id              text        NOT NULL CHECK (org_id <> ''),
    session_id          text        NOT NULL,
    view_id             text        NOT NULL,
    media_id            text        NOT NULL,
    session_started_at  timestamptz NOT NULL,
    started_at          timestamptz,
    ended_at            timestamptz,
    startup_time_ms     double precision,
    watch_time_ms       double precision,
    rebuffer_count      integer,
    rebuffer_ms         double precision,
    rebuffer_pct        double precision,
    avg_bitrate_kbps    double precision,
    quality_changes     integer,
    seek_count          integer,
    error_count         integer,
    completion_pct      double precision,
    completed           boolean,
    detail              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (org_id, session_id, view_id),
    FOREIGN KEY (org_id, session_id)
        REFERENCES pose_session_metrics (org_id, session_id) ON DELETE CASCADE
);
CREATE INDEX media_session_metrics_org_media ON media_session_metrics (org_id, media_id);

-- One row per stall, partitioned by the month (UTC) the stall started.
CREATE TABLE media_buffering_events (
    org_id              text        NOT NULL CHECK (org_id <> ''),
    session_id          text        NOT NULL,
    view_id             text        NOT NULL,
    seq                 integer     NOT NULL,
    started_at          timestamptz NOT NULL,
    duration_ms         double precision,
    position_s          double precision,
    bitrate_kbps        double precision,
    after_seek          boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (org_id, session_id, view_id, seq, started_at)
) PARTITION BY RANGE (started_at);
CREATE TABLE media_buffering_events_default PARTITION OF media_buffering_events DEFAULT;

SELECT telemetry_protect(t::regclass) FROM unnest(ARRAY[
    'pose_session_metrics', 'pose_rep_metrics', 'pose_rep_metrics_default',
    'media_session_metrics', 'media_buffering_events', 'media_buffering_events_default'
]) AS t;

-- The sink reads and appends; it never updates or deletes. Partitions get no grants:
-- rows are reachable only through the parents, where the parents' policies apply.
GRANT SELECT, INSERT ON pose_session_metrics, pose_rep_metrics, media_session_metrics,
    media_buffering_events TO telemetry_sink;

-- Create the partition of `parent` for the UTC month containing `month`, moving any
-- rows the DEFAULT partition already holds for that month into it. Returns the new
-- partition's name, or NULL if it already existed. Serialised by an advisory lock.
CREATE OR REPLACE FUNCTION telemetry_ensure_partition(parent regclass, month date)
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    lo          timestamptz := date_trunc('month', month::timestamp) AT TIME ZONE 'UTC';
    hi          timestamptz := (date_trunc('month', month::timestamp) + interval '1 month')
                               AT TIME ZONE 'UTC';
    base        text;
    part        text;
    dflt        text;
    key         text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('restartix-telemetry:partitions'));
    SELECT relname INTO base FROM pg_class WHERE oid = parent;
    part := base || '_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM');
    dflt := base || '_default';
    IF to_regclass(quote_ident(part)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    SELECT a.attname INTO key
      FROM pg_partitioned_table pt
      JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]
     WHERE pt.partrelid = parent;
    PERFORM set_config('app.maintenance', 'on', true);
    -- Hold off inserts into DEFAULT until the new partition is attached.
    EXECUTE format('LOCK TABLE %I IN EXCLUSIVE MODE', dflt);
    EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part, parent);
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *)'
                   ' INSERT INTO %I SELECT * FROM moved', dflt, key, key, part)
        USING lo, hi;
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, lo, hi);
    PERFORM telemetry_protect(part::regclass);
    PERFORM set_config('app.maintenance', '', true);
    RETURN part;
END
$fn$;
