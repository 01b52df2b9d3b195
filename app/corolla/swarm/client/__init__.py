"""The swarm client: routes through servers, runs inference sessions that survive failures, generates.

- config.py: client settings (timeouts, retries, bans, allowed and blocked servers).
- privacy.py: who may receive the client's hidden states (any server, members of my swarms, only these
  peers, this computer only); routing.py enforces it for every path.
- routing.py: the swarm's spans, pings, bans and the minimum-latency route (pure cost model).
- session.py: inference sessions over a route, with per-span input histories and failover replay.
- remote_model.py: `AutoDistributedModelForCausalLM`: local client parts plus remote blocks, generate().
- generation.py: sampling (temperature, top-k, top-p, repetition penalty, seed) and stop conditions.
- chat.py: chat templates, multi-turn session reuse, UTF-8-safe streaming detokenisation.
- health.py: the swarm's health per model, for `corolla swarm`.
"""
