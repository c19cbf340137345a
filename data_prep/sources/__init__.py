"""One reader per input format. Each module defines ``add_arguments(parser)`` (optional) and
``read(opts) -> (records, total)``: it validates its input eagerly (raising ``SourceError``
before anything is written) and returns an iterator of ``Record``/``Rejected`` plus, when
known, how many rows it will yield.

Rules every reader follows (helpers below):

- Text inputs (CSV/TSV, JSONL, JSON) are UTF-8, with or without a byte-order mark; any other
  encoding is a ``SourceError`` naming the file, the byte and its offset and line (exit 2).
- CSV/TSV fields may hold up to ``MAX_FIELD_CHARS`` (16 MiB) characters; a row with a longer field,
  a malformed quote, or more fields than the header is skipped as ``bad_row`` naming its line, and
  the rows after it are read. JSONL lines that do not parse as an object are ``bad_row`` too.
- Image paths of a row are resolved inside the image root (``resolve_inside``): ``..``, absolute
  paths and symlinks that leave it are refused and counted as ``outside_root`` (nothing outside the
  root is opened or stat'ed) unless ``--allow-outside-root`` is given.
- A field of the wrong type (a number, list or null where a string belongs) is ``bad_row`` naming
  the field, never a traceback; an exception while loading one image is that row's skip.
- Any other exception while handling one row, record, group or file (a path the system cannot encode,
  a value our code chokes on, a folder that cannot be listed) is that row's ``error`` skip, named by its
  label with the exception's type and message (quoted parts blanked: ``writer.exception_detail``):
  readers run each row through ``guard`` / ``each_row``, since a generator that raised cannot go on.
  What fails before the first row (the annotation unreadable, a wrong layout) stays a ``SourceError``.
- Folders of files (dicom, nifti) are walked by ``walk_input``: a symlink that leaves ``--input`` is
  ``outside_root`` (named ``entry N``), and nothing behind it is stat'ed, listed or opened, unless
  ``--allow-outside-root``; links that stay inside are followed, a folder reached twice is read once.
- Privacy: the formats that carry users' own data (pairs, imagefolder, dicom, nifti) make keys
  with a keyed hash of the path (``data_prep.keys.hashed_key``) and name failing rows by their
  annotation line or class and position only; no skip detail quotes a path (``load_file``). The
  public benchmark formats (llava, r2gen, slake, vqa_rad, pathvqa) keep the release's own ids and
  image names in keys and metadata: they are the published, already de-identified identifiers that
  predictions and papers refer to (see each module).
"""
from __future__ import annotations

import codecs
import csv
import importlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from vlm.data.paths import resolve_inside as _resolve_inside

FORMATS = ("pairs", "llava", "r2gen", "slake", "vqa_rad", "pathvqa", "imagefolder", "dicom", "nifti", "preference")
MAX_FIELD_CHARS = 16 * 1024 * 1024  # longest CSV/TSV field accepted (16 MiB); longer rows are bad_row


class SourceError(ValueError):
    """Input that cannot be read at all: a missing file, a wrong layout, missing columns."""


class BadField(ValueError):
    """One field of one row has the wrong type; the row is skipped as ``bad_row`` with this text."""


@dataclass
class BadRow:
    """A table row that could not be parsed (bad JSON, an over-long field): ``bad_row``, named by ``label``."""

    label: str
    detail: str


def guard(label: str, fn, *args):
    """``fn(*args)``, or ``Rejected("error", label, exception_detail(e))`` when it raises: an unforeseen
    failure while handling one row is that row's counted skip, never the end of the run (a reader's
    generator that raised cannot be resumed). ``MemoryError``, ``KeyboardInterrupt`` and ``SystemExit``
    propagate. ``label`` names the row without path text (its line, record or position)."""
    from data_prep.writer import Rejected, exception_detail

    try:
        return fn(*args)
    except MemoryError:
        raise
    except Exception as e:
        return Rejected("error", label, exception_detail(e))


