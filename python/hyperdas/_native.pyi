"""Type stubs of the compiled module (python/src/lib.rs). Use the wrappers in ``hyperdas``:
arrays here are ``(bytes, shape)`` pairs, which the wrappers view as numpy arrays."""

from typing import Any, Callable, Dict, List, Optional, Tuple

Array = Tuple[bytes, List[int]]

__version__: str

class HyperdasError(Exception): ...

class Model:
    @staticmethod
    def load(spec: str, dtype: str = "f32", start_token: str = "auto", device: str = "cpu", progress: bool = False) -> Model: ...
    spec: str
    description: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    start_token: str
    def tokenize(self, text: str, prompt: bool = True) -> List[int]: ...
    def decode(self, ids: List[int]) -> str: ...
    def to_str_tokens(self, text: str) -> List[str]: ...
    def sites(self) -> List[str]: ...
    def _hidden_states(self, prompts: List[str], indices: Optional[List[int]] = None) -> Tuple[Array, Array]:
        """(states [B, T, n, D] f32, mask [B, T] u8)"""
    def _logits(self, prompts: List[str], positions: Optional[List[List[int]]] = None) -> Array:
        """[B, P, V] f32"""
    def _run_with_cache(self, prompts: List[str], sites: Optional[List[str]] = None) -> Tuple[Array, List[Tuple[str, Array]], Array]:
        """(logits [B, T, V], [(site, [B, T, D])], mask [B, T] u8)"""

class Run:
    @staticmethod
    def load(dir: str, progress: bool = False, device: Optional[str] = None) -> Run: ...
    dir: str
    method: str
    config: Dict[str, Any]
    def evaluate(self, data: Any = None, modes: Optional[List[str]] = None, skip_bad_rows: bool = False, progress: bool = False) -> Dict[str, Dict[str, Any]]: ...
    def apply(self, base: str, source: str, instruction: str, mode: str = "soft", top: int = 5, base_entity: Optional[str] = None, source_entity: Optional[str] = None) -> Dict[str, Any]: ...
    def _subspace(self, base: str, source: str, instruction: str, base_entity: Optional[str] = None, source_entity: Optional[str] = None) -> Array:
        """[D, k] f32"""
    def export_pyvene(self, out: str, data: Optional[str] = None, limit: int = 0) -> List[str]: ...

def show_config(method: str = "hyperdas", config: Any = None) -> str: ...
def fresh_run_dir(prefix: str) -> str: ...
def train(method: str, config: Any, out: str, resume: bool = False, progress: bool = False, callback: Optional[Callable[[Dict[str, Any]], Any]] = None) -> Optional[Dict[str, Any]]: ...
def data_build(
    model: Optional[Model] = None,
    attributes: List[str] = ...,
    split: Optional[List[str]] = None,
    causal: int = 1000,
    isolate: int = 1000,
    isolate_from: Optional[List[str]] = None,
    domain: str = "city",
    kb_dir: Optional[str] = None,
    entities: str = "all",
    seed: int = 42,
    out: Optional[str] = None,
    format: str = "jsonl",
    force: bool = False,
    progress: bool = False,
    max_entities: int = 300,
) -> Tuple[Dict[str, List[Dict[str, str]]], List[str]]: ...
def data_read(path: str, skip_bad_rows: bool = False) -> List[Dict[str, str]]: ...
def data_write(rows: List[Dict[str, str]], path: str) -> None: ...
def inference_modes() -> List[str]: ...
def fetch(name: str, progress: bool = False) -> str: ...
