"""`make bench`: throughput and latency of the AuthPool server against a no-op baseline.

Three processes, so that the figures are those of a real deployment shape:

* `bench.server` runs a real `authpool_server.server.Server` with the durable
  SQLite store (WAL, synchronous=FULL) in a fresh data directory under
  ``var/bench``;
* `bench.load` is the load generator: a grpc.aio client with N concurrent
  closed-loop workers on one channel, warm-up then a fixed measured window;
  one process per scenario (or several, with ``--clients``);
* `bench.__main__` orchestrates, prints a table and writes
  ``var/bench/latest.json``;
* `bench.soak` (a million lifecycles through the pool in-process, on a
  simulated clock), `bench.soak_rpc` (lifecycles through a server process)
  and `bench.scale` (1,000 subscriptions, 15,000 leases, a million usage
  records: restart time and Allocate at scale) are the long phases, each
  its own process, run after the servers above have stopped.

The baseline is grpc.health.v1.Health/Check on the same server: the same
grpc.aio server stack with no application work, so the ratios to it are the
cost of AuthPool itself. Machines are shared and noisy, so the ratios within
one run are what counts; the baseline is measured before and after the
AuthPool scenarios and pooled, and both halves are recorded.
"""
