"""Find, validate and load one split through `datasets`.

Local files are read and validated row by row *before* `datasets` sees them: `datasets` reports a
malformed JSON line as a generic error (the line only in `__cause__`), fills a missing field with
None and lets pandas guess CSV column types. We want "train.jsonl:17: field 'output': empty text".

Worked example (skip_invalid=True, train.jsonl with a bad line 2 of 3):
    scan -> records from lines 1 and 3 valid, 1 skipped
    -> the valid lines are copied to a temporary JSONL (the original cannot be handed to
       `datasets`: its JSON reader would fail on line 2) -> `datasets.load_dataset("json", ...)`
    -> LoadedSplit(dataset with 2 rows, locs ["train.jsonl:1", "train.jsonl:3"], skipped=1)
Without bad rows the original file goes to `datasets` untouched.

A `.txt` file, or a folder holding only .txt files (format text), is split into documents by `txt_document`: "block" (the default) makes
each run of non-blank lines one document (its lines joined with "\n"; a blank line holds only
whitespace), "file" makes the whole file one document, as written. Line ends read as "\n" (universal
newlines, as `datasets`' own text builder reads them). Either way the documents go
to `datasets` as a clean JSONL copy, located "book.txt:12" (the first line of the block).

A folder written by `datasets`' `save_to_disk` (a `Dataset`: `state.json`; a `DatasetDict`:
`dataset_dict.json`) is read with `datasets.load_from_disk`: a `Dataset` is the split itself, a
`DatasetDict` gives `split` / `validation_split`. Its rows, like a hub dataset's, are validated after
loading (locations read "folder[split]:row N").

Not a local path: treated as a hub dataset name and loaded with `datasets.load_dataset(name)`;
its rows are validated after loading (locations read "name[split]:row N").

The first row of a file that fails and has another known format's shape (alpaca rows under the
default format messages) stops the load with one message naming the format to set (`format_hint`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import datasets

from mistral_ft.data.config import DataConfig
from mistral_ft.data.errors import DataError, RowError, tolerate
from mistral_ft.data.formats import format_hint, normalize_row

# extension -> `datasets` builder name
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TXT = ".txt"  # plain text: split into documents by us (see the module docstring), loaded as JSONL
SUFFIXES = sorted([*BUILDERS, TXT])

# The repository root (the folder holding `data/` with the bundled datasets); a wheel install has none.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The bundled datasets inside the package (`mistral_ft/bundled_data`, a link to `data/` in the repository, a
# real folder in the wheel), so `data/instruct_train.jsonl` also resolves in an installed copy.
BUNDLED = Path(__file__).resolve().parents[1] / "bundled_data"


@dataclasses.dataclass
class LoadedSplit:
    """One split as `datasets` loaded it, with where each row came from and what was skipped."""

    dataset: datasets.Dataset
    locs: list[str]  # "file:line" / "file:row N" / "name[split]:row N", one per dataset row
    skipped: int
    from_csv: bool  # CSV cells are strings: normalization parses numbers / JSON in them
    source: str
    validated: bool  # rows were validated before loading (local files)
    one_split: bool = False  # a saved `Dataset` folder: no other split to take validation rows from


def resolve_data_path(path: str) -> Optional[Path]:
    """A local path for `path`, or None when it should be treated as a hub dataset name.

    Relative paths are tried against the working directory, then against the repository root, then
    (`data/...`) against the datasets bundled in the package, so the bundled files work from any
    directory of a source checkout and from an installed wheel.
    """
    p = Path(os.path.expanduser(path))
    if p.exists():
        return p
    if not p.is_absolute() and (PROJECT_ROOT / p).exists():
        return PROJECT_ROOT / p
    if not p.is_absolute() and p.parts[:1] == ("data",) and (BUNDLED / Path(*p.parts[1:])).exists():
        return BUNDLED / Path(*p.parts[1:])
    if p.suffix.lower() in SUFFIXES or p.is_absolute() or path.startswith(("./", "../")):
        raise DataError(f"{path}: file not found (working directory: {os.getcwd()})")
    return None


def _loc(path: Path, line: int, kind: str) -> str:
    return f"{path}:{line}" if kind == "line" else f"{path}:row {line}"


def _read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is a file-level error (no row can be trusted)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start}); re-save the file as UTF-8") from None


def _iter_json(path: Path) -> Iterator[tuple[int, Any, Optional[str]]]:
    """(line, parsed row or None, error) for a JSON Lines file or a JSON array file."""
    text = _read_utf8(path)
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array: walk it element by element to keep line numbers
        decoder = _DECODER
        pos = len(text) - len(stripped) + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                yield text.count("\n") + 1, None, "malformed JSON: the array is not closed with ']'"
                return
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                yield err.lineno, None, f"malformed JSON: {err.msg} (column {err.colno})"
                return  # cannot resynchronise inside a broken array
            except _DuplicateKey as err:
                yield line, None, str(err)
                return  # the decoder stopped inside this element: its end is unknown
            except RecursionError:
                yield line, None, _TOO_DEEP
                return
            yield line, obj, None
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = _DECODER.decode(raw)
        except json.JSONDecodeError as err:
            yield i, None, f"malformed JSON: {err.msg} (column {err.colno})"
        except _DuplicateKey as err:
            yield i, None, str(err)
        except RecursionError:
            yield i, None, _TOO_DEEP
        else:
            yield i, obj, None


class _DuplicateKey(ValueError):
    """A JSON object with the same key twice: json.loads would keep the later value silently."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r} in one JSON object (the later value would silently win)")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)
