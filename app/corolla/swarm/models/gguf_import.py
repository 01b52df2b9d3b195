"""Turn a GGUF file (llama.cpp's format) into an ordinary checkpoint folder Corolla and stock Petals serve.

The weights are read and de-quantized by transformers' own GGUF loader (through the `gguf` package);
this module checks the file first, so that a wrong, cut or damaged file, or one Corolla cannot serve,
fails in seconds with a message a person can act on, and then writes the folder atomically: everything
goes to a hidden temporary folder next to OUT, renamed to OUT only once complete. A failed or
interrupted import leaves nothing behind (a leftover of a killed import is removed by the next one).

The folder: config.json (with `dht_prefix`, plus the legacy keys transformers 4.x and so stock Petals
read), safetensors shards with an index, the tokenizer with its chat template, generation_config.json,
and corolla-import.json saying where the weights came from.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from corolla.swarm.models.errors import CheckpointError, EngineError, UnsupportedArchitectureError

GGUF_MAGIC = b"GGUF"
IMPORT_RECORD = "corolla-import.json"
# GGUF architectures whose transformers model type has another name.
_MODEL_TYPE_OF_ARCH = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Float types stored as they are; every other GGUF tensor type is a quantization.
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

Progress = Callable[[str], None]


class GgufImportError(EngineError):
    """A GGUF file that cannot be imported, or an output that cannot be written."""


class NotGgufError(GgufImportError):
    """The file is not a GGUF file at all."""


class CorruptGgufError(GgufImportError, CheckpointError):
    """The file starts like a GGUF file but is cut short or damaged."""


class UnsupportedGgufError(GgufImportError, UnsupportedArchitectureError):
    """An architecture or tensor type that transformers or Corolla cannot convert or serve."""


class OutputExistsError(GgufImportError):
    """OUT exists already and --force was not given."""


class DiskFullError(GgufImportError):
    """Not enough free space where OUT goes."""


@dataclass(frozen=True)
class GgufSummary:
    """What the file's header says, checked for consistency with the file's size."""

    path: Path
    architecture: str
    model_type: str
    name: str | None
    license: str | None
    num_parameters: int
    tensor_types: dict[str, int]
    file_bytes: int

    @property
    def quantized(self) -> bool:
        return any(t not in _FLOAT_TYPES for t in self.tensor_types)

    def default_dtype(self) -> str:
        """bfloat16 for quantized weights (de-quantized values fit it well); else the file's float type."""
        if self.quantized:
            return "bfloat16"
        dominant = max(self.tensor_types.items(), key=lambda item: item[1])[0]
        return _FLOAT_TYPES[dominant]


@dataclass
class ImportResult:
    folder: Path
    dht_prefix: str
    model_type: str
    torch_dtype: str
    num_parameters: int
    seconds: float
    source: dict = field(default_factory=dict)


