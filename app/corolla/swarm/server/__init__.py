"""The block server: serves a span of blocks to the swarm over Petals' RPC protocol.

- config.py: every setting of a server, one typed object.
- memory_cache.py: KV-cache budget with Petals' accounting units, all-or-nothing allocation.
- packing.py: tensors and metadata in and out of protobuf messages, with limits on sizes.
- handler.py: the RPC handler (`TransformerConnectionHandler.rpc_*`), inference sessions.
- block_selection.py: which blocks to serve and when to move (pure functions).
- throughput.py: local throughput measurement, cached per device, model and dtype.
- announcer.py: DHT announcements (JOINING, ONLINE, OFFLINE) and reading the swarm's module infos.
- stats.py: counters a parent process can read while the server runs.
- server.py: the lifecycle that ties these together.
"""
