"""RAVEL counterfactual data: build sets from what a model knows, read and write them.

Rows are dicts with RAVEL's 13 columns (``input_prefix``, ``input_suffix``,
``counterfactual_input_prefix``, ``counterfactual_input_suffix``, ``edit_instruction``,
``entity``, ``counterfactual_entity``, ``target``, ``counterfactual_target``,
``attribute_type`` (``causal`` / ``isolate``), ``domain``, ``attribute``, ``verify_text``), the
columns of the JSONL files and ``datasets`` directories the command line writes.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from . import Model, _native

__all__ = ["build", "read", "write"]

Row = Dict[str, str]


def build(
    model: Union[None, str, Model] = None,
    attributes: Union[str, Sequence[str]] = ("Country",),
    split: Union[None, str, Sequence[str]] = None,
    *,
    causal: int = 1000,
    isolate: int = 1000,
    isolate_from: Optional[Sequence[str]] = None,
    domain: str = "city",
    kb_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    entities: str = "all",
    seed: int = 42,
    out: Optional[Union[str, "os.PathLike[str]"]] = None,
    format: str = "jsonl",
    force: bool = False,
    progress: bool = False,
    max_entities: int = 300,
) -> Union[List[Row], Dict[str, List[Row]]]:
    """Sample causal and isolate rows from the facts ``model`` knows (its knowledge table,
    computed once and cached), as ``hyperdas data build`` does; ``model=None`` treats every fact
    as known. ``split``: ``train``, ``val``, ``test``, ``heldout`` or a list (default: train, val
    and test). Returns the rows of a single split as a list, of several as ``{split: rows}``.
    With ``out``, also writes ``{domain}_{attribute}_{split}.jsonl`` (or ``datasets``
    directories with ``format="arrow"``) and a ``.summary.json`` per split into ``out``.
    ``max_entities``: entities whose facts are checked under every template, per attribute
    (fewer is faster; 0 checks every entity that passes the screen)."""
    if isinstance(model, str):
        model = Model.load(model)
    names = [attributes] if isinstance(attributes, str) else list(attributes)
    splits = None if split is None else ([split] if isinstance(split, str) else list(split))
    sets, _paths = _native.data_build(
        None if model is None else model._m,
        names,
        splits,
        causal,
        isolate,
        None if isolate_from is None else list(isolate_from),
        domain,
        None if kb_dir is None else os.fspath(kb_dir),
        entities,
        seed,
        None if out is None else os.fspath(out),
        format,
        force,
        progress,
        max_entities,
    )
    return sets[split] if isinstance(split, str) else sets


def read(path: Union[str, "os.PathLike[str]"], skip_bad_rows: bool = False) -> List[Row]:
    """The rows of a JSONL file or ``datasets`` save_to_disk directory; a malformed row is an
    error naming the file and row (or skipped with ``skip_bad_rows``)."""
    return _native.data_read(os.fspath(path), skip_bad_rows)


def write(rows: Sequence[Mapping[str, Any]], path: Union[str, "os.PathLike[str]"]) -> None:
    """Write rows: JSONL when ``path`` ends in ``.jsonl``, else a ``datasets`` directory."""
    _native.data_write(list(rows), os.fspath(path))
