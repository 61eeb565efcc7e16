-- AuthPool on PostgreSQL, version 2: several replicas share the schema.
--
-- Every write now locks the pool row (SELECT ... FOR UPDATE), catches up on
-- what other replicas committed since its own last write, decides, and
-- commits, bumping `version` by one. `writer_epoch` (version 1's
-- single-writer guard) is no longer read or written; it is dropped in a later
-- release, once no server of version 1 can be running (expand, then contract).

-- How many writes have committed: the position in the change log.
ALTER TABLE pool_state ADD COLUMN version bigint NOT NULL DEFAULT 0 CHECK (version >= 0);

-- The change log: one record per committed write, holding the rows it wrote
-- (JSON, see authpool_server/store/changes.py), so that other replicas can
-- bring their memory up to date without reloading everything. Its events are
-- in `events`. Records are kept for a short while only: a replica that falls
-- further behind reloads the whole state.
CREATE TABLE changes (
    version bigint           PRIMARY KEY,
    at      double precision NOT NULL,
    body    text             NOT NULL
);
