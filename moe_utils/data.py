"""The course corpus, its loading through ``datasets``, a byte tokenizer and batching.

No download at run time. The default corpus is built from text every Python
install already carries, none of it written by this project:

* ``code``:  source files of standard-library modules (a fixed, sorted list),
* ``prose``: the English reference text in ``pydoc_data.topics`` (the text behind
  ``help("if")``),
* ``math``:  generated arithmetic (``37 + 45 = 82``) from a seeded generator.

Each domain is cut into records of at most ``CHUNK_CHARS`` characters (at line
boundaries) and trimmed to the same character budget, so the three domains weigh
the same. The records are written as JSONL (``{"domain": ..., "text": ...}``) to a
cache folder outside the repository (``$MOE_CACHE`` or ``~/.cache/moe_course``)
and read back with ``datasets.load_dataset("json", ...)``, exactly as a learner
would load their own JSONL. The split into train and validation is made per
domain from a seeded permutation, so both splits hold all three domains.

The stdlib text depends on the Python version, so the cached file name carries it
(``corpus-v1-py3.11.jsonl``); on one interpreter the bytes are always the same.

Typical use::

    from moe_utils.data import load_corpus, ByteTokenizer, encode_split, get_batch
    ds = load_corpus()                        # DatasetDict: train / validation
    tok = ByteTokenizer()
    train_ids = encode_split(ds["train"])     # [N] int64 byte ids
    x, y = get_batch(train_ids, batch_size=16, seq_len=64, generator=g)   # [16, 64] each
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checks import check_positive_int

__all__ = [
    "DOMAINS",
    "CODE_MODULES",
    "CORPUS_VERSION",
    "CHUNK_CHARS",
    "DEFAULT_CHARS_PER_DOMAIN",
    "cache_dir",
    "default_corpus_path",
    "corpus_records",
    "build_corpus",
    "load_corpus",
    "ByteTokenizer",
    "encode_split",
    "get_batch",
    "fixed_batches",
    "CorpusTokens",
    "corpus_tokens",
]

DOMAINS = ("code", "prose", "math")
CORPUS_VERSION = 1
CHUNK_CHARS = 1500
DEFAULT_CHARS_PER_DOMAIN = 200_000

# Single-file, pure-Python standard-library modules present in CPython 3.10 to 3.13
# (none of them deprecated for removal). Sorted; the order fixes the corpus.
CODE_MODULES = (
    "bisect",
    "calendar",
    "cmd",
    "colorsys",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "glob",
    "graphlib",
    "heapq",
    "hmac",
    "numbers",
    "operator",
    "queue",
    "random",
    "reprlib",
    "sched",
    "secrets",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "timeit",
    "weakref",
)

_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


# ----------------------------------------------------------------------------- cache


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The course cache folder: ``path``, else ``$MOE_CACHE``, else ``~/.cache/moe_course``.

    Never inside the repository; created on first use.
    """
    if path is None:
        path = os.environ.get("MOE_CACHE") or Path.home() / ".cache" / "moe_course"
    p = Path(path).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def default_corpus_path(cache: str | os.PathLike | None = None) -> Path:
    """Where the embedded corpus lives: ``<cache>/corpus-v1-py3.X.jsonl``."""
    v = sys.version_info
    return cache_dir(cache) / f"corpus-v{CORPUS_VERSION}-py{v.major}.{v.minor}.jsonl"


# ----------------------------------------------------------------------------- building


