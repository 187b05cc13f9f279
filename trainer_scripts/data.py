"""Data: ``datasets`` sources -> tokenised, packed fixed-length blocks -> a deterministic global order.

Sources: local text / JSON lines / parquet / csv files, a ``save_to_disk`` folder, a folder of data files, or a
Hub id; optionally streamed. Tokenisation and packing are ``Dataset.map`` calls (cached by ``datasets``,
``num_proc`` workers); a streamed dataset is mapped lazily.

Order: the training position is a pure function of the optimizer step (map-style) or of a small saved state
(streaming), and every process takes its own slice of the same global batch, so

* a resumed run sees exactly the batches the uninterrupted run would have seen (nothing repeated or skipped);
* N processes x accumulation A sees the same global batches as one process x accumulation N*A.

Global batch of step ``s`` = ``micro_batch_size * accumulation * world_size`` consecutive positions of the epoch
order; micro-batch ``m`` of process ``r`` takes positions ``[(m * world + r) * mbs, ... + mbs)`` of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch

from .config import ConfigError, data_builder, expand_data_files


# ----------------------------------------------------------------------------------------------- raw documents
def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    ) and not any(f.endswith((".jsonl", ".txt", ".parquet", ".csv")) for f in os.listdir(path))


def _load_files(files: list[str], what: str, streaming: bool, cache_dir: str | None):
    import datasets

    builder = data_builder(files, what)
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(
            builder, data_files={"train": files}, split="train", streaming=streaming, cache_dir=cache_dir, **kwargs
        )
    except Exception as e:  # malformed JSON lines, unreadable parquet, ...
        raise ConfigError(f"{what}: could not read {', '.join(files)}: {type(e).__name__}: {e}".split("\n")[0]) from None


def text_separator(cfg) -> str:
    """Text files are split into paragraphs: glue them back with a blank line, not an end-of-document token."""
    if cfg.train_files and data_builder(expand_data_files(cfg.train_files, "train_files"), "train_files") == "text":
        return "paragraph"
    return "document"


def load_documents(cfg):
    """(train, validation) raw datasets of documents with a ``cfg.text_column`` column. ConfigError on bad input."""
    import datasets

    quiet = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # reading the raw files is quick; an error then stays one line
    try:
        return _load_documents(cfg)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _load_documents(cfg):
    import datasets

    val = None
    if cfg.train_files:
        files = expand_data_files(cfg.train_files, "train_files")
        train = _load_files(files, "train_files", cfg.streaming, cfg.data_cache_dir)
    else:
        name = cfg.dataset_name
        if _is_saved_dataset(name):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.dataset_split not in loaded:
                    raise ConfigError(f"dataset {name} has splits {list(loaded)}, not {cfg.dataset_split!r}")
                train = loaded[cfg.dataset_split]
                val = loaded.get("validation")
            else:
                train = loaded
            if cfg.streaming:
                train = train.to_iterable_dataset()
                val = val.to_iterable_dataset() if val is not None else None
        else:
            if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)):
                raise ConfigError(f"dataset_name: {name} does not exist")
            if not os.path.isdir(name) and any(
                os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
            ):
                raise ConfigError(
                    f"dataset_name: {name!r} is not a local folder and the Hugging Face Hub is off (HF_HUB_OFFLINE); "
                    "give local files with train_files=... or a save_to_disk folder"
                )
            try:
                loaded = datasets.load_dataset(
                    name, cfg.dataset_config_name, streaming=cfg.streaming, cache_dir=cfg.data_cache_dir
                )
            except (ConnectionError, OSError) as e:
                raise ConfigError(
                    f"dataset_name: could not load {name!r} (not a local folder, and the Hugging Face Hub is not "
                    f"reachable or has no such dataset: {str(e).splitlines()[0]}). Offline, give local files "
                    "with train_files=... or a save_to_disk folder"
                ) from None
            except Exception as e:
                raise ConfigError(f"dataset_name: could not load {name!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
            if cfg.dataset_split not in loaded:
                raise ConfigError(f"dataset {name} has splits {list(loaded)}, not {cfg.dataset_split!r}")
            train = loaded[cfg.dataset_split]
            val = loaded["validation"] if "validation" in loaded else None
    if cfg.validation_files:
        files = expand_data_files(cfg.validation_files, "validation_files")
        val = _load_files(files, "validation_files", cfg.streaming, cfg.data_cache_dir)

    check_text_column(train, cfg.text_column, "training data")
    if val is not None:
        check_text_column(val, cfg.text_column, "validation data")
    if val is None:
        if cfg.streaming:
            n = cfg.streaming_validation_documents
            if n < 1:
                raise ConfigError("streaming without validation data needs streaming_validation_documents >= 1")
            val, train = train.take(n), train.skip(n)
        else:
            if len(train) < 2:
                raise ConfigError("the training data has fewer than 2 documents: cannot hold any out; give validation_files")
            split = train.train_test_split(test_size=cfg.validation_split, seed=cfg.seed, shuffle=True)
            train, val = split["train"], split["test"]
    return train, val


def check_text_column(ds, column: str, what: str) -> None:
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        try:
            first = next(iter(ds))
        except StopIteration:
            raise ConfigError(f"{what} is empty") from None
        columns = list(first)
    else:
        if len(ds) == 0:
            raise ConfigError(f"{what} is empty")
        columns = ds.column_names
    if column not in columns:
        raise ConfigError(f"{what} has no {column!r} column (columns: {', '.join(columns)}); set text_column=...")


# ------------------------------------------------------------------------------------------ tokenise and pack
def tokenize_and_pack(ds, tokenizer, block_size: int, text_column: str, separator: str = "document",
                      num_proc: int | None = None, desc: str = ""):
    """Documents -> ``input_ids`` blocks of exactly ``block_size`` tokens, concatenated; only the last partial block is
    dropped.

    ``separator="document"`` ends every document with the EOS token; ``"paragraph"`` (text files split at blank
    lines) puts the blank line back instead.
    """
    import datasets

    eos = tokenizer.eos_token_id
    if separator == "document" and eos is None:
        raise ConfigError("the tokenizer has no EOS token to separate documents")

    def tokenize(batch):
        texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
        if separator == "paragraph":
            texts = [t + "\n\n" if t else t for t in texts]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if separator == "document":
            ids = [x + [eos] for x, t in zip(ids, texts) if t]
        return {"input_ids": ids}

    carry: list[int] = []  # the tokens after the last full block of the map batches so far

    def pack(batch, indices):
        """Blocks of the concatenation so far; the tail waits for the next map batch, so only the end of the data
        loses its partial block. Map batches come in order (one process, see below); index 0 is a new pass."""
        if indices and indices[0] == 0:
            carry.clear()
        flat = carry + [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // block_size * block_size
        carry[:] = flat[n:]
        return {"input_ids": [flat[i : i + block_size] for i in range(0, n, block_size)]}

    streaming = isinstance(ds, datasets.IterableDataset)
    cols = list(ds.column_names) if ds.column_names is not None else None
    map_kw = {} if streaming else {"num_proc": num_proc, "desc": f"tokenising {desc}".strip()}
    tok = ds.map(tokenize, batched=True, remove_columns=cols, **map_kw)
    if not streaming:
        # one process: the carried tail needs the batches in order (packing is list slicing, fast next to tokenising)
        map_kw = {"desc": f"packing {desc} into blocks of {block_size}".strip()}
    return tok.map(pack, batched=True, with_indices=True, **map_kw)


# ------------------------------------------------------------------------------------------------ global order
@dataclass
class Layout:
    micro_batch_size: int
    accumulation: int
    world_size: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    def micro_slice(self, micro: int) -> slice:
        start = (micro * self.world_size + self.rank) * self.micro_batch_size
        return slice(start, start + self.micro_batch_size)


class BlockOrder:
    """Map-style blocks in a seeded permutation per epoch; step -> positions, no state to save."""

    def __init__(self, blocks, layout: Layout, seed: int):
        self.blocks, self.layout, self.seed = blocks, layout, seed
        self.num_blocks = len(blocks)
        self.steps_per_epoch = self.num_blocks // layout.global_batch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training data packs into {self.num_blocks} blocks but one optimizer step needs "
                f"{layout.global_batch} (micro_batch_size x gradient_accumulation_steps x processes): "
                "use more data, a smaller block_size or a smaller batch"
            )
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_blocks, generator=g), epoch
        return self._perm

    def step_indices(self, step: int) -> list[int]:
        """Block indices of the whole global batch of optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = self.layout.global_batch
        return self._permutation(epoch)[k * g : (k + 1) * g].tolist()

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        idx = self.step_indices(step)
        for m in range(self.layout.accumulation):
            mine = idx[self.layout.micro_slice(m)]
            rows = self.blocks[mine]["input_ids"]
            yield mine, torch.tensor(rows, dtype=torch.long)

    def state(self, step: int) -> dict:
        return {"kind": "map", "next_step": step, "epoch": self.epoch_of(step),
                "offset_in_epoch": (step % self.steps_per_epoch) * self.layout.global_batch}

    def load_state(self, state: dict, step: int) -> None:
        if state.get("kind") != "map":
            raise ConfigError("the checkpoint was written by a streaming run; set streaming=true to resume it")


