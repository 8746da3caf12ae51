"""What the tests share: the only place a test module imports helpers from.

The rules the tests follow are in ``tests/README.md``. Modules:

* :mod:`.payloads` - pose frames and batches, tokens, request headers;
* :mod:`.service` - the real service in this process on a loopback port (with CORS too);
* :mod:`.processes` - the service, the sink and other programs as child processes;
* :mod:`.ports` - the one ``free_port``;
* :mod:`.ready` - the one readiness wait, and ``poll`` for any other condition;
* :mod:`.s3` - the AWS environment and the moto S3 server (fixtures ``s3_server``...);
* :mod:`.nats` - a real 3-node NATS JetStream cluster (fixture ``nats_cluster``);
* :mod:`.router` - the session routers (Envoy, HAProxy) on loopback, stub backends;
* :mod:`.pg` - real Postgres (fixtures ``pg_admin_url``, ``pg_url``, ``pg_db``) and events;
* :mod:`.wsclient` - the WebSocket client; :mod:`.rawhttp` - a raw HTTP/1.1 client;
* :mod:`.faults` - failure injection, and everything a fault test needs as ``fu``;
* :mod:`.datadir` - what a service left in its data directory;
* :mod:`.metrics` - a parsed ``/metrics`` scrape;
* :mod:`.harness` - a supervisor with in-memory storage, no HTTP;
* :mod:`.fleet` - a fleet on loopback for the system test: instances, HAProxy, an event
  recorder, browser-like session clients, the single-process reference;
* :mod:`.browser`, :mod:`.media`, :mod:`.static_files` - Chromium, test media, a file server.

``tests/conftest.py`` registers the fixtures of :mod:`.pg`, :mod:`.s3` and :mod:`.nats`.
"""