_TOO_DEEP = "malformed JSON: nested deeper than the parser's recursion limit"


def _iter_csv(path: Path) -> Iterator[tuple[int, Any, Optional[str]]]:
    """(data row number, dict of strings, error); row 1 is the first row after the header."""
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""))
    row_no = 0
    try:
        if reader.fieldnames is None:
            return
    except csv.Error as err:
        raise DataError(f"{path}: unreadable CSV header ({err})") from None
    width = len(reader.fieldnames)
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # cannot resynchronise: stop here
            yield row_no + 1, None, f"malformed CSV: {err}"
            return
        row_no += 1
        if None in rec:  # DictReader puts surplus cells under the key None
            yield row_no, None, f"malformed CSV: {width + len(rec[None])} cells, header has {width}"
            continue
        yield row_no, dict(rec), None


def _iter_txt(path: Path, cfg: DataConfig) -> Iterator[tuple[int, Any, Optional[str]]]:
    """(first line of the document, {text_field: document}, None): see `txt_document` in the module docstring."""
    # universal newlines, as Python's text mode and `datasets`' text builder read a file
    text = _read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")
    if cfg.txt_document == "file":
        if text.strip():
            yield 1, {cfg.text_field: text}, None
        return
    block: list[str] = []
    start = 0
    for i, line in enumerate(text.split("\n"), start=1):  # not splitlines(): it also splits at \x0c, \u2028, ...
        if line.strip():
            if not block:
                start = i
            block.append(line)
        elif block:
            yield start, {cfg.text_field: "\n".join(block)}, None
            block = []
    if block:
        yield start, {cfg.text_field: "\n".join(block)}, None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any, Optional[str]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row_no += 1
            yield row_no, rec, None


class _WrongFormat(DataError):
    """The first row has another format's shape: the whole file is refused, whatever `skip_invalid` says."""