class StreamingBlocks:
    """Streamed blocks in stream order (after a seeded shuffle buffer); the position (epoch, blocks consumed in
    the epoch) is saved with each checkpoint and skipped to on resume. Every process reads the stream and keeps
    its own slice of each global batch."""

    def __init__(self, blocks, layout: Layout, seed: int, shuffle_buffer_size: int):
        self.source, self.layout, self.seed, self.buffer = blocks, layout, seed, shuffle_buffer_size
        self.epoch, self.offset = 0, 0
        self._it = None

    def _stream(self):
        ds = self.source
        if self.buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(self.epoch)
        return iter(ds.skip(self.offset) if self.offset else ds)

    def _next_global(self) -> list[list[int]]:
        g = self.layout.global_batch
        out: list[list[int]] = []
        restarted = False
        while len(out) < g:
            if self._it is None:
                self._it = self._stream()
            try:
                out.append(next(self._it)["input_ids"])
            except StopIteration:
                if restarted or (self.offset == 0 and not out):
                    raise ConfigError(f"the streamed training data holds fewer than {g} blocks") from None
                # a global batch never straddles epochs: drop the incomplete tail
                self.epoch, self.offset, self._it, out, restarted = self.epoch + 1, 0, None, [], True
        self.offset += g
        return out

    def micro_batches(self, step: int):
        rows = self._next_global()
        for m in range(self.layout.accumulation):
            sl = self.layout.micro_slice(m)
            pos = list(range(self.offset - self.layout.global_batch, self.offset))[sl]
            yield [self.epoch * 10**12 + p for p in pos], torch.tensor(rows[sl], dtype=torch.long)

    def state(self, step: int) -> dict:
        return {"kind": "stream", "next_step": step, "epoch": self.epoch, "offset_in_epoch": self.offset}

    def load_state(self, state: dict, step: int) -> None:
        if state.get("kind") != "stream":
            raise ConfigError("the checkpoint was written by a map-style run; set streaming=false to resume it")
        self.epoch, self.offset, self._it = int(state["epoch"]), int(state["offset_in_epoch"]), None


