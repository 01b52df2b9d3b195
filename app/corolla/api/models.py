"""The local API's request and response types. The node, the window, the CLI and the tests import this
module (no torch in here), so all sides of the API share one definition."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGE_CHARS = 100_000
MAX_NEW_TOKENS = 2048


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    kind: str
    message: str
    detail: str | None = None


class ContributionStatus(BaseModel):
    state: str
    reason: str
    restarts: int
    last_failure: str | None = None
    pid: int | None = None
    start_block: int | None = None
    end_block: int | None = None
    throughput: float | None = None
    tokens_served: int = 0
    inference_steps: int = 0
    sessions_active: int = 0
    sessions_opened: int = 0
    sessions_peak: int = 0  # the most sessions open at once this run
    # Continuous batching: token steps, the forwards that computed them, and how many sessions each
    # forward carried (bucket label -> forwards).
    token_steps: int = 0
    step_forwards: int = 0
    batch_sizes: dict[str, int] = {}
    cache_bytes_total: int = 0
    cache_bytes_left: int = 0
    uptime_s: float = 0.0
    peer_id: str | None = None
    model_kept: bool = False  # paused with the model loaded (resume takes about a second)


class ModelCard(BaseModel):
    """The embedded default model, named honestly: size, licence, where its weights come from."""

    name: str
    dht_prefix: str
    num_blocks: int
    parameters: int | None = None
    folder_bytes: int | None = None
    license: str
    source: str
    random_weights: bool


class PauseRule(BaseModel):
    """Why contribution is paused by one of the user's rules, and until when (for the window's banner)."""

    rule: Literal["battery", "schedule", "idle"]
    message: str
    until: str | None = None


class Lifetime(BaseModel):
    """What this computer has served since its first contribution (from the node's hourly records)."""

    tokens_served: int = 0
    sessions: int = 0
    uptime_s: float = 0.0
    since: float | None = None


class Reachability(BaseModel):
    """Where this computer stands in the swarm's network (checked when it starts contributing)."""

    state: Literal["not_checked", "checking", "direct", "relay", "unreachable", "unknown", "local"]
    summary: str
    advice: str = ""
    using_relay: bool = False
    relay_addrs: list[str] = Field(default_factory=list)
    checked_at: float | None = None
    relay_proven_at: float | None = None  # "relay": when a peer last reached this computer through one


NOT_CHECKED = Reachability(
    state="not_checked",
    summary="Not checked yet: Corolla checks whether other peers can reach this computer when it contributes.",
)


class Sharing(BaseModel):
    """Who can join this computer's swarm, as the window says it before an invite is shared."""

    choice: Literal["local", "others"] = Field(..., description="This computer only, or Let others join")
    port: int | None = Field(None, description="the TCP port other computers connect to (kept across restarts)")
    lan_addresses: list[str] = Field(default_factory=list)
    sentence: str = Field(..., description="what the choice means, in one sentence")
    outside: Literal["yes", "relay", "no", "unknown"] = Field(..., description="can people in other homes reach it")
    outside_sentence: str
    fixes: list[str] = Field(default_factory=list, description="what makes it reachable from outside")
    port_notice: str | None = Field(None, description="the kept port was taken: a new one, and the invite changed")
    reachable_members: list[str] = Field(
        default_factory=list, description="the members people outside can reach directly (names), this one too"
    )


class NodeStatus(BaseModel):
    version: str
    pid: int
    started_at: float
    model: str
    model_is_demo: bool
    dht_prefix: str | None = Field(None, description="the model's prefix in the swarm; None until the node knows it")
    swarm: str
    contribution: ContributionStatus
    secrets_storage: str
    invite: str | None = None
    interrupted_replies_recovered: int = 0
    model_card: ModelCard | None = None  # set while the node serves its embedded default model
    model_preparing: bool = False  # converting the default model on first start

    awaiting_consent: bool = False
    pause_rule: PauseRule | None = None
    lifetime: Lifetime = Field(default_factory=Lifetime)

    reachability: Reachability = NOT_CHECKED
    sharing: Sharing | None = None  # None on the public swarm


PrivacyLevel = Literal["any", "members", "peers", "local"]
# What each level means, honestly, following benchmarks/privacy.py (the window shows it; one per level).
PRIVACY_SENTENCES = {
    "any": "Any server of the swarm may receive this chat, and the first server of a route can read all of its "
    "text back (later ones about half; see SECURITY.md): keep private things out of it.",
    "members": "Only servers of the private swarms you created or joined receive this chat, and each of them "
    "can read its text back: it is as private as those computers are trustworthy.",
    "peers": "Only the servers you listed receive this chat, and each of them can read its text back: it is "
    "as private as those computers are trustworthy.",
    "local": "Only this computer's own server receives this chat: its text never leaves this computer.",
}
PRIVACY_LABELS = {
    "any": "Any server",
    "members": "Members of my swarms",
    "peers": "Only these peers",
    "local": "This computer only",
}


class PrivacyChoice(Strict):
    """Who may receive a chat's hidden states. "members" and "local" are resolved by the node (its own
    server, the swarms it created or joined); "peers" names them."""

    level: PrivacyLevel = "any"
    peers: list[str] | None = Field(None, max_length=1024, description='peer ids; only for level "peers"')


class Recipient(BaseModel):
    """A server that received a reply's hidden states."""

    peer_id: str
    name: str = ""
    blocks: list[list[int]] = Field(default_factory=list, description="[start, end) ranges it ran")


class ChatCreate(Strict):
    title: str = Field("New chat", max_length=200)
    system_prompt: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)
    privacy: PrivacyChoice | None = Field(None, description="None: the node's default_privacy setting")