def read_gguf_summary(path: str | os.PathLike) -> GgufSummary:
    """Check that `path` is a complete GGUF file of an architecture Corolla serves, with tensor types the
    `gguf` package can de-quantize. Raises a GgufImportError subclass otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except IsADirectoryError as exc:
        raise NotGgufError(f"{path} is a folder, not a GGUF file") from exc
    except OSError as exc:
        raise GgufImportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC:
        raise NotGgufError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    # transformers' own header reader: it reads the metadata and the tensor table without building an
    # object per vocabulary entry (gguf's GGUFReader takes ~100x longer on a 49 k-token vocabulary).
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(str(path))
        architecture = _text(metadata, "general.architecture")
        header = GgufHeader.from_file(str(path))
        if not header.tensors:
            raise ValueError("it holds no tensors")
        end = max(header.data_start + t.offset + t.nbytes for t in header.tensors)
        counts: dict[str, int] = {}
        for tensor in header.tensors:
            type_name = _ggml_type_name(tensor.ggml_type)
            counts[type_name] = counts.get(type_name, 0) + 1
        num_parameters = sum(math.prod(t.shape) for t in header.tensors)
        name = _text(metadata, "general.name", required=False)
        license_ = _text(metadata, "general.license", required=False)
    except GgufImportError:
        raise
    except Exception as exc:  # damaged bytes fail the reader in many ways; all mean the same here
        unknown = re.search(r"ggml type (\d+), which is not supported", str(exc))
        if unknown:  # a well-formed table naming a tensor type transformers has no reader for
            raise UnsupportedGgufError(
                f"{path.name} has tensors of type {_ggml_type_name(int(unknown.group(1)))} that cannot be de-quantized"
            ) from exc
        raise CorruptGgufError(f"{path} is a damaged GGUF file (its header cannot be read: {exc})") from exc
    if end > size:
        raise CorruptGgufError(
            f"{path} is cut short: its tensors need {end} bytes, the file has {size} (an interrupted download?)"
        )
    model_type = _MODEL_TYPE_OF_ARCH.get(architecture, architecture)
    if model_type == "llama" and name and "mistral" in name.lower():
        model_type = "mistral"  # llama.cpp files Mistral models under the llama architecture
    _check_servable(path, architecture, model_type)
    _check_tensor_types(path, counts)
    return GgufSummary(path, architecture, model_type, name, license_, num_parameters, counts, size)


def _text(metadata: dict, key: str, required: bool = True) -> str | None:
    value = metadata.get(key)
    if value is None:
        if required:
            raise CorruptGgufError(f"the file has no {key} entry")
        return None
    if not isinstance(value, str):
        raise CorruptGgufError(f"its {key} entry is not text")
    return value


def _ggml_type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


def _check_servable(path: Path, architecture: str, model_type: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from corolla.swarm.models.family import supported_model_types

    servable = supported_model_types()
    if model_type not in servable:
        raise UnsupportedGgufError(
            f"{path.name} holds a {architecture!r} model; Corolla serves {', '.join(sorted(servable))}"
        )
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and model_type not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedGgufError(f"transformers cannot read {architecture!r} models from GGUF files")


def _check_tensor_types(path: Path, counts: dict[str, int]) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the de-quantizers the gguf package has

    readable = {t.name for t in _type_traits} | {"F32", "F16"}
    unreadable = sorted(set(counts) - readable)
    if unreadable:
        names = ", ".join(f"{t} ({counts[t]} tensors)" for t in unreadable)
        known = GGMLQuantizationType.__members__
        raise UnsupportedGgufError(
            f"{path.name} has tensors of type {names} that cannot be de-quantized"
            + ("" if all(t in known for t in unreadable) else " (unknown types)")
        )


def default_dht_prefix(gguf_path: Path, model_type: str) -> str:
    """The file's name with the family's rule: a folder converted from SmolLM2-135M-Instruct.Q4_1.gguf
    serves under SmolLM2-135M-Instruct-Q4_1-hf, apart from the original (unquantized) weights' swarm."""
    from corolla.swarm.models.family import family_for, validate_dht_prefix

    stem = "-".join(gguf_path.name.removesuffix(".gguf").split())
    return validate_dht_prefix(family_for(model_type).dht_prefix_from_repo(stem.replace(".", "-")))