def eval_blocks(blocks, max_blocks: int) -> torch.Tensor:
    """The first ``max_blocks`` held-out blocks as one tensor (the same on every process)."""
    import datasets

    if isinstance(blocks, datasets.IterableDataset):
        rows = [r["input_ids"] for r in blocks.take(max_blocks)]
    else:
        rows = blocks[: min(max_blocks, len(blocks))]["input_ids"]
    if not rows:
        raise ConfigError(
            "the held-out data packs into 0 blocks: give more validation text, a larger validation_split, "
            "or a smaller block_size"
        )
    return torch.tensor(rows, dtype=torch.long)


def write_pydoc_corpus(path: str) -> str:
    """Python's bundled documentation (``pydoc_data.topics``, ~465 KB of English prose) as JSON lines, one topic
    per line: real text for demos and tests that is on every machine with CPython."""
    import json

    from pydoc_data.topics import topics

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for name in sorted(topics):
            f.write(json.dumps({"topic": name, "text": topics[name]}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m trainer_scripts.data pydoc-corpus PATH``: write the demo corpus."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "pydoc-corpus":
        print("usage: python -m trainer_scripts.data pydoc-corpus PATH.jsonl", file=sys.stderr)
        raise SystemExit(2)
    print(write_pydoc_corpus(argv[1]))


if __name__ == "__main__":
    main()
