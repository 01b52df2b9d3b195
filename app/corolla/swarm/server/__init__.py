"""The block server: serves a span of blocks to the swarm over Petals' RPC protocol.

Which file plays which role:
- server.py: the lifecycle that ties the rest together: join, choose blocks, load, serve, pause, leave;
  announcing.py: what it tells the swarm and learns from it (JOINING, ONLINE, OFFLINE on the DHT,
  rejoining initial peers, next pings, rebalancing, reachability and the relay retake).
- config.py: every setting of a server, one typed object (the `corolla serve` flags map onto it).
- handler.py: the RPC handler (`TransformerConnectionHandler.rpc_*`, names on the wire) and its state;
  the work of each RPC lives in admission.py (caps and refusal accounting, first for every RPC),
  training.py (forward/backward), inference.py (sessions and token steps) and push.py
  (server-to-server push, sending and taking); push_stream.py: between two Corolla servers, pushes on
  one long-lived stream per peer pair instead of an rpc_push call per step.
- streams.py: streaming RPC registration whose error replies reach the caller.
- packing.py: tensors and metadata (read_step / read_call: ../step_metadata.py) in and out of protobuf
  messages, with a limit on every peer-controlled size;
  block_args.py: the optional inputs of a request (deep prompts, padding mask, adapter name).
- compute_queue.py: the one compute thread, fed in priority order; step_batcher.py: continuous batching
  of the token steps waiting for it; forward_graphs.py: recent forward graphs kept for their backward.
- memory_cache.py: the KV-cache budget with Petals' accounting units, all-or-nothing allocation.
- adapters.py: LoRA adapters a request may activate.
- refusals.py: what the server does about peers whose requests it keeps refusing.
- block_selection.py: which blocks to serve and when to move (pure functions).
- throughput.py: local throughput measurement, cached per device, model and dtype;
  pings.py: `next_pings`, round trips to the servers likely to follow this one in a chain.
- stats.py: counters a parent process (the node) reads back, typed, while the server runs (stdlib only).
- open_files.py: the process's limit on open files.
"""
