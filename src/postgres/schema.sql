-- lockstep's PostgreSQL schema. Idempotent: every provider that connects
-- with `create_schema` runs it, in one implicit transaction (a simple query
-- of several statements), serialised by an advisory lock so that two
-- providers starting at once do not race on the catalog.
--
-- Placeholders, substituted by config.rs after validating the schema name
-- ([a-z_][a-z0-9_]*, at most 63 bytes): @SCHEMA@ (the quoted identifier),
-- @SCHEMA_LIT@ (the name as a string literal).
--
-- Every function is called as ONE statement: its own transaction, one round
-- trip. Mutating functions first take transaction-level advisory locks on
-- the hashes of their keys, distinct and in ascending order (two requests
-- with opposite key orders lock in the same order: no deadlock), released
-- when the statement commits. Leases use the server's clock only.

SELECT pg_advisory_xact_lock(hashtext('lockstep-ddl'));

-- The provider's connections may commit asynchronously (an option); the schema
-- itself must survive a crash.
SELECT set_config('synchronous_commit', 'on', true);

CREATE SCHEMA IF NOT EXISTS @SCHEMA@;

CREATE TABLE IF NOT EXISTS @SCHEMA@.locks (
    key          text PRIMARY KEY,
    owner        text NULL,        -- NULL: anonymous (or a reservation)
    nonce        text NOT NULL,    -- the acquisition that took it ('' for a reservation,
                                   -- '!' once re-entered: no undo matches it then)
    token        bigint NOT NULL,  -- the newest fencing token (re-entries too)
    acquired_at  timestamptz NOT NULL,
    expires_at   timestamptz NULL, -- NULL: no expiry
    metadata     text NULL,
    -- Not NULL: no lock but a reservation, for the waiting provider (pid)
    -- at the head of the key's queue, until expires_at.
    reserved_for text NULL
);
ALTER TABLE @SCHEMA@.locks ADD COLUMN IF NOT EXISTS reserved_for text NULL;

CREATE INDEX IF NOT EXISTS locks_owner ON @SCHEMA@.locks (owner) WHERE owner IS NOT NULL;

-- The wait queues: which providers (processes, by their random pid, which
-- names their NOTIFY channel "lockstep.<pid>") wait for a key, in arrival
-- order (seq). At most one entry per provider, key and kind: a handoff
-- entry (a single-key waiter: a release reserves the lock for the first
-- such provider) or a wake-only one (multi-key waiters, told to retry). A
-- provider's further waiters for the key queue in its memory, behind its
-- entry. An entry lives until expires_at unless refreshed: a provider that
-- dies leaves nothing that outlasts it by much.
CREATE TABLE IF NOT EXISTS @SCHEMA@.queue (
    key        text NOT NULL,
    pid        text NOT NULL,
    handoff    boolean NOT NULL,
    seq        bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (key, pid, handoff)
);

CREATE INDEX IF NOT EXISTS queue_order ON @SCHEMA@.queue (key, seq);

CREATE SEQUENCE IF NOT EXISTS @SCHEMA@.queue_seq AS bigint;

