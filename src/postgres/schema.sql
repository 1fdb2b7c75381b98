-- lockstep's PostgreSQL schema. Idempotent: every provider that connects
-- with `create_schema` runs it, in one implicit transaction (a simple query
-- of several statements), serialised by an advisory lock so that two
-- providers starting at once do not race on the catalog.
--
-- Placeholders, substituted by config.rs after validating the schema name
-- ([a-z_][a-z0-9_]*, at most 63 bytes): @SCHEMA@ (the quoted identifier),
-- @SCHEMA_LIT@ (the name as a string literal), @CHANNEL@ (the NOTIFY
-- channel, a string literal).
--
-- Every function is called as ONE statement: its own transaction, one round
-- trip. Mutating functions first take transaction-level advisory locks on
-- the hashes of their keys, distinct and in ascending order (two requests
-- with opposite key orders lock in the same order: no deadlock), released
-- when the statement commits. Leases use the server's clock only.

SELECT pg_advisory_xact_lock(hashtext('lockstep-ddl'));

CREATE SCHEMA IF NOT EXISTS @SCHEMA@;

CREATE TABLE IF NOT EXISTS @SCHEMA@.locks (
    key         text PRIMARY KEY,
    owner       text NULL,        -- NULL: anonymous
    nonce       text NOT NULL,    -- the acquisition that took it
    token       bigint NOT NULL,  -- the newest fencing token (re-entries too)
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NULL, -- NULL: no expiry
    metadata    text NULL
);

CREATE INDEX IF NOT EXISTS locks_owner ON @SCHEMA@.locks (owner) WHERE owner IS NOT NULL;

-- Fencing tokens: one sequence for every key, so a key's tokens grow across
-- release, expiry and server restarts (a sequence never goes back).
CREATE SEQUENCE IF NOT EXISTS @SCHEMA@.tokens AS bigint;

-- Takes the advisory locks of `keys`, sorted by hash.
CREATE OR REPLACE FUNCTION @SCHEMA@.lock_keys(keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    h integer;
BEGIN
    FOR h IN SELECT DISTINCT hashtext(k) FROM unnest(keys) AS k ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtext(@SCHEMA_LIT@), h);
    END LOOP;
END;
$$;

