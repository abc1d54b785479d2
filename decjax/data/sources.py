"""Text sources. Each returns ``dict[domain_name, list[str]]``: documents grouped by domain.

* :func:`load_pystdlib`: the running Python's standard library, one domain per package.
* :func:`load_text_dir`: a folder of text files, one domain per sub-folder.
* :func:`load_hf`: a Hugging Face dataset (optional extra ``decjax[hf]``).

The synthetic Markov source lives in :mod:`decjax.data.synthetic`. Documents and domains come
back in a deterministic order, so everything downstream (splits, packing) is reproducible.
"""

import logging
import os
import pathlib
import sysconfig
from collections.abc import Sequence

Documents = dict[str, list[str]]

TOPLEVEL_DOMAIN = "toplevel"
DEFAULT_TEXT_DIR_DOMAIN = "default"
# Top-level stdlib folders that are not library code worth modelling (test suites, the IDE,
# GUI demos, the deprecated 2to3 tool) or are not code at all.
EXCLUDED_STDLIB_DIRS = frozenset(
    {"test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "__pycache__"}
)
# Test suites nested inside packages (e.g. ``unittest/test`` is 3/4 of ``unittest``).
EXCLUDED_NESTED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})

_LOG = logging.getLogger(__name__)


def stdlib_path() -> pathlib.Path:
    """The folder holding the running interpreter's pure-Python standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_stdlib_package(path: pathlib.Path) -> bool:
    # Dunder folders (``__phello__``) are frozen-module test stubs; build folders such as
    # ``config-3.11-x86_64-linux-gnu`` or ``lib-dynload`` are not packages.
    name = path.name
    return (
        path.is_dir()
        and name.isidentifier()
        and not name.startswith("__")
        and name not in EXCLUDED_STDLIB_DIRS
        and (path / "__init__.py").is_file()
    )


def available_pystdlib_domains() -> list[str]:
    """Sorted names of the standard-library domains (packages plus ``toplevel``)."""
    root = stdlib_path()
    packages = [p.name for p in root.iterdir() if _is_stdlib_package(p)]
    return sorted([*packages, TOPLEVEL_DOMAIN])


def _package_files(package_dir: pathlib.Path) -> list[pathlib.Path]:
    """``.py`` files of a package in sorted relative-path order, skipping nested test suites."""
    files = []
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_NESTED_DIRS)
        files.extend(pathlib.Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda f: f.relative_to(package_dir).as_posix())


def _toplevel_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.iterdir() if p.suffix == ".py" and p.is_file())


def _cap_by_size(sizes: Sequence[int], max_bytes: int) -> int:
    """How many leading items fit in ``max_bytes`` (0 = no cap); at least one, never empty."""
    if max_bytes <= 0:
        return len(sizes)
    total = 0
    for count, size in enumerate(sizes):
        total += size
        if total > max_bytes:
            return max(count, 1)
    return len(sizes)


def cap_documents(documents: Documents, max_bytes_per_domain: int) -> Documents:
    """Keeps, per domain, the longest prefix of documents within ``max_bytes_per_domain``.

    Truncation is by whole documents in their (sorted) order, so it is deterministic. A domain
    whose first document alone exceeds the cap keeps that one document rather than vanishing.
    Sizes are UTF-8 bytes; ``0`` means no cap.
    """
    capped = {}
    for domain, docs in documents.items():
        sizes = [len(doc.encode("utf-8")) for doc in docs]
        capped[domain] = docs[: _cap_by_size(sizes, max_bytes_per_domain)]
    return capped


def select_domains(available: Sequence[str], requested: Sequence[str], source: str) -> list[str]:
    """Returns ``requested`` (in its order), or all of ``available`` when it is empty.

    Raises:
        ValueError: a requested domain is not available; the message lists the available ones.
    """
    if not requested:
        return list(available)
    unknown = [d for d in requested if d not in available]
    if unknown:
        raise ValueError(
            f"data.domains has unknown domain(s) {unknown} for data.source={source!r}; "
            f"available: {', '.join(available)} (data.domains=() loads them all)"
        )
    return list(requested)


def _read_text(path: pathlib.Path) -> str | None:
    """The file's text, or ``None`` when it is not UTF-8 text (binary files are skipped)."""
    text, _ = _read_text_or_why(path)
    return text


def _read_text_or_why(path: pathlib.Path) -> tuple[str | None, str]:
    """``(text, "")``, or ``(None, why it is not a text document)``."""
    data = path.read_bytes()
    if not data.strip():
        return None, "empty"
    if b"\x00" in data:
        return None, "binary (NUL bytes)"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start})"


def load_pystdlib(domains: Sequence[str] = (), max_bytes_per_domain: int = 0) -> Documents:
    """The running Python's standard-library sources, one document per ``.py`` file.

    Each top-level package (``asyncio``, ``email``, ``json``, ...) is a domain; top-level
    single-file modules form the domain ``toplevel``. The test suite, ``site-packages``,
    ``idlelib``, ``lib2to3``, ``tkinter``, ``turtledemo`` and test folders nested in packages are
    excluded. Only the requested domains are read from disk.

    Args:
        domains: domain names to load, in this order; empty loads every domain (sorted).
        max_bytes_per_domain: per-domain cap in bytes by whole files in sorted order; 0 = no cap.

    Returns:
        ``{domain: [file text, ...]}`` with files in sorted relative-path order.

    Raises:
        ValueError: an unknown domain (the message lists the available ones).
    """
    root = stdlib_path()
    selected = select_domains(available_pystdlib_domains(), domains, "pystdlib")
    documents = {}
    for domain in selected:
        if domain == TOPLEVEL_DOMAIN:
            files = _toplevel_files(root)
        else:
            files = _package_files(root / domain)
        # Cap by file size before reading, so a small cap does not read whole packages.
        files = files[: _cap_by_size([f.stat().st_size for f in files], max_bytes_per_domain)]
        texts = [_read_text(f) for f in files]
        documents[domain] = [t for t in texts if t]
    return {domain: docs for domain, docs in documents.items() if docs}