-- Fencing tokens: one sequence for every key, so a key's tokens grow across
-- release and expiry. Across a crash (a commit of the last moments lost with
-- the sequence's advance, under synchronous_commit off) the sequence is
-- floored at the server's clock in microseconds once per server start, before
-- any token is handed out: see floor_tokens.
CREATE SEQUENCE IF NOT EXISTS @SCHEMA@.tokens AS bigint;

-- The postmaster start the tokens were last floored for.
CREATE TABLE IF NOT EXISTS @SCHEMA@.floor (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    started timestamptz NOT NULL
);

-- Old signatures (before the wait queues), so that only one of each remains.
DROP FUNCTION IF EXISTS @SCHEMA@.acquire(text[], text, text, bigint, text);
DROP FUNCTION IF EXISTS @SCHEMA@.release(text[], text, text);
DROP FUNCTION IF EXISTS @SCHEMA@.release_all(text);
DROP FUNCTION IF EXISTS @SCHEMA@.force_release(text[]);
DROP FUNCTION IF EXISTS @SCHEMA@.release(text[], text, text, text, bigint);

-- Takes the advisory locks of `keys`, sorted by hash.
CREATE OR REPLACE FUNCTION @SCHEMA@.lock_keys(keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF array_length(keys, 1) = 1 THEN
        PERFORM pg_advisory_xact_lock(hashtext(@SCHEMA_LIT@), hashtext(keys[1]));
        RETURN;
    END IF;
    -- One statement: the subquery (not flattened, for its DISTINCT) hands
    -- the hashes over in order.
    PERFORM pg_advisory_xact_lock(hashtext(@SCHEMA_LIT@), s.h)
       FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(keys) AS k ORDER BY 1) AS s;
END;
$$;

-- Once per backend (a session setting caches it, which callers test before
-- calling: a call costs more than the test; every backend after a restart
-- is new): if the server started since the tokens were last floored,
-- moves the sequence up to the clock in microseconds. Tokens handed out
-- before are below it: fewer than one per microsecond since the last floor.
CREATE OR REPLACE FUNCTION @SCHEMA@.floor_tokens() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz;
BEGIN
    IF current_setting('lockstep.floored_' || @SCHEMA_LIT@, true) = 'y' THEN
        RETURN;
    END IF;
    -- A one-key advisory lock: a space of its own, apart from the keys'
    -- two-key locks (a key's hash may be anything, 0 included).
    PERFORM pg_advisory_xact_lock(hashtext(@SCHEMA_LIT@ || ' floor'));
    SELECT f.started INTO started FROM @SCHEMA@.floor f;
    IF started IS DISTINCT FROM pg_postmaster_start_time() THEN
        PERFORM setval(@SCHEMA_LIT@ || '.tokens', greatest(
            (SELECT last_value FROM @SCHEMA@.tokens),
            floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint));
        INSERT INTO @SCHEMA@.floor AS f (started) VALUES (pg_postmaster_start_time())
        ON CONFLICT (one) DO UPDATE SET started = excluded.started;
    END IF;
    PERFORM set_config('lockstep.floored_' || @SCHEMA_LIT@, 'y', false);
END;
$$;

-- Serves the queue of the free key `k`: takes entries from its head,
-- skipping expired ones, tells each wake-only provider to retry, and
-- reserves the lock (until t + claim_ms) for the first handoff entry's
-- provider, which it tells too. `me` (the caller's provider) is not told:
-- the result says what it would have heard, 1 (reserved for it) + 2 (its
-- multi-key waiters should retry), so that the reply carries it.
CREATE OR REPLACE FUNCTION @SCHEMA@.serve_queue(k text, t timestamptz, claim_ms bigint, me text)
RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    e record;
    mine integer := 0;
BEGIN
    LOOP
        DELETE FROM @SCHEMA@.queue q
         WHERE (q.key, q.pid, q.handoff) IN (
             SELECT h.key, h.pid, h.handoff FROM @SCHEMA@.queue h
              WHERE h.key = k ORDER BY h.seq LIMIT 1)
        RETURNING q.pid, q.handoff, q.expires_at INTO e;
        IF NOT FOUND THEN
            RETURN mine;
        END IF;
        CONTINUE WHEN e.expires_at <= t;
        IF me IS NOT DISTINCT FROM e.pid THEN
            mine := mine | CASE WHEN e.handoff THEN 1 ELSE 2 END;
        ELSE
            PERFORM pg_notify('lockstep.' || e.pid, CASE WHEN e.handoff THEN 'r' ELSE 'w' END || k);
        END IF;
        IF e.handoff THEN
            INSERT INTO @SCHEMA@.locks AS l
                   (key, owner, nonce, token, acquired_at, expires_at, metadata, reserved_for)
            VALUES (k, NULL, '', 0, t, t + claim_ms * interval '1 millisecond', NULL, e.pid)
            ON CONFLICT (key) DO UPDATE
               SET owner = NULL, nonce = '', token = 0, acquired_at = excluded.acquired_at,
                   expires_at = excluded.expires_at, metadata = NULL,
                   reserved_for = excluded.reserved_for;
            RETURN mine;
        END IF;
    END LOOP;
END;
$$;

-- All or nothing. Success: one row per key, in order, with its token and
-- whether it was re-entered. A key held by someone else (or reserved for
-- another provider): one row with the key's index (0-based), a NULL token,
-- and the lease (or reservation) left in ms (NULL: no expiry); no lock is
-- written, but with p_queue the provider p_pid is queued for that key, once,
-- with an entry of kind p_handoff (an entry it has keeps its place and lives
-- on until now + queue_ms). p_pid NULL: no queue at all (a single attempt).
--
-- p_claim: the caller is p_pid's first local waiter for the (single) key: a
-- reservation for p_pid counts as free. On success of a claim or of a
-- multi-key call, p_pid's entries of its kind for the keys go, unless
-- p_more (p_pid has more local waiters of that kind): then a handoff entry
-- moves to the back of the queue (round robin between providers).
CREATE OR REPLACE FUNCTION @SCHEMA@.acquire(
    keys text[], p_owner text, p_nonce text, ttl_ms bigint, p_metadata text,
    p_pid text, p_handoff boolean, p_queue boolean, p_claim boolean, p_more boolean,
    queue_ms bigint
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
        SELECT l.owner, l.expires_at, l.reserved_for INTO r
          FROM @SCHEMA@.locks l WHERE l.key = keys[i];
        IF NOT FOUND OR (r.expires_at IS NOT NULL AND r.expires_at <= t)
           OR (p_claim AND r.reserved_for = p_pid) THEN
            re := re || false;
        ELSIF r.reserved_for IS NULL AND p_owner IS NOT NULL AND r.owner = p_owner THEN
            re := re || true;
        ELSE
            IF p_pid IS NOT NULL AND p_queue THEN
                INSERT INTO @SCHEMA@.queue AS q (key, pid, handoff, seq, expires_at)
                VALUES (keys[i], p_pid, p_handoff, nextval('@SCHEMA@.queue_seq'::regclass),
                        t + queue_ms * interval '1 millisecond')
                ON CONFLICT (key, pid, handoff) DO UPDATE
                   SET expires_at = greatest(q.expires_at, excluded.expires_at);
            END IF;
            idx := i - 1;
            lease_ms := CASE WHEN r.expires_at IS NOT NULL
                THEN ceil(extract(epoch FROM r.expires_at - t) * 1000)::bigint END;
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;
    IF current_setting('lockstep.floored_' || @SCHEMA_LIT@, true) IS DISTINCT FROM 'y' THEN
        PERFORM @SCHEMA@.floor_tokens();
    END IF;
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        tok := nextval('@SCHEMA@.tokens'::regclass);
        IF re[i] THEN
            -- The lock is this call's too now: the undo of the acquisition
            -- that took it (by its nonce, its reply lost) must leave it.
            UPDATE @SCHEMA@.locks l
               SET token = tok, expires_at = coalesce(t + lease, l.expires_at), nonce = '!'
             WHERE l.key = keys[i];
        ELSE
            INSERT INTO @SCHEMA@.locks AS l
                   (key, owner, nonce, token, acquired_at, expires_at, metadata, reserved_for)
            VALUES (keys[i], p_owner, p_nonce, tok, t, t + lease, p_metadata, NULL)
            ON CONFLICT (key) DO UPDATE
               SET owner = excluded.owner, nonce = excluded.nonce, token = excluded.token,
                   acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
                   metadata = excluded.metadata, reserved_for = NULL;
        END IF;
        idx := i - 1;
        token := tok;
        reentered := re[i];
        lease_ms := NULL;
        RETURN NEXT;
    END LOOP;
    IF p_pid IS NOT NULL AND (p_claim OR NOT p_handoff) THEN
        IF NOT p_more THEN
            DELETE FROM @SCHEMA@.queue q
             WHERE q.key = ANY (keys) AND q.pid = p_pid AND q.handoff = p_handoff;
        ELSIF p_handoff THEN
            INSERT INTO @SCHEMA@.queue AS q (key, pid, handoff, seq, expires_at)
            VALUES (keys[1], p_pid, true, nextval('@SCHEMA@.queue_seq'::regclass),
                    t + queue_ms * interval '1 millisecond')
            ON CONFLICT (key, pid, handoff) DO UPDATE
               SET seq = excluded.seq, expires_at = excluded.expires_at;
        END IF;
    END IF;
END;
$$;

-- A provider's waiters for `keys` are gone: its queue entries go, and a
-- lock reserved for it is passed on (serve_queue).
CREATE OR REPLACE FUNCTION @SCHEMA@.withdraw(keys text[], p_pid text, claim_ms bigint)
RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz;
    k text;
BEGIN
    PERFORM @SCHEMA@.lock_keys(keys);
    t := clock_timestamp();
    DELETE FROM @SCHEMA@.queue q WHERE q.key = ANY (keys) AND q.pid = p_pid;
    FOR k IN
        DELETE FROM @SCHEMA@.locks l WHERE l.key = ANY (keys) AND l.reserved_for = p_pid
        RETURNING l.key
    LOOP
        PERFORM @SCHEMA@.serve_queue(k, t, claim_ms, NULL);
    END LOOP;
END;
$$;

-- Releases the keys held by `p_owner` (NULL: anonymous locks only); with a
-- nonce other than '' only what that acquisition took (an undo). Per key,
-- flags: 1 a live lock was released (not: not held by the owner, or
-- expired), 2 the key is now reserved for `me` (the caller's provider: its
-- next local waiter claims it), 4 `me`'s multi-key waiters should retry, 8
-- the lock went straight to `me`'s waiter offered in next_* (below).
-- Every key whose row went has its queue served.
--
-- next_nonce not NULL (a single key): the caller offers its provider's
-- first local waiter for the key (its owner, a fresh nonce, its lease and
-- metadata, and whether more local waiters are behind it). If the lock
-- would be reserved for `me`, it is taken for that waiter instead, with a
-- new token, appended to the result after the flags.
CREATE OR REPLACE FUNCTION @SCHEMA@.release(
    keys text[], p_owner text, p_nonce text, me text, claim_ms bigint,
    next_owner text, next_nonce text, next_ttl_ms bigint, next_metadata text, next_more boolean
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz;
    out bigint[] := '{}';
    live boolean;
    e record;
    served integer;
    tok bigint;
    i integer;
    waiting text[];
BEGIN
    PERFORM @SCHEMA@.lock_keys(keys);
    t := clock_timestamp();
    -- The hand-off within one provider, in place: when the offering
    -- provider heads the queue, the lock row is rewritten for its waiter
    -- and its queue entry moves to the back (or goes), two writes where
    -- release, reservation and claim would take five.
    IF next_nonce IS NOT NULL AND array_length(keys, 1) = 1 THEN
        SELECT q.pid, q.handoff, q.expires_at INTO e
          FROM @SCHEMA@.queue q WHERE q.key = keys[1] ORDER BY q.seq LIMIT 1;
        IF FOUND AND e.pid = me AND e.handoff AND e.expires_at > t THEN
            SELECT (l.expires_at IS NULL OR l.expires_at > t) INTO live
              FROM @SCHEMA@.locks l
             WHERE l.key = keys[1] AND l.reserved_for IS NULL
               AND l.owner IS NOT DISTINCT FROM p_owner
               AND (p_nonce = '' OR l.nonce = p_nonce);
            IF FOUND THEN
                IF current_setting('lockstep.floored_' || @SCHEMA_LIT@, true) IS DISTINCT FROM 'y' THEN
                    PERFORM @SCHEMA@.floor_tokens();
                END IF;
                tok := nextval('@SCHEMA@.tokens'::regclass);
                UPDATE @SCHEMA@.locks l
                   SET owner = next_owner, nonce = next_nonce, token = tok, acquired_at = t,
                       expires_at = CASE WHEN next_ttl_ms > 0
                           THEN t + next_ttl_ms * interval '1 millisecond' END,
                       metadata = next_metadata
                 WHERE l.key = keys[1];
                IF next_more THEN
                    UPDATE @SCHEMA@.queue q
                       SET seq = nextval('@SCHEMA@.queue_seq'::regclass),
                           expires_at = t + interval '5 seconds' -- QUEUE_MS (acquire.rs)
                     WHERE q.key = keys[1] AND q.pid = me AND q.handoff;
                ELSE
                    DELETE FROM @SCHEMA@.queue q
                     WHERE q.key = keys[1] AND q.pid = me AND q.handoff;
                END IF;
                RETURN ARRAY[(CASE WHEN live THEN 1 ELSE 0 END) | 8, tok]::bigint[];
            END IF;
        END IF;
    END IF;
    -- The keys anyone queues for (usually none): only theirs are served.
    waiting := ARRAY(SELECT DISTINCT q.key FROM @SCHEMA@.queue q WHERE q.key = ANY (keys));
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        DELETE FROM @SCHEMA@.locks l
         WHERE l.key = keys[i] AND l.reserved_for IS NULL
           AND l.owner IS NOT DISTINCT FROM p_owner
           AND (p_nonce = '' OR l.nonce = p_nonce)
        RETURNING (l.expires_at IS NULL OR l.expires_at > t) INTO live;
        IF NOT FOUND THEN
            out := out || 0::bigint;
            CONTINUE;
        END IF;
        served := CASE WHEN keys[i] = ANY (waiting)
            THEN @SCHEMA@.serve_queue(keys[i], t, claim_ms, me) ELSE 0 END;
        IF served & 1 = 1 AND next_nonce IS NOT NULL AND array_length(keys, 1) = 1 THEN
            IF current_setting('lockstep.floored_' || @SCHEMA_LIT@, true) IS DISTINCT FROM 'y' THEN
                PERFORM @SCHEMA@.floor_tokens();
            END IF;
            tok := nextval('@SCHEMA@.tokens'::regclass);
            UPDATE @SCHEMA@.locks l
               SET owner = next_owner, nonce = next_nonce, token = tok, acquired_at = t,
                   expires_at = CASE WHEN next_ttl_ms > 0
                       THEN t + next_ttl_ms * interval '1 millisecond' END,
                   metadata = next_metadata, reserved_for = NULL
             WHERE l.key = keys[i];
            IF next_more THEN
                INSERT INTO @SCHEMA@.queue AS q (key, pid, handoff, seq, expires_at)
                VALUES (keys[i], me, true, nextval('@SCHEMA@.queue_seq'::regclass),
                        t + interval '5 seconds') -- QUEUE_MS (acquire.rs)
                ON CONFLICT (key, pid, handoff) DO UPDATE
                   SET seq = excluded.seq, expires_at = excluded.expires_at;
            END IF;
            served := served - 1 + 4;
        END IF;
        out := out || (CASE WHEN live THEN 1 ELSE 0 END | (served << 1))::bigint;
    END LOOP;
    IF tok IS NOT NULL THEN
        out := out || tok;
    END IF;
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
          WHERE l.key = keys[i] AND l.reserved_for IS NULL
            AND l.owner IS NOT DISTINCT FROM p_owner
            AND (l.expires_at IS NULL OR l.expires_at > t);
        IF NOT FOUND THEN
            RETURN i - 1;
        END IF;
    END LOOP;
    UPDATE @SCHEMA@.locks l SET expires_at = t + ttl_ms * interval '1 millisecond'
     WHERE l.key = ANY (keys);
    RETURN -1;
END;
$$;

-- Releases every lock of `p_owner` (through the owner index), or every lock
-- and reservation of this schema's table when NULL (DELETE, never
-- TRUNCATE). Expired rows of the owner go too; only live locks are counted.
-- Each freed key has its queue served.
CREATE OR REPLACE FUNCTION @SCHEMA@.release_all(p_owner text, claim_ms bigint) RETURNS bigint
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
        RETURNING l.key AS key,
                  l.reserved_for IS NULL AND (l.expires_at IS NULL OR l.expires_at > t) AS live
    LOOP
        IF r.live THEN
            n := n + 1;
        END IF;
        PERFORM @SCHEMA@.serve_queue(r.key, t, claim_ms, NULL);
    END LOOP;
    RETURN n;
END;
$$;

-- Frees the keys whoever holds them. Returns the live holders it freed,
-- with their key's index (0-based). Each freed key has its queue served.
CREATE OR REPLACE FUNCTION @SCHEMA@.force_release(keys text[], claim_ms bigint)
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
        CONTINUE WHEN NOT FOUND;
        PERFORM @SCHEMA@.serve_queue(keys[i], t, claim_ms, NULL);
        IF r.reserved_for IS NULL AND (r.expires_at IS NULL OR r.expires_at > t) THEN
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

-- Deletes rows that no longer mean anything: expired locks and lapsed
-- reservations (a key nobody takes again would keep its row for ever), and
-- expired queue entries (of providers that died), at most `batch` keys of
-- each. Each key is taken like every other function takes it (its
-- transaction-level advisory lock, without waiting: a key in use is left
-- for the next sweep), so that no function finds a row gone between its
-- check and its write. Returns how many rows went.
CREATE OR REPLACE FUNCTION @SCHEMA@.sweep(batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    k text;
    n bigint := 0;
    m bigint;
BEGIN
    FOR k IN
        (SELECT x.key FROM @SCHEMA@.locks x WHERE x.expires_at <= clock_timestamp() LIMIT batch)
        UNION
        (SELECT x.key FROM @SCHEMA@.queue x WHERE x.expires_at <= clock_timestamp() LIMIT batch)
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext(@SCHEMA_LIT@), hashtext(k));
        DELETE FROM @SCHEMA@.locks l WHERE l.key = k AND l.expires_at <= clock_timestamp();
        GET DIAGNOSTICS m = ROW_COUNT;
        n := n + m;
        DELETE FROM @SCHEMA@.queue q WHERE q.key = k AND q.expires_at <= clock_timestamp();
        GET DIAGNOSTICS m = ROW_COUNT;
        n := n + m;
    END LOOP;
    RETURN n;
END;
$$;