-- All or nothing. Success: one row per key, in order, with its token and
-- whether it was re-entered. A key held by someone else: one row with the
-- key's index (0-based), a NULL token, and the holder's lease left in ms
-- (NULL: no expiry); nothing is written.
CREATE OR REPLACE FUNCTION @SCHEMA@.acquire(
    keys text[], p_owner text, p_nonce text, ttl_ms bigint, p_metadata text
) RETURNS TABLE (idx integer, token bigint, reentered boolean, lease_ms bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz;
    r record;
    re boolean[] := '{}';
    i integer;
    tok bigint;
    lease interval := CASE WHEN ttl_ms > 0 THEN ttl_ms * interval '1 millisecond' END;
BEGIN
    PERFORM @SCHEMA@.lock_keys(keys);
    t := clock_timestamp();
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        SELECT l.owner, l.expires_at INTO r FROM @SCHEMA@.locks l WHERE l.key = keys[i];
        IF NOT FOUND OR (r.expires_at IS NOT NULL AND r.expires_at <= t) THEN
            re := re || false;
        ELSIF p_owner IS NOT NULL AND r.owner = p_owner THEN
            re := re || true;
        ELSE
            idx := i - 1;
            lease_ms := CASE WHEN r.expires_at IS NOT NULL
                THEN ceil(extract(epoch FROM r.expires_at - t) * 1000)::bigint END;
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        tok := nextval(@SCHEMA_LIT@ || '.tokens');
        IF re[i] THEN
            UPDATE @SCHEMA@.locks l
               SET token = tok, expires_at = coalesce(t + lease, l.expires_at)
             WHERE l.key = keys[i];
            IF lease IS NOT NULL THEN
                -- Waiters sleep until the lease they saw: a new one wakes them.
                PERFORM pg_notify(@CHANNEL@, keys[i]);
            END IF;
        ELSE
            INSERT INTO @SCHEMA@.locks AS l
                   (key, owner, nonce, token, acquired_at, expires_at, metadata)
            VALUES (keys[i], p_owner, p_nonce, tok, t, t + lease, p_metadata)
            ON CONFLICT (key) DO UPDATE
               SET owner = excluded.owner, nonce = excluded.nonce, token = excluded.token,
                   acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
                   metadata = excluded.metadata;
        END IF;
        idx := i - 1;
        token := tok;
        reentered := re[i];
        lease_ms := NULL;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Releases the keys held by `p_owner` (NULL: anonymous locks only); with a
-- nonce other than '' only what that acquisition took (an undo). Per key,
-- whether a live lock was released. Notifies each released key.
CREATE OR REPLACE FUNCTION @SCHEMA@.release(keys text[], p_owner text, p_nonce text)
RETURNS boolean[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz;
    out boolean[] := '{}';
    live boolean;
    i integer;
BEGIN
    PERFORM @SCHEMA@.lock_keys(keys);
    t := clock_timestamp();
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        live := NULL;
        DELETE FROM @SCHEMA@.locks l
         WHERE l.key = keys[i] AND l.owner IS NOT DISTINCT FROM p_owner
           AND (p_nonce = '' OR l.nonce = p_nonce)
        RETURNING (l.expires_at IS NULL OR l.expires_at > t) INTO live;
        live := coalesce(live, false);
        IF live THEN
            PERFORM pg_notify(@CHANNEL@, keys[i]);
        END IF;
        out := out || live;
    END LOOP;
    RETURN out;
END;
$$;

-- Sets the lease of every key to `ttl_ms` from now if `p_owner` holds all
-- of them; otherwise changes nothing. Returns -1, or the index (0-based) of
-- the first key not held by the owner.
CREATE OR REPLACE FUNCTION @SCHEMA@.extend(keys text[], p_owner text, ttl_ms bigint)
RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz;
    i integer;
BEGIN
    PERFORM @SCHEMA@.lock_keys(keys);
    t := clock_timestamp();
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        PERFORM 1 FROM @SCHEMA@.locks l
          WHERE l.key = keys[i] AND l.owner IS NOT DISTINCT FROM p_owner
            AND (l.expires_at IS NULL OR l.expires_at > t);
        IF NOT FOUND THEN
            RETURN i - 1;
        END IF;
    END LOOP;
    UPDATE @SCHEMA@.locks l SET expires_at = t + ttl_ms * interval '1 millisecond'
     WHERE l.key = ANY (keys);
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        PERFORM pg_notify(@CHANNEL@, keys[i]);
    END LOOP;
    RETURN -1;
END;
$$;

-- Releases every lock of `p_owner` (through the owner index), or every lock
-- of this schema's table when NULL (DELETE, never TRUNCATE). Expired rows of
-- the owner go too; only live ones are counted and notified.
CREATE OR REPLACE FUNCTION @SCHEMA@.release_all(p_owner text) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz;
    ks text[];
    r record;
    n bigint := 0;
BEGIN
    SELECT array_agg(l.key) INTO ks FROM @SCHEMA@.locks l
     WHERE p_owner IS NULL OR l.owner = p_owner;
    IF ks IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM @SCHEMA@.lock_keys(ks);
    t := clock_timestamp();
    FOR r IN
        DELETE FROM @SCHEMA@.locks l
         WHERE l.key = ANY (ks) AND (p_owner IS NULL OR l.owner = p_owner)
        RETURNING l.key AS key, (l.expires_at IS NULL OR l.expires_at > t) AS live
    LOOP
        IF r.live THEN
            n := n + 1;
            PERFORM pg_notify(@CHANNEL@, r.key);
        END IF;
    END LOOP;
    RETURN n;
END;
$$;

-- Frees the keys whoever holds them. Returns the live holders it freed,
-- with their key's index (0-based). Notifies each freed key.
CREATE OR REPLACE FUNCTION @SCHEMA@.force_release(keys text[])
RETURNS TABLE (idx integer, owner text, token bigint, acquired_at timestamptz,
               held_ms bigint, lease_ms bigint, metadata text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz;
    r record;
    i integer;
BEGIN
    PERFORM @SCHEMA@.lock_keys(keys);
    t := clock_timestamp();
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        DELETE FROM @SCHEMA@.locks l WHERE l.key = keys[i] RETURNING l.* INTO r;
        IF FOUND AND (r.expires_at IS NULL OR r.expires_at > t) THEN
            PERFORM pg_notify(@CHANNEL@, keys[i]);
            idx := i - 1;
            owner := r.owner;
            token := r.token;
            acquired_at := r.acquired_at;
            held_ms := greatest(0, floor(extract(epoch FROM t - r.acquired_at) * 1000))::bigint;
            lease_ms := CASE WHEN r.expires_at IS NOT NULL
                THEN greatest(0, floor(extract(epoch FROM r.expires_at - t) * 1000))::bigint END;
            metadata := r.metadata;
            RETURN NEXT;
        END IF;
    END LOOP;
END;
$$;
