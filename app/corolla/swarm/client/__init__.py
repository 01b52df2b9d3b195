"""The swarm client: routes through servers, runs inference sessions that survive failures, generates.

Which file plays which role:
- config.py: client settings (timeouts, retries, bans, allowed and blocked servers).
- privacy.py: who may receive the client's hidden states (any server, members of my swarms, only these
  peers, this computer only); routing.py enforces it for every path.
- routing.py: the swarm's spans, pings, bans and the minimum-latency route (pure cost model);
  speed.py: how fast each server answers this client (expected step times, deadlines, slow servers).
- session.py: inference sessions over a route, with per-span input histories and failover replay;
  push.py: which downstream sessions a step's output may be pushed to server-to-server;
  speculative.py: multi-token steps drafted by prompt lookup.
- verification.py: spot checks that catch servers returning wrong results.
- remote_forward.py: forward and backward passes through the blocks (training); autograd.py: those
  passes as one differentiable function; prompts.py: trainable prompts (prompt tuning).
- remote_model.py: `AutoDistributedModelForCausalLM`: local client parts plus remote blocks, generate().
- generation.py: what transformers' generate() needs over the swarm: sampling keywords, the cache that
  stands for the servers', per-token stopping criteria.
- chat.py: chat templates, multi-turn session reuse, UTF-8-safe incremental detokenisation.
- health.py: the swarm's health per model (`corolla swarm`, the node's Swarm pane).
"""