def _text_files(folder: pathlib.Path, recursive: bool) -> list[pathlib.Path]:
    pattern = "**/*" if recursive else "*"
    files = [
        p
        for p in folder.glob(pattern)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda f: f.relative_to(folder).as_posix())


def load_text_dir(
    path: str | os.PathLike,
    domains: Sequence[str] = (),
    max_bytes_per_domain: int = 0,
    *,
    skipped: dict[str, str] | None = None,
) -> Documents:
    """Text files under ``path``: each sub-folder is a domain, each text file a document.

    Files directly in ``path`` form the domain ``default``; files nested deeper belong to their
    top-level sub-folder's domain. Any UTF-8 file counts as text (``.txt``, ``.md``, source
    code, ...); binary and non-UTF-8 files, empty files and hidden files are skipped, and every
    skipped file but a hidden one is named in a warning.

    Args:
        path: the folder (``data.path``).
        domains: domain names to keep, in this order; empty keeps all (sorted).
        max_bytes_per_domain: per-domain cap in bytes by whole files in sorted order; 0 = no cap.
        skipped: if given, filled with ``{path relative to path: why it was skipped}``.

    Returns:
        ``{domain: [file text, ...]}``.

    Raises:
        ValueError: ``path`` is missing or holds no text, or an unknown domain was requested.
    """
    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"data.path={str(path)!r} is not an existing folder (data.source='text_dir')"
        )
    groups = {DEFAULT_TEXT_DIR_DOMAIN: _text_files(folder, recursive=False)}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        groups[sub.name] = _text_files(sub, recursive=True)
    documents, why_skipped = {}, {}
    for domain, files in groups.items():
        texts = []
        for f in files:
            text, why = _read_text_or_why(f)
            if text is None:
                why_skipped[f.relative_to(folder).as_posix()] = why
            else:
                texts.append(text)
        if texts:
            documents[domain] = texts
    if skipped is not None:
        skipped.update(why_skipped)
    if why_skipped:
        _LOG.warning("data.path=%r: skipped %d of %d files: %s", str(path), len(why_skipped),
                        sum(len(f) for f in groups.values()), describe_skipped(why_skipped))
    if not documents:
        raise ValueError(
            f"data.path={str(path)!r} contains no UTF-8 text files (data.source='text_dir')"
            + (f"; skipped {describe_skipped(why_skipped)}" if why_skipped else "")
        )
    available = sorted(documents)
    selected = select_domains(available, domains, "text_dir")
    return cap_documents({d: documents[d] for d in selected}, max_bytes_per_domain)


def describe_skipped(skipped: dict[str, str], limit: int = 5) -> str:
    """``"a.bin (binary (NUL bytes)), b.txt (empty), ... and 3 more"``."""
    named = [f"{name} ({why})" for name, why in list(skipped.items())[:limit]]
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return ", ".join(named) + more


def load_hf(
    name: str,
    *,
    config_name: str = "",
    split: str = "train",
    text_field: str = "text",
    max_documents: int = 10000,
) -> Documents:
    """The first ``max_documents`` non-empty texts of a Hugging Face dataset split.

    The whole split is downloaded into the Hugging Face cache (not streamed), so later runs work
    offline. The domain is the dataset name.

    Args:
        name: dataset name on the Hub (``data.hf_name``).
        config_name: dataset configuration (``data.hf_config``); empty for none.
        split: split name or slice expression (``data.hf_split``).
        text_field: column holding the text (``data.hf_text_field``).
        max_documents: how many documents to keep (``data.max_documents``).

    Returns:
        ``{name: [text, ...]}``.

    Raises:
        ImportError: the optional ``datasets`` package is missing.
        RuntimeError: the dataset could not be downloaded or loaded.
        ValueError: the text column is missing or the split has no text.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "data.source='hf' needs the Hugging Face `datasets` package, which is not installed: "
            "pip install decjax[hf]"
        ) from error
    try:
        dataset = datasets.load_dataset(name, config_name or None, split=split)
    except Exception as error:  # Network, auth and missing-dataset errors all look different.
        raise RuntimeError(
            f"the Hugging Face dataset data.hf_name={name!r} (config {config_name!r}, split "
            f"{split!r}) could not be downloaded or loaded: {error}. Without network access use "
            "data.source='pystdlib', 'text_dir' or 'synthetic' instead"
        ) from error
    if text_field not in dataset.column_names:
        raise ValueError(
            f"data.hf_text_field={text_field!r} is not a column of {name!r}; "
            f"columns: {', '.join(dataset.column_names)}"
        )
    texts = []
    # Row by row, so a huge split is never materialized as one Python list.
    for row in dataset.select_columns([text_field]):
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            texts.append(text)
            if len(texts) >= max_documents:
                break
    if not texts:
        raise ValueError(f"data.hf_name={name!r} split {split!r} has no non-empty text")
    return {name: texts}
