"""Text sources for evaluation, calibration and distillation.

The built-in text is real English prose that ships with CPython (``pydoc_data.topics``). It is split by topic,
deterministically: every 10th topic (sorted by name) is the held-out ``eval`` split, never used for calibration or
training; the rest is ``train``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..builtin.texts import BIBLE, GENERATED, bible_text, generated_texts
from .errors import RecipeError

BUILTIN = "builtin"
# Built-in texts by name: the pydoc text (held-out split for evaluation, the rest for training), `BIBLE`, prose that
# no recipe trains on (out-of-domain evaluation), and `GENERATED`, varied English sampled from SmolLM2 (recovery
# training text, with its own held-out split); see hfsqueeze.builtin.texts.
BUILTIN_TEXTS = (BUILTIN, f"{BUILTIN}:pydoc", BIBLE, GENERATED)
# How a model card names each built-in text: in prose, and in its model-index as (dataset type, dataset name).
BUILTIN_TEXT_LABEL = ("the held-out split of the Python documentation topics shipped with CPython "
                      "(`pydoc_data.topics`)")
_PYDOC_DATASET = ("pydoc_data.topics", "Python documentation topics (CPython's pydoc_data.topics), held-out split")
BUILTIN_DATASETS = {
    BUILTIN: _PYDOC_DATASET,
    f"{BUILTIN}:pydoc": _PYDOC_DATASET,
    BIBLE: ("world-english-bible", "World English Bible: Ruth, Jonah and James"),
    GENERATED: ("hfsqueeze-generated-en",
                "English text sampled from SmolLM2-135M-Instruct (hfsqueeze builtin:generated), held-out split"),
}
TABLE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
TEXT_SUFFIXES = (".txt", ".md", *TABLE_SUFFIXES)


def builtin_text(split: str = "eval") -> str:
    """The built-in English text: ``split`` is ``"eval"`` (held out) or ``"train"``."""
    from pydoc_data.topics import topics

    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', got {split!r}")
    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 10 == 0) == (split == "eval")]
    return "\n\n".join(topics[n].strip() for n in chosen)


def _text_column(names: list[str], first_row: Any, column: str | None) -> str | None:
    """``column``, else ``text``, else the first column holding a string."""
    if column is not None:
        return column
    if "text" in names:
        return "text"
    return next((c for c in names if isinstance(first_row[c], str)), None)


def _texts_from_dataset(ds: Any, column: str | None) -> list[str]:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict: take the first split
        ds = ds[list(ds.keys())[0]]
    names = list(getattr(ds, "column_names", []) or [])
    col = _text_column(names, ds[0], column) if names else None
    if col is None or col not in names:
        raise RecipeError(f"the dataset has no text column {column or 'text'!r}; columns: {', '.join(names)}")
    return [t for t in ds[col] if isinstance(t, str) and t.strip()]


def read_rows(path: Path) -> list[Any]:
    """The rows of a local table: ``.jsonl`` (one JSON value a line), ``.json`` (a list, or one value), ``.csv`` and
    ``.parquet`` (one dict a row). The one reader of tables, for text sources and labelled data alike; a file that is
    not UTF-8 or not valid JSON fails with one line naming where."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path} line {number}: not valid JSON ({exc.msg}, column {exc.colno}); each line "
                                  "of a .jsonl file must be one JSON value") from None
        return rows
    if suffix == ".json":
        try:
            rows = json.loads(_read_utf8(path))
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path} is not valid JSON ({exc.msg} on line {exc.lineno}, column {exc.colno})") \
                from None
        return rows if isinstance(rows, list) else [rows]
    if suffix in (".csv", ".parquet"):
        import datasets

        try:
            ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        except Exception as exc:  # noqa: BLE001 - whatever the reader raises, the file is unusable
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise RecipeError(f"cannot read {path} as {suffix[1:]} ({type(exc).__name__}: {first})") from None
        return [dict(r) for r in ds]
    raise RecipeError(f"{path} has suffix {suffix!r}; allowed: {', '.join(TABLE_SUFFIXES)}")