def _scan_local(path: Path, cfg: DataConfig) -> tuple[list[int], list[str], list[Any], int, str]:
    """Validate every row of a local file: (valid row numbers, locs, raw rows, skipped, kind)."""
    ext = path.suffix.lower()
    if ext in (".json", ".jsonl"):
        rows, kind = _iter_json(path), "line"
    elif ext == TXT:
        rows, kind = _iter_txt(path, cfg), "line"
    elif ext == ".csv":
        rows, kind = _iter_csv(path), "row"
    else:
        rows, kind = _iter_parquet(path), "row"
    from_csv = ext == ".csv"
    numbers: list[int] = []
    locs: list[str] = []
    raws: list[Any] = []
    skipped = 0
    seen = 0
    label_type: Optional[tuple[type, str]] = None
    for number, raw, problem in rows:
        seen += 1
        loc = _loc(path, number, kind)
        try:
            if problem is not None:
                raise DataError(f"{loc}: {problem}")
            try:
                norm = normalize_row(raw, cfg, from_csv=from_csv)
            except RowError as err:
                hint = format_hint(raw, cfg) if seen == 1 else None
                if hint is not None:  # a file-level mistake: never skipped or collected row by row
                    raise _WrongFormat(f"{loc}: {err}; {hint}") from None
                raise DataError(f"{loc}: {err}") from None
            if cfg.format == "classification" and not from_csv:
                # `datasets` (arrow) cannot hold str and int in one column: say so per line.
                kind_of = type(norm["label"])
                if label_type is None:
                    label_type = (kind_of, loc)
                elif kind_of is not label_type[0]:
                    raise DataError(
                        f"{loc}: field '{cfg.label_field}': {kind_of.__name__} label, but "
                        f"{label_type[1]} has a {label_type[0].__name__} label; use names or ids, not both"
                    )
        except _WrongFormat:
            raise
        except DataError as err:
            tolerate(err, cfg.skip_invalid)  # raises unless skipping or collecting
            skipped += 1
            continue
        numbers.append(number)
        locs.append(loc)
        raws.append(raw)
    if seen == 0:
        raise DataError(f"{path}: empty file (no rows)")
    if not numbers:
        raise DataError(f"{path}: no valid rows ({skipped} skipped as invalid)")
    return numbers, locs, raws, skipped, kind


def _load_local(path: Path, cfg: DataConfig, split: str) -> LoadedSplit:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_saved(path, cfg, split)
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if files and all(p.suffix.lower() == TXT for p in files):
            return _load_txt(path, files, cfg)
        return _load_named(str(path), cfg, split=split, local_dir=True)
    ext = path.suffix.lower()
    if ext not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {ext!r} (use one of {SUFFIXES}, or a save_to_disk folder)")
    if ext == TXT:
        return _load_txt(path, [path], cfg)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (no rows)")
    _, locs, raws, skipped, _ = _scan_local(path, cfg)
    builder = BUILDERS[ext]
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # keep every cell a string: we parse numbers ourselves, pandas would turn "007" into 7
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh))
        features = datasets.Features({name: datasets.Value("string") for name in header})
        kwargs.update(features=features, keep_default_na=False)
    # Arrow holds one type per column: rows mixing string contents with OpenAI content parts make `datasets`
    # fall back to pandas, which turns a content "4" into the int 4. The copy then writes every content as parts.
    mixed = any(_has_content_parts(raw) for raw in raws)
    ds: Optional[datasets.Dataset] = None
    if not skipped and not mixed:
        ds = _datasets_load(builder, str(path), kwargs, path)
        if len(ds) != len(locs):  # e.g. a reader that drops blank CSV lines differently from ours
            ds = None
    if ds is None:  # hand `datasets` a clean copy holding only the rows that passed validation
        ds = _clean_copy([_as_parts(raw) for raw in raws] if mixed else raws, path)
    return LoadedSplit(ds, locs, skipped, from_csv=ext == ".csv", source=str(path), validated=True)


def _load_txt(source: Path, files: list[Path], cfg: DataConfig) -> LoadedSplit:
    """A .txt file, or a folder holding only .txt files (read in name order), as the documents of format text."""
    if cfg.format != "text":
        raise DataError(f"{source}: .txt files hold plain text (one document per blank-line block; "
                        f"data.txt_document=file: one per file), but data.format is {cfg.format!r}: set data.format=text")
    locs: list[str] = []
    raws: list[Any] = []
    skipped = 0
    for file in files:
        if file.stat().st_size == 0:
            raise DataError(f"{file}: empty file (no rows)")
        _, file_locs, file_raws, file_skipped, _ = _scan_local(file, cfg)
        locs += file_locs
        raws += file_raws
        skipped += file_skipped
    return LoadedSplit(_clean_copy(raws, source), locs, skipped, from_csv=False, source=str(source), validated=True)


