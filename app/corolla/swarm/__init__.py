"""Petals-compatible swarm code: model engine, block server, client. No Qt and no HTTP in here.

- protocol.py: the Petals 2.x wire contract: DHT keys and values, uids, handler names, limits, errors;
  step_metadata.py: the typed metadata of the block RPCs (inference steps, pushes, forward/backward),
  encoded once by the client and decoded once, bounded, by the server.
- dht_records.py: reading and writing Petals' DHT records (per-block server infos, the model index).
- peers.py: starting and stopping hivemind peers; bootstrap.py: a bootstrap peer (DHT, relay, checks).
- reachability.py: whether other peers can dial this one; relays.py: libp2p circuit relays.
- steptrace.py: per-step timestamps for latency diagnosis (off unless COROLLA_STEP_TRACE is set).
- models/: the model engine (one adapter per architecture family); server/: the block server;
  client/: the swarm client.
"""
