"""Seeded generators of hostile RPC requests: random and mutated protobuf, msgpack and tensor payloads,
built from valid templates so that the fuzzer reaches past the first check as often as it fails it."""

from __future__ import annotations

import functools
import random
import struct

import msgpack
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from corolla.testing.hostile import deep_tuples

ARGS = ((b"__T0", b"__T1", b"__T2"), {})
DTYPES = ["float32", "float16", "bfloat16", "int64", "int8", "bool", "float64", "", "complex64", "x" * 40]
METADATA_KEYS = [
    "max_length",
    "session_id",
    "step_id",
    "start_from_position",
    "alloc_timeout",
    "args_structure",
    "next_servers",
    "points",
    "active_adapter",
]


@functools.cache
def _deep_tuples(depth: int) -> bytes:
    return deep_tuples(depth)


@functools.cache
def _good_tensor(batch: int, length: int, hidden: int, special: str | None) -> runtime_pb2.Tensor:
    """Hidden states of one shape, made once: their values do not matter to the server's checks, and
    making fresh ones for each of tens of thousands of cases was a good part of the fuzzer's time."""
    values = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(batch * 1000 + length))
    if special is not None and values.numel():
        values[0, 0, 0] = float(special)
    return serialize_torch_tensor(values)


SPECIAL_FLOATS = (float("nan"), float("inf"), -1e308, 0.5, -0.0)
PEER_ID_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class RequestFuzzer:
    def __init__(self, seed: int, prefix: str, blocks: int, hidden: int):
        self.rng = r = random.Random(seed)
        self.prefix, self.blocks, self.hidden = prefix, blocks, hidden
        self._scalars = [  # made once: building these lists per call was most of the generators' time
            lambda: r.randint(-(2**63), 2**64 - 1),
            lambda: r.randint(-3, 100),
            lambda: r.choice(SPECIAL_FLOATS),
            lambda: None,
            lambda: r.choice((True, False)),
            lambda: self.text(30, lowest=1),
            lambda: self.raw_bytes(30),
            lambda: b"__T" + str(r.randint(-2, 9)).encode(),
        ]

    def text(self, longest: int, lowest: int = 32) -> str:
        """Up to `longest` random characters below U+2FFF."""
        r = self.rng
        return "".join(map(chr, r.choices(range(lowest, 0x2FFF), k=r.randint(0, longest))))

    def raw_bytes(self, longest: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, longest))

    # --- pieces --------------------------------------------------------------------------------
    def uid(self) -> str:
        r = self.rng
        start = r.randrange(self.blocks)
        end = r.randint(start + 1, self.blocks)
        if r.random() < 0.5:
            return " ".join(f"{self.prefix}.{i}" for i in range(start, end))
        choices = [
            lambda: f"{self.prefix}.{r.randrange(-5, 10**6)}",
            lambda: " ".join(f"{self.prefix}.{r.randrange(self.blocks)}" for _ in range(r.randint(1, 8))),
            lambda: self.text(40),
            lambda: f"{self.prefix}." * r.randint(1, 2000),
            lambda: "",
        ]
        return r.choice(choices)()

    def scalar(self):
        return self.rng.choice(self._scalars)()

    def structure(self, depth: int = 0):
        r = self.rng
        if depth > 4 or r.random() < 0.4:
            return self.scalar()
        kind = r.randrange(3)
        items = [self.structure(depth + 1) for _ in range(r.randint(0, 4))]
        if kind == 0:
            return tuple(items)
        if kind == 1:
            return items
        return {str(self.scalar())[:20]: item for item in items}

    def metadata(self, first: bool) -> bytes:
        r = self.rng
        roll = r.random()
        if roll < 0.05:
            return self.raw_bytes(64)
        if roll < 0.08:
            return msgpack.packb({"args_structure": msgpack.ExtType(0x40, _deep_tuples(r.randint(30, 400)))})
        if roll < 0.10:
            return MSGPackSerializer.dumps(self.structure())
        meta = {"args_structure": ARGS, "session_id": f"s{r.randrange(50)}", "step_id": f"t{r.randrange(10**6)}"}
        if first:
            meta["max_length"] = r.choice([0, 1, 4, 16, 64, r.randint(-5, 10**9)])
        for key in r.sample(METADATA_KEYS, r.randint(0, 3)):
            meta[key] = self.structure()
        raw = MSGPackSerializer.dumps(meta)
        if r.random() < 0.1:  # mutate the encoded bytes
            raw = bytearray(raw)
            for _ in range(r.randint(1, 4)):
                raw[r.randrange(len(raw))] = r.randrange(256)
            raw = bytes(raw[: r.randint(0, len(raw))]) if r.random() < 0.3 else bytes(raw)
        return raw

    def tensor(self, batch: int, length: int) -> runtime_pb2.Tensor:
        r = self.rng
        special = r.choice(["nan", "inf"]) if r.random() < 0.03 else None
        proto = _good_tensor(batch, length, self.hidden, special)
        roll = r.random()
        if roll < 0.6:
            return proto
        mutated = runtime_pb2.Tensor()
        mutated.CopyFrom(proto)
        field = r.randrange(5)
        if field == 0:
            mutated.dtype = r.choice(DTYPES)
        elif field == 1:
            del mutated.size[:]
            mutated.size.extend(r.choice([0, 1, 2, 64, 300, 2**31, 2**31 - 1]) for _ in range(r.randint(0, 6)))
        elif field == 2:
            mutated.buffer = r.randbytes(r.choice([0, 1, 7, 64, 4 * self.hidden]))
        elif field == 3:
            mutated.compression = r.randint(0, 12)
        else:
            mutated.buffer = mutated.buffer[: r.randrange(max(len(mutated.buffer), 1))]
        return mutated

    def tensors(self) -> list[runtime_pb2.Tensor]:
        r = self.rng
        batch, length = r.choice([1, 1, 1, 2, 3]), r.choice([0, 1, 1, 2, 5, 17])
        count = r.choice([0, 1, 2, 3, 3, 3, 9])
        out = [self.tensor(batch, length)]
        for _ in range(count - 1):
            out.append(_EMPTY if r.random() < 0.7 else _hypo_ids(tuple(r.randint(-2, 3) for _ in range(batch))))
        return out[:count]

    # --- whole requests ------------------------------------------------------------------------
    def request(self, first: bool = True) -> runtime_pb2.ExpertRequest:
        request = runtime_pb2.ExpertRequest(uid=self.uid(), tensors=self.tensors(), metadata=self.metadata(first))
        if self.rng.random() < 0.05:  # protobuf-level mutation: flip bytes and parse what is left
            raw = bytearray(request.SerializeToString())
            for _ in range(self.rng.randint(1, 6)):
                if raw:
                    raw[self.rng.randrange(len(raw))] = self.rng.randrange(256)
            mutated = runtime_pb2.ExpertRequest()
            try:
                mutated.ParseFromString(bytes(raw))
                return mutated
            except Exception:
                return runtime_pb2.ExpertRequest()
        return request

    def backward_request(self) -> runtime_pb2.ExpertRequest:
        """A backward request: inputs and grad_outputs of one shape (sometimes not), then fuzzed."""
        request = self.request()
        if request.tensors and self.rng.random() < 0.5:
            del request.tensors[1:]
            request.tensors.append(request.tensors[0] if self.rng.random() < 0.8 else self.tensor(1, 3))
            request.metadata = MSGPackSerializer.dumps({"args_structure": ((b"__T0", b"__T1"), {})})
        return request

    def stream(self) -> list[runtime_pb2.ExpertRequest]:
        count = self.rng.choice([0, 1, 1, 2, 3, 5])
        return [self.request(first=i == 0) for i in range(count)]

    def info_request(self) -> runtime_pb2.ExpertUID:
        return runtime_pb2.ExpertUID(uid=self.uid() if self.rng.random() < 0.8 else "")

    def raw_frames(self) -> bytes:
        """Bytes for a raw stream: valid framing of a fuzzed message, or broken framing."""
        r = self.rng
        body = self.request().SerializeToString()
        roll = r.random()
        if roll < 0.7:
            return b"\x00" + struct.pack(">Q", len(body)) + body
        if roll < 0.8:
            return b"\x00" + struct.pack(">Q", r.randint(0, 2**64 - 1)) + body[:64]
        if roll < 0.9:
            return bytes([r.randrange(256)]) + struct.pack(">Q", len(body)) + body
        return self.raw_bytes(300)