def _clean_copy(raws: list[Any], shown: Path) -> datasets.Dataset:
    """The rows through `datasets`' JSON builder, from a temporary JSONL (kept in memory, no cache left behind)."""
    with tempfile.TemporaryDirectory(prefix="mistral_ft_data_") as tmp:
        clean = Path(tmp) / "rows.jsonl"
        with clean.open("w", encoding="utf-8") as fh:
            for raw in raws:
                fh.write(json.dumps(raw, ensure_ascii=False, default=str) + "\n")
        return _datasets_load("json", str(clean), {"cache_dir": str(Path(tmp) / "cache")}, shown, in_memory=True)


def _message_lists(raw: Any) -> Iterator[list[Any]]:
    """The row's top-level lists of message objects (messages, a preference pair's conversations)."""
    if isinstance(raw, dict):
        for value in raw.values():
            if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
                yield value


def _has_content_parts(raw: Any) -> bool:
    return any(isinstance(m["content"], list) for msgs in _message_lists(raw) for m in msgs)


def _as_parts(raw: dict[str, Any]) -> dict[str, Any]:
    """The row with every string content written as one text part: the same text (formats._content), one arrow type."""
    out = dict(raw)
    for key, value in raw.items():
        if any(value is msgs for msgs in _message_lists(raw)):
            # in a valid row "" is only the content of an assistant turn with tool calls, the same as None
            out[key] = [dict(m, content=[{"type": "text", "text": m["content"]}] if m["content"] else None)
                        if isinstance(m["content"], str) else m for m in value]
    return out


def _datasets_load(builder: str, file: str, kwargs: dict[str, Any], shown: Path, in_memory: bool = False) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files=file, split="train", keep_in_memory=in_memory, **kwargs)
    except Exception as err:  # rows passed our checks, so this is about the file as a whole
        raise DataError(f"{shown}: `datasets` could not load the file: {type(err).__name__}: {err}") from err


def _load_saved(path: Path, cfg: DataConfig, split: str) -> LoadedSplit:
    """A `save_to_disk` folder: a `Dataset` is the split itself; a `DatasetDict` gives `split`."""
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # a folder `datasets` wrote, but damaged or from an incompatible version
        raise DataError(f"{path}: `datasets.load_from_disk` could not read this save_to_disk folder: "
                        f"{type(err).__name__}: {err}") from err
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{path}: this saved DatasetDict has no split {split!r} (it has {list(saved)}); "
                            "set data.split / data.validation_split")
        ds, source, one_split = saved[split], f"{path}[{split}]", False
    else:
        ds, source, one_split = saved, str(path), True
    if len(ds) == 0:
        raise DataError(f"{source}: empty split (no rows)")
    locs = [f"{source}:row {i + 1}" for i in range(len(ds))]
    return LoadedSplit(ds, locs, 0, from_csv=False, source=source, validated=False, one_split=one_split)


def _load_named(name: str, cfg: DataConfig, split: str, local_dir: bool = False) -> LoadedSplit:
    try:
        ds = datasets.load_dataset(name, cfg.hub_config, split=split)
    except Exception as err:
        if local_dir:
            raise DataError(f"{name}: `datasets` could not load this folder: {type(err).__name__}: {err}") from err
        raise DataError(
            f"{name}: not a local file, and loading it as a Hugging Face hub dataset failed "
            f"({type(err).__name__}: {err}). If you are offline or the hub is unreachable, download the data "
            "and point the data config at a local .jsonl / .json / .csv / .parquet file."
        ) from err
    if isinstance(ds, datasets.DatasetDict):  # split=None was not passed, but be safe
        raise DataError(f"{name}: got several splits {list(ds)}; set 'split'")
    locs = [f"{name}[{split}]:row {i + 1}" for i in range(len(ds))]
    if len(ds) == 0:
        raise DataError(f"{name}[{split}]: empty split (no rows)")
    return LoadedSplit(ds, locs, 0, from_csv=False, source=f"{name}[{split}]", validated=False)


def load_split(source: str, cfg: DataConfig, split: Optional[str] = None) -> LoadedSplit:
    """Load one split from a local file (validated first) or a hub dataset name.

    `split` names the hub (or saved `DatasetDict`) split (default `cfg.split`); ignored for local files.
    """
    path = resolve_data_path(source)
    if path is not None:
        return _load_local(path, cfg, split or cfg.split)
    return _load_named(source, cfg, split or cfg.split)