def _chunks(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``size`` characters at line boundaries."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > size:  # a very long line: hard cut
            if cur:
                out.append("".join(cur))
                cur, n = [], 0
            out.append(line[:size])
            line = line[size:]
        if n + len(line) > size and cur:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        out.append("".join(cur))
    return [c.strip("\n") for c in out if c.strip()]


def _interleave(docs: list[list[str]], budget: int) -> list[str]:
    """Chunk 0 of every document, then chunk 1 of every document, ... up to ``budget`` chars."""
    out, total, depth = [], 0, 0
    while total < budget and any(depth < len(d) for d in docs):
        for d in docs:
            if depth < len(d) and total < budget:
                out.append(d[depth])
                total += len(d[depth])
        depth += 1
    return out


def _code_documents() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in CODE_MODULES:
        f = stdlib / f"{name}.py"
        if not f.is_file():  # pragma: no cover - every listed module ships with CPython
            raise RuntimeError(f"standard-library module {name!r} not found as a source file")
        docs.append(f.read_text(encoding="utf-8"))
    return docs


def _prose_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _math_documents(seed: int, budget: int) -> list[str]:
    rng = random.Random(seed)
    docs, total = [], 0
    while total < budget:
        lines = []
        for _ in range(40):
            op = rng.choice("+-*")
            if op == "*":
                a, b = rng.randint(0, 20), rng.randint(0, 20)
                c = a * b
            else:
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                c = a + b if op == "+" else a - b
            lines.append(f"{a} {op} {b} = {c}")
        doc = "\n".join(lines)
        docs.append(doc)
        total += len(doc)
    return docs


def corpus_records(chars_per_domain: int = DEFAULT_CHARS_PER_DOMAIN, seed: int = 0) -> list[dict]:
    """The default corpus as a list of ``{"domain", "text"}`` records (no file I/O).

    chars_per_domain: character budget per domain (the domains end up within one
                      chunk of each other); seed: seeds the arithmetic generator.
    """
    check_positive_int("chars_per_domain", chars_per_domain, minimum=CHUNK_CHARS)
    check_positive_int("seed", seed, minimum=0)
    per_domain = {
        "code": [_chunks(d, CHUNK_CHARS) for d in _code_documents()],
        "prose": [_chunks(d, CHUNK_CHARS) for d in _prose_documents()],
        "math": [_chunks(d, CHUNK_CHARS) for d in _math_documents(seed, chars_per_domain)],
    }
    records = []
    for domain in DOMAINS:
        for text in _interleave(per_domain[domain], chars_per_domain):
            records.append({"domain": domain, "text": text})
    return records


def build_corpus(
    path: str | os.PathLike | None = None,
    chars_per_domain: int = DEFAULT_CHARS_PER_DOMAIN,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the default corpus as JSONL (one record per line) and return its path.

    path: target file (default: ``default_corpus_path()`` in the cache folder).
    An existing file is kept unless ``overwrite``. The write is atomic (temporary
    file, then ``os.replace``), so an interrupted build never leaves half a corpus.
    """
    target = Path(path).expanduser() if path is not None else default_corpus_path()
    custom = (chars_per_domain, seed) != (DEFAULT_CHARS_PER_DOMAIN, 0)
    if path is None and custom:
        target = target.with_name(f"{target.stem}-c{chars_per_domain}-s{seed}.jsonl")
    if target.exists() and not overwrite:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for rec in corpus_records(chars_per_domain, seed):
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- loading


def _import_datasets():
    """``import datasets`` without tqdm's "IProgress not found" warning (Jupyter without
    ipywidgets), which would otherwise land in a notebook cell's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import datasets
    return datasets


@contextlib.contextmanager
def _quiet_datasets():
    """Silence ``datasets``' progress bars and info logs (they would differ between runs)."""
    datasets = _import_datasets()

    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.utils.logging.set_verbosity(level)
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _offline():
    """Hub access off for the duration (a local JSON file needs no network), restored after.

    ``datasets`` and ``huggingface_hub`` read the offline switches at import time, so
    both the environment variables and the imported settings are flipped.
    """
    import huggingface_hub.constants as hub_constants

    datasets = _import_datasets()

    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = [
        (obj, name, getattr(obj, name))
        for obj, name in (
            (datasets.config, "HF_HUB_OFFLINE"),
            (datasets.config, "HF_DATASETS_OFFLINE"),
            (datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS"),
            (hub_constants, "HF_HUB_OFFLINE"),
        )
        if hasattr(obj, name)
    ]
    os.environ.update({k: "1" for k in env})
    for obj, name, _ in saved:
        setattr(obj, name, name != "HF_UPDATE_DOWNLOAD_COUNTS")
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_local_file(p: Path) -> None:
    if not p.exists():
        raise FileNotFoundError(f"source: no such file or folder: {p.name!r} (give an existing .jsonl file)")
    files = sorted(q for q in p.iterdir() if q.name.endswith(_JSON_SUFFIXES)) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"source: folder {p.name!r} holds no {'/'.join(_JSON_SUFFIXES)} files")
    for f in files:
        try:
            with open(f, "rb") as fh:
                head = fh.read(1)
        except OSError as err:
            raise ValueError(f"source: cannot read {f.name!r}: {err.strerror}") from err
        if not head:
            raise ValueError(f"source: {f.name!r} is empty; expected JSONL records with a 'text' field")


def _looks_local(source) -> bool:
    if isinstance(source, os.PathLike):
        return True
    s = str(source)
    return s.endswith(_JSON_SUFFIXES) or s.startswith((".", "/", "~", os.sep)) or Path(s).expanduser().exists()


def _split(ds, validation_fraction: float, seed: int, domain_field: str):
    """Per-domain seeded split: ``ceil(fraction * n)`` records of each domain to validation."""
    datasets = _import_datasets()

    domains = ds[domain_field] if domain_field in ds.column_names else ["all"] * len(ds)
    g = torch.Generator().manual_seed(seed)
    val = []
    for dom in sorted(set(domains)):
        idx = [i for i, d in enumerate(domains) if d == dom]
        n_val = max(1, int(-(-len(idx) * validation_fraction // 1))) if len(idx) > 1 else 0
        perm = torch.randperm(len(idx), generator=g).tolist()
        val.extend(idx[j] for j in perm[:n_val])
    val_set = set(val)
    train = [i for i in range(len(ds)) if i not in val_set]
    return datasets.DatasetDict({"train": ds.select(train), "validation": ds.select(sorted(val))})


def load_corpus(
    source: str | os.PathLike | None = None,
    *,
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    text_field: str = "text",
    domain_field: str = "domain",
    hub_config: str | None = None,
    cache: str | os.PathLike | None = None,
):
    """Load a corpus as a ``datasets.DatasetDict`` with ``train`` and ``validation``.

    source:
      * None: the embedded default corpus (built into the cache folder when absent);
        loaded with ``load_dataset("json", ...)`` with the hub switched off;
      * a local ``.jsonl``/``.json`` file or a folder of them: records with a text
        field (``text_field``) and optionally a domain field (``domain_field``);
      * any other string: a Hugging Face hub dataset name (needs internet), e.g.
        ``"roneneldan/TinyStories"``; ``hub_config`` picks its configuration.

    A local corpus is split per domain with a seeded permutation
    (``validation_fraction`` of each domain, at least one record); a hub dataset
    with its own ``validation`` split keeps it. Every split has the columns
    ``domain`` and ``text``.

    Raises FileNotFoundError for a missing path, ValueError for an empty or
    unreadable file or a missing text field.
    """
    if not isinstance(validation_fraction, float) or not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be a float in (0, 1), got {validation_fraction!r}")
    check_positive_int("split_seed", split_seed, minimum=0)
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be None, a path or a hub dataset name (str), got {type(source).__name__}")
    hub = source is not None and not _looks_local(source)
    if hub:
        with _quiet_datasets() as datasets:
            loaded = datasets.load_dataset(str(source), hub_config)
        if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
            raise ValueError(f"source: hub dataset {source!r} has no 'train' split")
        if "validation" in loaded:
            dd = datasets.DatasetDict({"train": loaded["train"], "validation": loaded["validation"]})
        else:
            dd = _split(loaded["train"], validation_fraction, split_seed, domain_field)
        return _normalise(dd, text_field, domain_field, default_domain=str(source))

    if source is None:
        path = build_corpus(default_corpus_path(cache))
    else:
        path = Path(source).expanduser()
        _check_local_file(path)
    data_files = (
        sorted(str(q) for q in path.iterdir() if q.name.endswith(_JSON_SUFFIXES)) if path.is_dir() else str(path)
    )
    with _quiet_datasets() as datasets, _offline():
        try:
            ds = datasets.load_dataset(
                "json", data_files=data_files, split="train", cache_dir=str(cache_dir(cache) / "hf_datasets")
            )
        except Exception as err:  # datasets wraps JSON errors in several exception types
            raise ValueError(f"source: could not read {path.name!r} as JSONL records: {err}") from err
    if len(ds) == 0:
        raise ValueError(f"source: {path.name!r} holds no records")
    dd = _split(ds, validation_fraction, split_seed, domain_field)
    return _normalise(dd, text_field, domain_field, default_domain=path.stem)


def _normalise(dd, text_field: str, domain_field: str, default_domain: str):
    """Keep only ``domain`` and ``text`` columns (adding ``domain`` when absent)."""
    datasets = _import_datasets()

    out = {}
    for split, ds in dd.items():
        if text_field not in ds.column_names:
            raise ValueError(f"text_field: column {text_field!r} not in the {split} split (columns: {ds.column_names})")
        texts = ds[text_field]
        domains = ds[domain_field] if domain_field in ds.column_names else [default_domain] * len(ds)
        out[split] = datasets.Dataset.from_dict({"domain": domains, "text": texts})
    return datasets.DatasetDict(out)


# ----------------------------------------------------------------------------- tokenizer


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no unknown token, no training.

    ``encode("é")`` gives the two UTF-8 bytes ``[195, 169]``; ``decode`` inverts it
    (invalid byte sequences, e.g. half a character from sampling, become U+FFFD).
    """

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """text -> [n] int64 byte ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids) -> str:
        """[n] ids (tensor or list of ints in [0, 255]) -> text."""
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 1:
                raise TypeError(f"ids must be a 1-D integer tensor, got dtype {ids.dtype} and shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 256 for i in ids):
            raise ValueError("ids must be ints in [0, 255]")
        return bytes(ids).decode("utf-8", errors="replace")


def encode_split(ds, domain: str | None = None, separator: str = "\n\n") -> torch.Tensor:
    """All records of a split (optionally one domain), joined by ``separator``, as byte ids [N]."""
    texts = ds["text"]
    if domain is not None:
        domains = ds["domain"]
        allowed = sorted(set(domains))
        if domain not in allowed:
            raise ValueError(f"domain must be one of {allowed}, got {domain!r}")
        texts = [t for t, d in zip(texts, domains) if d == domain]
    return ByteTokenizer().encode(separator.join(texts))


# ----------------------------------------------------------------------------- batching


def _check_stream(data: torch.Tensor, seq_len: int) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.is_floating_point():
        raise TypeError("data must be a 1-D integer tensor of token ids")
    check_positive_int("seq_len", seq_len)
    if data.numel() < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len} needs at least seq_len + 1 = {seq_len + 1} tokens, but data holds {data.numel()}"
        )


def get_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs ``x`` and next-token targets ``y``, both [batch_size, seq_len].

    Window starts are drawn uniformly from ``generator`` (seed it for reproducible batches).
    """
    check_positive_int("batch_size", batch_size)
    _check_stream(data, seq_len)
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    win = data[starts[:, None] + offsets]  # [B, seq_len + 1]
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def fixed_batches(
    data: torch.Tensor, batch_size: int, seq_len: int, num_batches: int, seed: int = 1234
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``num_batches`` windows every time (for validation curves that compare models)."""
    check_positive_int("num_batches", num_batches)
    g = torch.Generator().manual_seed(seed)
    return [get_batch(data, batch_size, seq_len, g) for _ in range(num_batches)]


@dataclass
class CorpusTokens:
    """Token streams of a corpus: ``train``/``validation`` [N] ids, and per-domain validation ids."""

    train: torch.Tensor
    validation: torch.Tensor
    validation_by_domain: dict[str, torch.Tensor]


_TOKEN_CACHE: dict = {}


def corpus_tokens(source: str | os.PathLike | None = None, **load_kwargs) -> CorpusTokens:
    """``load_corpus`` + ``encode_split`` for both splits, memoised per process."""
    key = (None if source is None else str(source), tuple(sorted(load_kwargs.items())), os.environ.get("MOE_CACHE"))
    if key not in _TOKEN_CACHE:
        dd = load_corpus(source, **load_kwargs)
        val = dd["validation"]
        by_domain = {d: encode_split(val, d) for d in sorted(set(val["domain"]))}
        _TOKEN_CACHE[key] = CorpusTokens(encode_split(dd["train"]), encode_split(val), by_domain)
    return _TOKEN_CACHE[key]