_EMPTY = serialize_torch_tensor(torch.zeros(0))


@functools.lru_cache(maxsize=4096)
def _hypo_ids(values: tuple[int, ...]) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(torch.tensor(values, dtype=torch.int64))


INFO_KEYS = ("start_block", "end_block", "inference_rps", "forward_rps", "network_rps", "cache_tokens_left")
INFO_KEYS += ("public_name", "version", "adapters", "next_pings", "torch_dtype", "using_relay")


class RecordFuzzer(RequestFuzzer):
    """Encoded {subkey: value} entries of one block's DHT record, mostly server infos gone wrong."""

    def __init__(self, seed: int, prefix: str, blocks: int, hidden: int):
        super().__init__(seed, prefix, blocks, hidden)
        r = self.rng
        self._numbers = [
            lambda: r.randint(0, 12),
            lambda: r.randint(-(2**63), 2**64 - 1),
            lambda: r.choice((0.0, 1.5, 1e300, float("inf"), float("nan"), -1.0)),
            self.scalar,
        ]
        self._subkeys = [lambda: PeerID_like(r), lambda: str(self.scalar())[:200], lambda: "x" * r.randint(100, 300)]

    def number(self):
        return self.rng.choice(self._numbers)()

    def info(self):
        r = self.rng
        start = r.randint(-2, self.blocks + 2)
        extra = {"start_block": start, "end_block": start + r.choice([1, 2, 3, 10**9])}
        for key in r.sample(INFO_KEYS, r.randint(0, len(INFO_KEYS))):
            extra[key] = self.number() if r.random() < 0.7 else self.structure()
        if r.random() < 0.1:
            extra["next_pings"] = {str(i): self.number() for i in range(r.randint(0, 100))}
        state = r.choice([2, 2, 2, 1, 0, 3, -1, "2", None])
        throughput = r.choice([1.0, 25.0, 1e300, float("nan"), -3.0, 7, None])
        value = (state, throughput, extra)[: r.choice([3, 3, 3, 2, 1, 0])]
        return value if r.random() < 0.9 else list(value)

    def record(self) -> dict:
        r = self.rng
        entries = {}
        for _ in range(r.choice([0, 1, 2, 5, 40])):
            subkey = r.choice(self._subkeys)()
            value = self.info() if r.random() < 0.85 else self.structure()
            try:
                raw = MSGPackSerializer.dumps(value)
            except Exception:  # not encodable as it stands: send its repr's bytes instead
                raw = repr(value).encode()[:200]
            roll = r.random()
            if roll < 0.08:
                raw = bytearray(raw)
                for _ in range(r.randint(1, 5)):
                    raw[r.randrange(len(raw))] = r.randrange(256)
                raw = bytes(raw)
            elif roll < 0.12:
                raw = msgpack.packb(msgpack.ExtType(0x40, _deep_tuples(r.randint(20, 300))))
            elif roll < 0.14:
                raw = raw[: r.randrange(max(len(raw), 1))]
            entries[subkey] = raw
        return entries


def PeerID_like(r: random.Random) -> str:
    return "12D3KooW" + "".join(r.choices(PEER_ID_ALPHABET, k=44))