class ChatUpdate(Strict):
    title: str | None = Field(None, min_length=1, max_length=200)
    privacy: PrivacyChoice | None = None


class Message(BaseModel):
    id: str
    role: str
    content: str
    status: Literal["complete", "streaming", "interrupted", "stopped", "failed"]
    tokens: int
    created_at: float
    seen_by: list[Recipient] | None = Field(None, description="replies: the servers that received its hidden states")
    finish_reason: Literal["stop", "length"] | None = Field(
        None, description='a complete reply: "stop" (the model ended it) or "length" (cut at max_new_tokens)'
    )


class Chat(BaseModel):
    id: str
    title: str
    model: str | None
    system_prompt: str | None
    created_at: float
    updated_at: float
    privacy: PrivacyChoice | None = None
    messages: list[Message] | None = None


class Sampling(Strict):
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1000)
    repetition_penalty: float = Field(1.0, ge=0.5, le=3.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: list[str] = Field(default_factory=list, max_length=8)

    def generate_kwargs(self) -> dict:
        from corolla.swarm.client.generation import sampling_kwargs  # lazy: the window imports this module

        return sampling_kwargs(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed)


class SendMessage(Sampling):
    content: str = Field(..., min_length=1, max_length=MAX_MESSAGE_CHARS)


class Regenerate(Sampling):
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="0: greedy (the same answer again)")


class Continue(Sampling):
    """Write more of the last answer (one cut at max_new_tokens), appended to it."""


class HfToken(Strict):
    # Printable ASCII without spaces, as Hugging Face tokens are: the token goes into the block server's
    # environment, where a NUL or a newline cannot go (the fuzz test found a 500 there).
    token: str | None = Field(None, max_length=512, pattern=r"^[!-~]*$", description="None removes the stored token")


class CheckServer(Strict):
    peer_id: str = Field(..., min_length=1, max_length=128)


class Invite(Strict):
    # Bounded here only against abuse; the invite reader says in a sentence when one is too long.
    invite: str = Field(..., max_length=1 << 20)


class ActionResult(BaseModel):
    ok: bool
    message: str