def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    torch_dtype: str = "auto",
    force: bool = False,
    dht_prefix: str | None = None,
    progress: Progress | None = None,
    extra_record: dict | None = None,
) -> ImportResult:
    """Convert `gguf_path` into a checkpoint folder at `out_dir` (see the module docstring)."""
    started = time.perf_counter()
    say = progress or (lambda _message: None)
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if torch_dtype not in DTYPE_CHOICES:
        raise GgufImportError(f"--torch-dtype must be one of {', '.join(DTYPE_CHOICES)}, not {torch_dtype!r}")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out} exists already; choose another folder or pass --force to replace it")
    say(f"reading {gguf_path.name}")
    summary = read_gguf_summary(gguf_path)
    dtype_name = summary.default_dtype() if torch_dtype == "auto" else torch_dtype
    prefix = dht_prefix or default_dht_prefix(gguf_path, summary.model_type)
    from corolla.swarm.models.family import validate_dht_prefix

    validate_dht_prefix(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    needed = summary.num_parameters * _DTYPE_BYTES[dtype_name] + 64 * 2**20
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise DiskFullError(
            f"not enough free space in {out.parent}: the model needs about {needed // 2**20} MiB, "
            f"{free // 2**20} MiB are free"
        )
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _convert_into(partial, summary, dtype_name, prefix, say, extra_record or {})
        say(f"moving the finished folder to {out}")
        _replace(partial, out)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if _is_disk_full(exc):
            raise DiskFullError(f"the disk holding {out.parent} filled up while writing the model: {exc}") from exc
        raise
    seconds = time.perf_counter() - started
    say(f"done in {seconds:.1f} s: {out}")
    record = json.loads((out / IMPORT_RECORD).read_text())
    return ImportResult(out, prefix, summary.model_type, dtype_name, summary.num_parameters, seconds, record)


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python's own writes, or as safetensors reports it (its own error type, Rust's words)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def _convert_into(partial: Path, summary: GgufSummary, dtype_name: str, prefix: str, say: Progress, extra: dict):
    import torch
    from transformers import AutoTokenizer

    partial.mkdir(mode=0o755)
    folder, name = str(summary.path.parent), summary.path.name
    say("converting the tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise UnsupportedGgufError(f"the tokenizer of {name} cannot be converted: {exc}") from exc
    say(f"de-quantizing {summary.num_parameters / 1e6:.0f} M parameters to {dtype_name}")
    try:
        with _each_gguf_parsed_once():
            model = _dequantized_model(summary.path, getattr(torch, dtype_name))
    except NotImplementedError as exc:
        raise UnsupportedGgufError(f"{name} cannot be converted: {exc}") from exc
    except (ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise CorruptGgufError(f"{name} could not be read: {exc}") from exc
    say("writing safetensors shards")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # About ten shards, so that a server reads little more than its own blocks.
    shard_bytes = min(max(total // 10, 32 * 2**20), 2 * 2**30)
    model.save_pretrained(str(partial), max_shard_size=shard_bytes)
    if not (partial / "model.safetensors.index.json").exists():  # one shard: still write an index
        _write_single_index(partial)
    del model
    say("writing the tokenizer and its chat template")
    _save_tokenizer(tokenizer, partial)
    _complete_config(partial / "config.json", prefix, dtype_name)
    record = {
        "gguf_file": name,
        "gguf_bytes": summary.file_bytes,
        "gguf_name": summary.name,
        "architecture": summary.architecture,
        "tensor_types": summary.tensor_types,
        "license": summary.license,
        "num_parameters": summary.num_parameters,
        "torch_dtype": dtype_name,
        "dht_prefix": prefix,
        **extra,
    }
    (partial / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    _fsync_folder(partial)


@contextlib.contextmanager
def _each_gguf_parsed_once():
    """transformers parses the file with gguf's GGUFReader once for the config and again for the
    weights (seconds each: it builds an object per vocabulary entry), and rebuilds gguf's tensor-name
    map for every module of the model (hundreds of times, ~50 ms each). Both are pure functions of
    their arguments and transformers looks them up on the `gguf` module at call time, so for the
    duration of one conversion each is computed once. Nothing else runs gguf meanwhile."""
    import gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def _dequantized_model(path: Path, dtype):
    """The model with dense weights, read by transformers' GGUF reader (its tensor renames and the
    reverse permutations llama.cpp applies), loaded into a model built from the GGUF's config.

    (from_pretrained(gguf_file=...) keeps quantized weights packed for its kernels, or de-quantizes
    them much more slowly, and either way cannot save the result.)"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=dtype)["tensors"]
    model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    model.tie_weights()
    # Every parameter and stored buffer must have come from the file (computed ones, like rotary
    # tables, are not saved and may stay unmaterialized).
    persistent = set(model.state_dict())
    missing = [
        name
        for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
        if tensor.device.type == "meta" and name in persistent
    ]
    if missing:
        raise UnsupportedGgufError(
            f"{path.name} lacks {len(missing)} weights the model needs (e.g. {', '.join(missing[:3])})"
        )
    return model.eval()


def _write_single_index(folder: Path) -> None:
    from safetensors import safe_open

    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as handle:
        keys = list(handle.keys())
    index = {"metadata": {"total_size": single.stat().st_size}, "weight_map": dict.fromkeys(keys, single.name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 names its own backend class; transformers 4.x (stock Petals) knows the fast tokenizer
    # class, which transformers 5 maps to the same backend.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tokenizer.chat_template and "chat_template" not in config:
        config["chat_template"] = tokenizer.chat_template  # where transformers 4.x looks for it
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    _legacy_merges(folder / "tokenizer.json")


def _legacy_merges(path: Path) -> None:
    """BPE merges as "a b" strings, the form every `tokenizers` release reads (the pair form is newer,
    and the tokenizers that stock Petals' transformers 4.x uses reject the whole file). Only where no
    merge part holds a space, since the string form cannot express one."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    merges = model.get("merges")
    if not merges or not all(isinstance(m, list) and len(m) == 2 for m in merges):
        return
    if any(" " in part for pair in merges for part in pair):
        return
    model["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _complete_config(path: Path, prefix: str, dtype_name: str) -> None:
    config = json.loads(path.read_text())
    config["dht_prefix"] = prefix  # read by stock Petals and by Corolla for local folders
    config.pop("_name_or_path", None)
    # transformers 4.x reads these legacy keys; without rope_theta it would silently use its default.
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config.setdefault("torch_dtype", dtype_name)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fsync_folder(folder: Path) -> None:
    for item in folder.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def _replace(partial: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing OUT (--force) goes only once the new one is in."""
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)  # a rename: folder, file or link alike
        try:
            os.replace(partial, out)
        except BaseException:
            os.replace(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(partial, out)


def _remove_stale_partials(out: Path) -> None:
    """Temporary folders of imports into the same OUT whose process is gone (killed, power cut)."""
    import psutil

    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        pid_text = leftover.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        with contextlib.suppress(ValueError):
            if int(pid_text) != os.getpid() and psutil.pid_exists(int(pid_text)):
                continue
        shutil.rmtree(leftover, ignore_errors=True)


def summary_dict(summary: GgufSummary) -> dict:
    data = asdict(summary)
    data["path"] = str(summary.path)
    return data