def each_row(items, handle):
    """``handle(label, *rest)`` (a ``Record`` or ``Rejected``) for every ``(label, *rest)`` of ``items``,
    lazily, each run through ``guard``: one row's exception is that row's ``error`` skip."""
    for label, *rest in items:
        yield guard(label, handle, label, *rest)


def get_reader(fmt: str):
    if fmt not in FORMATS:
        raise SourceError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return importlib.import_module(f"data_prep.sources.{fmt}")


def require_file(path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{what} not found: {p}")
    return p


def read_text(path, what: str = "--input") -> str:
    """A UTF-8 file (a leading byte-order mark is dropped) -> str; another encoding is a one-line
    ``SourceError`` naming the file, the offending byte, its offset and line."""
    p = require_file(path, what)
    data = p.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        raise SourceError(f"{p}: not UTF-8 text: byte 0x{data[at]:02x} at offset {at} (line {line}); "
                          "save the file as UTF-8") from None


def _parse_json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadField(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise BadField(f"not valid JSON: {e}") from None
    except RecursionError:
        raise BadField("not valid JSON: nested too deeply") from None


def load_json(path, what: str):
    """A whole JSON file (UTF-8, BOM allowed); errors name the file and the line and column."""
    p = require_file(path, what)
    try:
        return _parse_json(read_text(p, what))
    except BadField as e:
        raise SourceError(f"{p}: {e}") from None


def json_records(path, layout: str, flag: str = "--input") -> list[tuple[str, object]]:
    """A record file: JSONL (rows ``line N``, bad JSON already a ``BadRow``) or a JSON list (``record N``).
    ``layout`` completes the error for any other JSON: "<path>: <layout>, found <type>"; ``flag`` names the
    option that gave the file in a not-found error."""
    if str(path).endswith((".jsonl", ".ndjson")):
        return load_table(path, flag)[1]
    data = load_json(path, flag)
    if not isinstance(data, list):
        raise SourceError(f"{path}: {layout}, found {type_name(data)}")
    return [(f"record {i}", r) for i, r in enumerate(data)]


def record_label(where: str, i: int, r) -> str:
    """``record 3 (id 1234)`` / ``line 3 (id p7)``, or the position alone when the id is unusable."""
    rid = r.get("id", i) if isinstance(r, dict) else None
    ok = isinstance(rid, (str, int)) and not isinstance(rid, bool)
    return f"{where} (id {str(rid)[:80]})" if ok else where


def record_id(where: str, i: int, r):
    """A record's id (its position when it has none), or the ``bad_row`` Rejected of a row that is not an
    object (a BadRow included) or whose id is not a string or number."""
    from data_prep.writer import Rejected

    if isinstance(r, BadRow):
        return Rejected("bad_row", where, r.detail)
    if not isinstance(r, dict):
        return Rejected("bad_row", where, f"{type_name(r)}, not an object")
    rid = r.get("id", i)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return Rejected("bad_row", where, f"id is {type_name(rid)}, not a string")
    return rid


def type_name(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, str):
        return "a string"
    return type(v).__name__


def text_field(row: dict, key: str, *, numbers: bool = False):
    """``row[key]`` as a non-blank string, or None when absent, null or blank; any other type is
    ``BadField`` (numbers are accepted as text where ``numbers``: VQA answers such as 2)."""
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        return v if v.strip() else None
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise BadField(f"{key} is {type_name(v)}, not a string")


def path_list(value, key: str) -> list[str]:
    """An image field that holds one path or a list of paths -> the paths (``BadField`` on other types)."""
    items = value if isinstance(value, list) else [value]
    for x in items:
        if not isinstance(x, str) or not x.strip():
            raise BadField(f"{key} holds {type_name(x) if not isinstance(x, str) else 'an empty string'}, "
                           "not a path")
    return items


def _read_csv(p: Path, text: str) -> tuple[list[str], list[tuple[str, dict | BadRow]]]:
    """CSV/TSV text -> (columns, [(label, row)]) read row by row: a bad row is a ``BadRow`` and the
    rows after it are still read. csv's own field limit is lifted while parsing (the text is in memory
    already) so that ``MAX_FIELD_CHARS`` is applied per row here, cleanly, instead of the csv module
    stopping mid-row."""
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    old = csv.field_size_limit()
    csv.field_size_limit(max(len(text) + 1, MAX_FIELD_CHARS + 1, old))
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
        header, rows, prev = None, [], 0
        while True:
            start = prev + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                if header is None:
                    raise SourceError(f"{p}: line {start}: the header is not valid CSV ({e})") from None
                rows.append((f"line {start}", BadRow(f"line {start}", f"not valid CSV: {e}")))
                prev = reader.line_num
                continue
            prev = reader.line_num
            if not fields:
                continue  # a blank line
            long = next((i for i, f in enumerate(fields) if len(f) > MAX_FIELD_CHARS), None)
            if header is None:
                if long is not None:
                    raise SourceError(f"{p}: line {start}: a header field is longer than {MAX_FIELD_CHARS} characters")
                header = fields
                continue
            label = f"line {start}"
            if long is not None:
                rows.append((label, BadRow(label, f"field {long + 1} is longer than {MAX_FIELD_CHARS} characters")))
            elif len(fields) > len(header):
                rows.append((label, BadRow(label, f"{len(fields)} fields, the header has {len(header)}")))
            else:  # missing trailing fields read as null, as csv.DictReader does
                rows.append((label, dict(zip(header, fields + [None] * (len(header) - len(fields))))))
        return list(header or []), rows
    finally:
        csv.field_size_limit(old)


def load_table(path, flag: str = "--input") -> tuple[list[str], list[tuple[str, dict | BadRow]]]:
    """CSV/TSV, JSONL or a JSON list -> (columns, [(label, row)]): each row a dict or a ``BadRow``.

    Labels name the row for the summary: ``line N`` (CSV/TSV, JSONL: the line the row starts on) or
    ``record N`` (a JSON list, 0-based).
    """
    p = require_file(path, flag)
    suffix = p.suffix.lower()
    if suffix == ".json":
        data = load_json(p, flag)
        if not isinstance(data, list):
            raise SourceError(f"{p}: expected a JSON list of objects, found {type_name(data)}")
        rows = [(f"record {i}", r if isinstance(r, dict) else BadRow(f"record {i}", f"{type_name(r)}, not an object"))
                for i, r in enumerate(data)]
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(read_text(p).split("\n"), 1):  # not splitlines(): JSON may hold U+2028
            if not line.strip():
                continue
            label = f"line {n}"
            try:
                row = _parse_json(line)
                if not isinstance(row, dict):
                    raise BadField(f"{type_name(row)}, not an object")
            except BadField as e:
                row = BadRow(label, str(e))
            rows.append((label, row))
    else:
        return _read_csv(p, read_text(p))
    cols = list(dict.fromkeys(k for _, r in rows if isinstance(r, dict) for k in r))
    return cols, rows


def pick_column(cols: list[str], candidates: tuple[str, ...], path, what: str, given: str | None = None) -> str:
    if given:
        if given not in cols:
            raise SourceError(f"{path}: column {given!r} ({what}) not found; columns are {cols}")
        return given
    for c in candidates:
        if c in cols:
            return c
    raise SourceError(f"{path}: no {what} column (looked for {', '.join(candidates)}); columns are {cols}")


def image_root(opts, default: Path) -> Path:
    root = Path(opts.image_root) if opts.image_root else default
    if not root.is_dir():
        raise SourceError(f"image folder not found: {root} (set --image-root)")
    return root


def check_key_secret(opts) -> None:
    """Read a secret that --key-secret names now, so that a bad one is an error before anything is written
    (the default secret, OUT/.key_secret, is created with the output at the first key)."""
    if getattr(opts, "key_secret", None):
        from data_prep.keys import KeySecretError, dataset_secret

        try:
            dataset_secret(opts)
        except (KeySecretError, OSError) as e:
            raise SourceError(f"--key-secret: {e}") from None


def resolve_inside(root, rel, opts) -> Path | None:
    """vlm.data.paths.resolve_inside with ``--allow-outside-root`` read from ``opts``."""
    return _resolve_inside(root, rel, getattr(opts, "allow_outside_root", False))



def walk_input(root, opts) -> list[tuple[str, object]]:
    """Every file under the folder ``root`` (dicom's and nifti's ``--input``) as ``(path under root, what)``,
    sorted as ``Path`` objects sort; ``what`` is:

    - a ``Path`` to read (for a symlink: its resolved target);
    - None for a symlink that leaves ``root`` (to a file or a folder): checked with ``resolve_inside``
      before its target is looked at, so nothing behind it is stat'ed, listed or opened; the reader counts
      it ``outside_root``. With ``--allow-outside-root`` such links are followed as links inside are;
    - a ``Rejected("error", "", why)`` for a folder that cannot be listed or an entry that cannot be
      looked at (the system's reason only, no path).

    Real folders are walked first, folder links after them, and a folder reached a second time (by a link to
    a folder already read, a link loop) is not read again: files keep the path under ``root`` that names
    them without links, so their keys do not depend on links beside them. Links to anything other than a
    folder or a regular file, and dangling links, are left out, as other non-files are. Iterative: any depth.
    """
    from data_prep.writer import Rejected

    root = Path(root)
    found: list[tuple[str, object]] = []
    seen: set[tuple[int, int]] = set()
    links: list[tuple[str, Path, tuple[int, int]]] = []  # folder links, followed once every real folder is read

    def failed(e: OSError) -> Rejected:
        return Rejected("error", "", f"{type(e).__name__}: {e.strerror or 'cannot be read'}")

    def walk(top_rel: str, top: Path) -> None:
        stack = [(top_rel, top)]
        while stack:
            rel, folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                if folder is root:
                    raise  # --input itself: the caller's SourceError
                found.append((rel, failed(e)))
                continue
            for e in entries:
                sub = f"{rel}/{e.name}" if rel else e.name
                try:
                    if e.is_symlink():  # resolved (inside, or allowed) before its target is looked at
                        real = resolve_inside(root, sub, opts)
                        if real is None:
                            found.append((sub, None))
                            continue
                        try:
                            st = os.stat(real)
                        except OSError:  # dangling
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            links.append((sub, real, (st.st_dev, st.st_ino)))
                        elif stat.S_ISREG(st.st_mode):
                            found.append((sub, real))
                    elif e.is_dir(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        if (st.st_dev, st.st_ino) not in seen:
                            seen.add((st.st_dev, st.st_ino))
                            stack.append((sub, Path(e.path)))
                    elif e.is_file(follow_symlinks=False):
                        found.append((sub, Path(e.path)))
                except OSError as err:
                    found.append((sub, failed(err)))

    st = os.stat(root)
    seen.add((st.st_dev, st.st_ino))
    walk("", root)
    while links:  # each folder is read once, so this ends whatever the links form
        sub, real, ident = links.pop(0)
        if ident not in seen:
            seen.add(ident)
            walk(sub, real)
    return sorted(found, key=lambda x: x[0].split("/"))


def walked_files(root: Path, opts, wanted) -> tuple[list[tuple[str, Path]], list]:
    """``--input`` of dicom/nifti -> ``([(path under root, path to read)], [Rejected])``: a single file as
    given (its name), a folder through ``walk_input``, keeping the files for which ``wanted(name, path)``
    holds; a link that leaves the folder is ``Rejected("outside_root", "entry N")`` and a folder or entry
    that cannot be read ``Rejected("error", "entry N", why)``, ``N`` its position in the sorted walk."""
    from data_prep.writer import Rejected

    if not root.is_dir():
        return ([(root.name, root)] if root.is_file() and wanted(root.name, root) else []), []
    try:
        entries = walk_input(root, opts)
    except OSError as e:
        raise SourceError(f"{root}: cannot list the folder ({e.strerror or type(e).__name__})") from None
    files, refused = [], []
    for n, (rel, what) in enumerate(entries, 1):
        if what is None:
            refused.append(Rejected("outside_root", f"entry {n}"))
        elif isinstance(what, Rejected):
            refused.append(Rejected(what.reason, f"entry {n}", what.detail))
        elif wanted(rel.rsplit("/", 1)[-1], what):
            files.append((rel, what))
    return files, refused

def _scrub(text: str, hide: tuple[str, ...]) -> str:
    for h in sorted(hide, key=len, reverse=True):
        text = text.replace(h, "<path>")
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)  # PIL names its buffer: noise


def load_file(load, path: str, hide: tuple[str, ...], *args):
    """``load(path, *args)`` (in a worker) with failures that never quote the path: a ``SkipSample``
    keeps its reason with ``hide`` (the path and its parts) blanked out of its detail, an ``OSError``
    becomes ``unreadable_image`` with the system's reason only, anything else ``error`` (type and the
    blanked message)."""
    from data_prep.writer import SkipSample

    try:
        return load(path, *args)
    except SkipSample as e:
        detail = "" if e.reason == "missing_image" else _scrub(e.detail, hide)
        raise SkipSample(e.reason, detail) from None
    except OSError as e:
        raise SkipSample("unreadable_image", e.strerror or type(e).__name__) from None
    except Exception as e:
        raise SkipSample("error", _scrub(f"{type(e).__name__}: {e}", hide)) from None


def file_ref(path: Path, rel: str, opts, dicom_options: dict | None = None):
    """An ``ImageRef`` that loads the resolved image file ``path`` (the row named it ``rel``): DICOM
    files (.dcm) through the dicom reader's PHI-safe decoder, others as PNG/JPEG/...; skip details
    never quote the path."""
    from data_prep.writer import ImageRef, load_image_file

    names = (*Path(rel).parts, path.name, path.parent.name)  # plain words (image, data) would only mangle text
    hide = tuple(dict.fromkeys([str(path), str(path.parent), rel,
                                *(h for h in names if len(h) >= 3 and not re.fullmatch(r"[a-z]+", h))]))
    if path.suffix.lower() == ".dcm":
        from data_prep.sources.dicom import load_dicom_frame, dicom_options as options_of

        return ImageRef(load_file, (load_dicom_frame, str(path), hide, 0, dicom_options or options_of(opts)))
    return ImageRef(load_file, (load_image_file, str(path), hide, opts.max_pixels))


def vqa_conversations(qas: list[dict]) -> list[dict]:
    """QA pairs of one image -> a LLaVA conversation, the image token on the first turn."""
    conv = []
    for i, qa in enumerate(qas):
        q = str(qa["question"]).strip()
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": str(qa["answer"]).strip()})
    return conv


def vqa_records(rows: list[tuple[str, object]], *, source: str, image_id, make_ref, meta_of,
                qa_keys: tuple[str, ...]):
    """Group VQA rows by image: one sample per image, its questions as a multi-turn conversation.

    ``rows`` are ``(label, row)`` pairs (the label names the row in the summary: ``record 12``); a
    ``BadRow`` or a row that is not an object is ``bad_row``.
    ``image_id(row)`` names the image (None: ``missing_image_path``; ``BadField``: ``bad_row``),
    ``make_ref(row)`` gives its ``ImageRef`` (None: the path leaves the image root, ``outside_root``),
    ``meta_of(row)`` the sample metadata (source, modality, split, ...); ``qa_keys`` are the row fields
    kept per question in ``meta["qa"]``. A question must be a string and its answer a string or a
    number; a row repeating an earlier row of the same image (the same ``qa_keys`` values, whatever its
    qid: PathVQA's qids are positions) is ``duplicate_row``. Any other exception while grouping a row is
    that row's ``error`` skip, and while building an image's sample that image's (named by its first row).
    """
    from data_prep.writer import Record, Rejected
    from vlm.data.schema import sanitize_key

    groups: dict[str, list[tuple[str, dict]]] = {}
    seen: set = set()

    def group(label, r):  # -> a Rejected, or None once the row joined its image's group
        if isinstance(r, BadRow):
            return Rejected("bad_row", label, r.detail)
        if not isinstance(r, dict):
            return Rejected("bad_row", label, f"{type_name(r)}, not an object")
        try:
            q, a = text_field(r, "question"), text_field(r, "answer", numbers=True)
            if q is None or a is None:
                return Rejected("bad_row", label, "no question or answer")
            img = image_id(r)
        except BadField as e:
            return Rejected("bad_row", label, str(e))
        if img is None:
            return Rejected("missing_image_path", label)
        sig = (img, json.dumps([r.get(k) for k in qa_keys if k != "qid"], sort_keys=True, default=str))
        if sig in seen:
            return Rejected("duplicate_row", label)
        seen.add(sig)
        groups.setdefault(img, []).append((label, r))
        return None

    def sample(label, img, members):
        first = members[0][1]
        ref = make_ref(first)
        if ref is None:
            return Rejected("outside_root", label)
        qas = [{k: r[k] for k in qa_keys if k in r} for _, r in members]
        for qa, (_, r) in zip(qas, members):
            qa["answer"] = text_field(r, "answer", numbers=True).strip()
        meta = meta_of(first) | {"qa": qas, "conversations": vqa_conversations(qas), "image_name": img}
        key = sanitize_key(f"{source}-{Path(img).with_suffix('') if '.' in Path(img).name else img}")
        return Record(key, [ref], None, meta, f"image {img}")

    rejected = [x for label, r in rows if (x := guard(label, group, label, r)) is not None]

    def gen():
        yield from rejected
        yield from each_row(((members[0][0], img, members) for img, members in groups.items()), sample)

    return gen(), len(groups) + len(rejected)


def read_parquet_rows(path):
    from vlm.data.formats import FormatError
    from vlm.data.formats import read_parquet_rows as read

    try:
        return read(path)
    except FormatError as e:
        raise SourceError(str(e)) from None


def parquet_vqa_records(opts, source: str, modality: str, qa_keys: tuple[str, ...]):
    """A Hugging Face VQA parquet release (VQA-RAD, PathVQA): rows of the splits --split names
    (all by default), grouped by image content (the release has no image names)."""
    import hashlib

    from data_prep.writer import ImageRef, load_image_bytes
    from vlm.data.formats import parquet_image

    wanted = None if opts.split in (None, "all") else set(opts.split.split(","))
    rows = []
    for split, part in read_parquet_rows(opts.input):
        if wanted and split not in wanted:
            continue
        for r in part:  # qid: the row's index within its split (vlm.data.formats)
            r["split"] = split
            rows.append((f"{split} row {r['qid']}", r))

    def image_id(r):
        data = parquet_image(r)
        if data is not None and not isinstance(data, (bytes, bytearray)):
            raise BadField(f"image bytes are {type_name(data)}")
        return f"{r['split']}-{hashlib.blake2b(data, digest_size=8).hexdigest()}" if data else None

    return vqa_records(rows, source=source, qa_keys=qa_keys, image_id=image_id,
                       make_ref=lambda r: ImageRef(load_image_bytes, (parquet_image(r), opts.max_pixels)),
                       meta_of=lambda r: {"source": source, "modality": modality, "split": r["split"]})