class LanSwarm(BaseModel):
    name: str
    model: str
    dht_prefix: str
    peers: list[str]
    invite: str = Field(..., description="POST it to /api/settings/join to join this swarm")
    seen_at: float


class LanSwarms(BaseModel):
    enabled: bool = Field(..., description="the lan_discovery setting")
    announcing: bool
    not_announced_because: str | None = None
    swarms: list[LanSwarm]


# --- responses the window reads (GET /api/swarm, /api/hardware, /api/stats/history, ...) --------------
# Plain BaseModel (unknown fields ignored): a newer node may add fields without breaking an older window.


class ServerVerification(BaseModel):
    """The node's verdict on a server from spot checks."""

    state: str = Field(..., description="verified, unverified or flagged (a window skips a state it does not know)")
    checks: int = 0
    evidence: dict[str, Any] | None = Field(None, description="a flagged server's evidence (what was compared)")


class ServerSpeed(BaseModel):
    """This client's step times of a server against what it announces."""

    state: str = Field(..., description="slow, measured or unmeasured (a window skips a state it does not know)")
    steps: int = 0
    step_s: float | None = None
    stalls: int = 0
    evidence: dict[str, Any] | None = Field(None, description="a slow server's evidence (times_slower, kind, detail)")


class SwarmServer(BaseModel):
    """One server of a model, as the DHT announces it, with the node's verdicts."""

    peer_id: str
    state: str = Field(..., description="ONLINE, JOINING or OFFLINE")
    start_block: int
    end_block: int
    throughput: float
    inference_rps: float | None = None
    version: str | None = None
    corolla_version: str | None = None
    using_relay: bool | None = None
    cache_tokens_left: int | None = None
    public_name: str | None = None
    torch_dtype: str | None = None
    quant_type: str | None = None
    ping_ms: float | None = None
    free_cache_tokens: int | None = None
    this_computer: bool = False
    verification: ServerVerification | None = None  # None from a node that does not check servers
    speed: ServerSpeed | None = None  # None from an older node


class RouteHop(BaseModel):
    peer_id: str
    start: int
    end: int


class SwarmModel(BaseModel):
    """One model of the swarm: its servers, coverage per block and (for the node's model) the route."""

    dht_prefix: str
    num_blocks: int
    repository: str | None = None
    servers: list[SwarmServer] = Field(default_factory=list)
    online_per_block: list[int] = Field(default_factory=list)
    healthy: bool = False
    missing_blocks: list[int] = Field(default_factory=list)
    route: list[RouteHop] = Field(default_factory=list, description="the chain a new chat would take now")


class ServerCheck(BaseModel):
    """The verdict of one server checked on purpose (POST /api/swarm/check)."""

    peer_id: str
    state: str = Field(..., description="verified, unverified or flagged")
    detail: str | None = None
    max_error: float | None = None
    compared_with: list[str] = Field(default_factory=list)
    evidence: dict[str, Any] | None = None


class Accelerator(BaseModel):
    kind: str = Field(..., description="cuda, mps or cpu")
    index: int | None = None
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: str | None = None
    source: str = "torch"


class BlockPlan(BaseModel):
    """Memory per block and how many blocks fit here."""

    model: str
    family: str
    num_blocks: int
    dtype: str
    quant_type: str
    bytes_per_block: int
    cache_bytes_per_block: int
    client_bytes: int
    device: str
    usable_bytes: int
    recommended_blocks: int


class HardwareReport(BaseModel):
    os: str
    cpu: str
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    accelerators: list[Accelerator] = Field(default_factory=list)
    plan: BlockPlan | None = None


class HourStats(BaseModel):
    """What this computer served in one hour (GET /api/stats/history)."""

    hour: int = Field(..., description="hours since the epoch")
    tokens_served: int = 0
    sessions: int = 0
    inference_steps: int = 0
    uptime_s: float = 0.0


class ServerLog(BaseModel):
    log: str


class Ping(BaseModel):
    ok: bool
    version: str