def load_texts(source: Any = BUILTIN, *, split: str = "eval", column: str | None = None) -> list[str]:
    """Resolve a text source to a list of documents.

    Args:
        source (`str`, `Path` or `datasets.Dataset`, defaults to `"builtin"`):
            ``"builtin"`` (``"builtin:pydoc"``), ``"builtin:bible"`` (out-of-domain prose), ``"builtin:generated"``
            (text sampled from SmolLM2, one document each), a local file (.txt/.md: one document;
            .json/.jsonl/.csv/.parquet: the ``text`` column),
            a `datasets.Dataset`, or a dataset name that `datasets.load_dataset` can load (offline: cached only).
        split (`str`, defaults to `"eval"`): for the built-in pydoc and generated texts, ``"eval"`` (held out) or
            ``"train"``.
        column (`str`, *optional*): the text column of a table or dataset.
    """
    if source is None or source in (BUILTIN, f"{BUILTIN}:pydoc"):
        return [builtin_text(split)]
    if source == BIBLE:
        return [bible_text()]
    if source == GENERATED:
        return generated_texts(split)
    if isinstance(source, str) and source.startswith(f"{BUILTIN}:"):
        raise RecipeError(f"unknown built-in text {source!r}; allowed: {', '.join(BUILTIN_TEXTS)}")
    if not isinstance(source, (str, Path)):
        return _texts_from_dataset(source, column)
    path = Path(source)
    if path.is_file():
        return _texts_from_file(path, column)
    if _looks_local(source):
        raise RecipeError(f"text file not found: {source}")
    try:
        import datasets

        ds = datasets.load_dataset(str(source), split="train")
    except Exception as exc:  # noqa: BLE001 - any failure here means the name is unusable
        raise RecipeError(f"text source {str(source)!r} is not 'builtin', not a local file and could not be loaded "
                          f"with datasets.load_dataset ({type(exc).__name__})") from None
    return _texts_from_dataset(ds, column)


def _text_label(source: Any) -> str:
    if isinstance(source, (str, Path)):
        # A file is named by its file name; built-in texts and dataset names by themselves.
        return Path(source).name if Path(source).is_file() else str(source)
    return getattr(getattr(source, "info", None), "dataset_name", None) or type(source).__name__


def eval_sources(eval_text: Any, evaluation: Any) -> dict[str, Any]:
    """The evaluation text sources by report label: ``eval_text`` (one or a list) or the recipe's
    ``evaluation.text``; the first is the headline text."""
    given = evaluation.texts if eval_text is None else (eval_text if isinstance(eval_text, list) else [eval_text])
    labels = [_text_label(src) for src in given]
    if len(set(labels)) != len(labels):  # two files with one name: fall back to the paths as given
        labels = [str(src) if isinstance(src, (str, Path)) else label for src, label in zip(given, labels)]
    return dict(zip(labels, given))


def _looks_local(source: str | Path) -> bool:
    """A path by its looks (a text suffix, or a first component that exists here): never a datasets name."""
    text = str(source)
    return text.endswith(TEXT_SUFFIXES) or ("/" in text and Path(text.split("/")[0]).exists())


def check_text_source(source: Any) -> None:
    """Read a local text source now, so a missing, non-UTF-8 or malformed file fails before any expensive work.

    ``"builtin"``, datasets and dataset names are left for the stage that uses them (loading them may be slow).
    """
    if isinstance(source, str) and source.startswith(f"{BUILTIN}:") and source not in BUILTIN_TEXTS:
        raise RecipeError(f"unknown built-in text {source!r}; allowed: {', '.join(BUILTIN_TEXTS)}")
    if isinstance(source, (str, Path)) and source not in BUILTIN_TEXTS and \
            (Path(source).is_file() or _looks_local(source)):
        load_texts(source, split="train")


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(f"text file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                          "save it as UTF-8") from None


def _texts_from_file(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        return [_read_utf8(path)]
    if suffix not in TABLE_SUFFIXES:
        raise RecipeError(f"text file {path} has an unsupported suffix; allowed: {', '.join(TEXT_SUFFIXES)}")
    rows = read_rows(path)
    if suffix in (".csv", ".parquet") and rows:  # tables name their columns: take the text one
        column = _text_column(list(rows[0]), rows[0], column)
    return _texts_from_rows(rows, column, path)


def _texts_from_rows(rows: list, column: str | None, path: Path) -> list[str]:
    col = column or "text"
    texts = [r.get(col) if isinstance(r, dict) else r for r in rows]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise RecipeError(f"{path}: found no text under key {col!r}")
    return texts


def token_ids(tokenizer, texts: list[str], *, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` token ids of ``texts`` joined with the EOS token (when the tokenizer has one), the way
    causal-LM corpora are packed. Tokenizes only as many documents as that needs."""
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def pack_blocks(ids: list[int], *, max_tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``max_tokens`` of ``ids`` as a LongTensor ``[n_blocks, seq_len]`` (see `token_blocks`)."""
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise RecipeError("the text source holds fewer than 2 tokens; give a longer text")
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.long)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def token_blocks(tokenizer, texts: list[str], *, max_tokens: int, seq_len: int) -> torch.Tensor:
    """Tokenize and pack ``texts`` into a LongTensor ``[n_blocks, seq_len]`` of at most ``max_tokens`` tokens.

    Documents are joined with the EOS token (when the tokenizer has one), the way causal-LM corpora are packed. The
    last block may be shorter than ``seq_len`` only when fewer than ``seq_len`` tokens exist; then there is one block.
    """
    return pack_blocks(token_ids(tokenizer, texts, max_tokens=max_tokens), max_tokens=max_tokens, seq_len=seq_len)
