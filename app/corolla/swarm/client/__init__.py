"""The swarm client: routes through servers, runs inference sessions that survive failures, generates.

Which file plays which role:
- config.py: client settings (timeouts, retries, bans, allowed and blocked servers).
- privacy.py: who may receive the client's hidden states (any server, members of my swarms, only these
  peers, this computer only); routing.py enforces it for every path.
- routing.py: the swarm's spans, pings, bans and the minimum-latency route (pure cost model);
  speed.py: how fast each server answers this client (expected step times, deadlines, slow servers).
- streams.py: one rpc_inference stream to one server (its input history) and the one replay that fills
  new servers' caches; session.py: inference sessions over a route (and their restart after a caught
  liar); failover.py: replacing failed servers, hedging overdue steps, leaving slow servers;
  push.py: which downstream sessions a step's output may be pushed to server-to-server;
  speculative.py: multi-token steps drafted by prompt lookup.
- verification.py: spot checks that catch servers returning wrong results; ledger.py: what this client
  knows of each server's honesty; server_check.py: checking one server on purpose.
- local_edges.py: the first and last k blocks run by the client itself (privacy option, off by default).
- remote_forward.py: forward and backward passes through the blocks (training); autograd.py: those
  passes as one differentiable function; prompts.py: trainable prompts (prompt tuning).
- remote_model.py: `AutoDistributedModelForCausalLM`: local client parts plus remote blocks;
  remote_generation.py: its generate(); remote_session.py: the synchronous session the Python API shows;
  client_loop.py: the event loop its P2P objects live on.
- generation.py: what transformers' generate() needs over the swarm: sampling keywords, the cache that
  stands for the servers', per-token stopping criteria.
- chat.py: chat templates, multi-turn session reuse, UTF-8-safe incremental detokenisation.
- health.py: the swarm's health per model (`corolla swarm`, the node's Swarm pane).
"""
