"""Frozen configuration dataclasses.

`RuntimeConfig` holds everything the runtime lets a user choose; it is read from
TOML, where an unknown section or key is an error that names it, and every value is
validated on construction. (The model's own shape, `ModelArgs`: offload/model_args.py.)
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from offload.errors import ConfigError
from offload.model_args import parse_rope_override

DEFAULT_MODEL = "smollm2"  # the embedded model (offload/loading.py: EMBEDDED)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # (package data: in a wheel too)


# ---------------------------------------------------------------------------
# Runtime configuration


def human_bytes(n: float) -> str:
    """A byte count as people read it (1.50 GiB): the inverse of `parse_bytes`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_bytes(value: int | str | None, key: str) -> int | None:
    """'6GiB', '512 MB', '1.5G', 1048576 -> bytes. None stays None ("from the machine")."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        if value is not None and value < 0:
            raise ConfigError(f"{key}: a size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a size like '6GiB' or an integer, got {value!r}")
    units = {
        "": 1, "b": 1,
        "k": 1000, "kb": 1000, "kib": 1024,
        "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
        "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
        "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
    }  # fmt: skip
    text = value.strip().lower().replace(" ", "")
    num = text.rstrip("kmgtib")
    unit = text[len(num) :]
    try:
        n = float(num)
    except ValueError:
        n = -1.0
    if unit not in units or not 0 <= n < float("inf"):  # (not NaN either)
        raise ConfigError(f"{key}: cannot read {value!r} as a size (examples: '6GiB', '512MB')")
    return int(n * units[unit])


DTYPES = ("bfloat16", "float16", "float32")
MAX_TOKENS = 1 << 24  # bound of every token count: far beyond any model's context window


def check_at_most(section, name: str, keys: tuple[str, ...], bound: int) -> None:
    """Refuse values a typo makes huge (window=1000000000 would allocate terabytes)."""
    for key in keys:
        value = getattr(section, key)
        if value > bound:
            raise ConfigError(f"{name}.{key}: must be at most {bound:,}, got {value:,}")


WEIGHT_MODES = ("auto", "dense", "int8", "int4")


@dataclass(frozen=True)
class ModelSection:
    dtype: str = "bfloat16"  # weights and KV; bf16 is about 2x faster than fp32 on CPU here
    device: str = "auto"  # "auto" picks cuda when present, else cpu
    threads: int = 0  # torch intra-op threads; 0: one per core others leave free (cores.py)
    weights: str = (
        "auto"  # auto | dense | int8 | int4 (CPU weight-only kernels; offload/quantize.py)
    )
    cuda_graphs: bool = True  # CUDA: replay each decode step of the device cache as one graph
    compile_step: bool = False  # CUDA: torch.compile the decode step before capturing it
    rope_scaling: str = ""  # "": the model's own; yarn:FACTOR[:ORIGINAL] or linear:...

    def __post_init__(self):
        if self.weights not in WEIGHT_MODES:
            raise ConfigError(
                f"model.weights: {self.weights!r} is not one of {', '.join(WEIGHT_MODES)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"model.device: {self.device!r} is not auto, cpu or cuda[:N]")
        if self.rope_scaling:
            parse_rope_override(self.rope_scaling)
        cpus = os.cpu_count() or 1
        if not 0 <= self.threads <= cpus:
            raise ConfigError(
                f"model.threads: must be between 0 (one per idle core) and this machine's "
                f"{cpus} CPUs, got {self.threads}"
            )


@dataclass(frozen=True)
class GenerationSection:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the likeliest; 0 disables
    seed: int | None = None
    repeat_penalty: float = 1.0  # > 1 discourages the last repeat_last_n tokens; 1 disables
    repeat_last_n: int = 64
    prefill_chunk: int = 2048  # tokens per prefill forward: bounds activation memory
    thinking: str = "auto"  # on | off: the chat template's enable_thinking (Qwen3); auto: unset

    @property
    def template_variables(self) -> dict[str, Any]:
        """What the chat template is rendered with besides the messages."""
        return {} if self.thinking == "auto" else {"enable_thinking": self.thinking == "on"}

    def __post_init__(self):
        if self.thinking not in ("auto", "on", "off"):
            raise ConfigError(f"generation.thinking: {self.thinking!r} is not auto, on or off")
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # also refuses NaN
            raise ConfigError(
                f"generation.temperature: must be a finite number >= 0, got {self.temperature}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"generation.seed: must be in [0, 2**63), got {self.seed}")
        if self.top_k < 0:
            raise ConfigError(f"generation.top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.repeat_penalty <= 100:  # NaN fails this too
            raise ConfigError(
                f"generation.repeat_penalty: must be in (0, 100], got {self.repeat_penalty}"
            )
        if not 0 <= self.repeat_last_n <= MAX_TOKENS:
            raise ConfigError(
                f"generation.repeat_last_n: must be in [0, {MAX_TOKENS:,}], got {self.repeat_last_n}"
            )
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise ConfigError(f"generation.top_p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"generation.min_p: must be in [0, 1], got {self.min_p}")
        if self.prefill_chunk < 1:
            raise ConfigError(f"generation.prefill_chunk: must be >= 1, got {self.prefill_chunk}")
        check_at_most(self, "generation", ("max_new_tokens", "prefill_chunk", "top_k"), MAX_TOKENS)


@dataclass(frozen=True)
class KVSection:
    """Where the KV cache lives. Sizes accept human units ("6GiB"); unset means "from the machine"."""

    chunk_size: int = 16  # tokens per host slot / disk record / summary group
    summary_bits: int = 2  # low-bit key summaries on the device: 2 or 4
    device_bytes: int | str | None = None  # CUDA: free memory minus a margin; CPU: host rule
    host_bytes: int | str | None = None  # psutil available memory minus a safety margin
    disk_dir: str | None = None  # NVMe directory for spilled chunks; default: a temp dir
    disk_bytes: int | str | None = None  # free space of disk_dir minus a margin
    spill_batch: int = 64  # chunks written per spill (per layer, one file)

    def __post_init__(self):
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"kv.chunk_size: must be a power of two, got {self.chunk_size}")
        if self.summary_bits not in (2, 4):
            raise ConfigError(f"kv.summary_bits: must be 2 or 4, got {self.summary_bits}")
        for key in ("device_bytes", "host_bytes", "disk_bytes"):
            object.__setattr__(self, key, parse_bytes(getattr(self, key), f"kv.{key}"))
        if self.spill_batch < 1:
            raise ConfigError(f"kv.spill_batch: must be >= 1, got {self.spill_batch}")
        check_at_most(self, "kv", ("chunk_size", "spill_batch"), 1 << 16)


SELECTION_MODES = ("full", "dense", "sparse", "auto")
SELECTORS = ("exact", "summary", "chunk", "cluster")
PREFETCH_MODES = ("off", "cache", "on", "auto")
REUSE_MODES = ("off", "on", "auto")


@dataclass(frozen=True)
class SelectionSection:
    """Which tokens each decode step attends to.

    Budgets count tokens per KV head per layer: budget = sink + window + retrieved.
    """

    mode: str = "auto"  # see docs/config.md
    selector: str = "cluster"  # exact | summary | chunk | cluster
    sink: int = 16  # first tokens, always attended, kept on the device
    window: int = 256  # most recent tokens, always attended, kept on the device
    retrieved: int = 0  # tokens chosen per step and KV head; 0 = retrieve_fraction of the context
    retrieve_fraction: float = 0.05  # measured: 5% keeps .97 of the attention mass (DESIGN.md)
    dense_layers: int = 2  # the first layers attend to everything (layer 0 needs it most)
    sparse_threshold: int = 4096  # mode "auto": sparse above this many context tokens
    cluster_size: int = 16  # about one centroid per this many tokens
    cluster_iters: int = 10  # spherical k-means iterations
    cluster_segment: int = 8192  # tokens clustered together; longer contexts get more segments
    candidate_factor: int = (
        8  # cluster candidates = factor x retrieved, reranked by summaries (docs/fidelity.md)
    )
    index_refresh: int = 256  # new decode tokens join the index in batches of this many
    prefetch: str = "auto"  # off | cache | on | auto (on with CUDA, off on CPU): docs/config.md
    hit_cache: float = 3.0  # device hit cache per layer and head, x the selection (>= 2)
    # every other decode step reuses the last selection, each token with its successor:
    # off | on | auto (on with CUDA, off on CPU): docs/fidelity.md
    reuse: str = "auto"

    def __post_init__(self):
        if self.mode not in SELECTION_MODES:
            raise ConfigError(
                f"selection.mode: {self.mode!r} is not one of {', '.join(SELECTION_MODES)}"
            )
        if self.selector not in SELECTORS:
            raise ConfigError(
                f"selection.selector: {self.selector!r} is not one of {', '.join(SELECTORS)}"
            )
        for key in ("sink", "retrieved", "dense_layers", "sparse_threshold"):
            if getattr(self, key) < 0:
                raise ConfigError(f"selection.{key}: must be >= 0, got {getattr(self, key)}")
        for key in (
            "window",
            "cluster_size",
            "cluster_iters",
            "cluster_segment",
            "candidate_factor",
            "index_refresh",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"selection.{key}: must be >= 1, got {getattr(self, key)}")
        if self.prefetch not in PREFETCH_MODES:
            raise ConfigError(
                f"selection.prefetch: {self.prefetch!r} is not one of {', '.join(PREFETCH_MODES)}"
            )
        if self.reuse not in REUSE_MODES:
            raise ConfigError(
                f"selection.reuse: {self.reuse!r} is not one of {', '.join(REUSE_MODES)}"
            )
        if self.hit_cache < 2:
            raise ConfigError(
                f"selection.hit_cache: must be >= 2 (x the tokens selected), got {self.hit_cache}"
            )
        check_at_most(self, "selection", ("sink", "window", "retrieved", "sparse_threshold",
                      "cluster_size", "cluster_segment", "index_refresh"), MAX_TOKENS)  # fmt: skip
        check_at_most(self, "selection", ("dense_layers",), 1 << 12)
        check_at_most(self, "selection", ("cluster_iters", "candidate_factor"), 1000)
        if not math.isfinite(self.hit_cache) or self.hit_cache > 1000:
            raise ConfigError(f"selection.hit_cache: must be at most 1000, got {self.hit_cache}")
        if not 0 < self.retrieve_fraction <= 1:
            raise ConfigError(
                f"selection.retrieve_fraction: must be in (0, 1], got {self.retrieve_fraction}"
            )

    def reuses(self, device) -> bool:
        """`reuse` on `device` ("auto": on where selecting is most of a step's time, a
        GPU; on a CPU the figures and tokens stay as they were)."""
        return self.reuse == "on" or (self.reuse == "auto" and device.type == "cuda")

    def retrieved_for(self, context_tokens: int) -> int:
        """Tokens to retrieve per KV head at this context length."""
        if self.retrieved:
            return self.retrieved
        return math.ceil(context_tokens * self.retrieve_fraction)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "generation": GenerationSection,
    "kv": KVSection,
    "selection": SelectionSection,
}


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything a user may choose, one frozen section per concern.

    Leaf key names are unique across sections, so an override may be given either
    as `"generation.top_k"` or simply as `top_k`.
    """

    model: ModelSection = field(default_factory=ModelSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    kv: KVSection = field(default_factory=KVSection)
    selection: SelectionSection = field(default_factory=SelectionSection)

    def __post_init__(self):
        if self.selection.mode != "full" and self.selection.window < self.kv.chunk_size:
            raise ConfigError(
                f"selection.window ({self.selection.window}) must be at least kv.chunk_size "
                f"({self.kv.chunk_size}): the chunk being filled is attended from the window"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RuntimeConfig:
        sections = {}
        for name, values in data.items():
            if name not in SECTIONS:
                owner = next((sec for sec in SECTIONS if name in _section_fields(sec)), None)
                if owner and not isinstance(values, dict):
                    raise ConfigError(f"{source}: {name} is a key of [{owner}]: write it there")
                raise ConfigError(
                    f"{source}: unknown section [{_shown(name)}]; known: {', '.join(SECTIONS)}"
                )
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            sections[name] = _build_section(name, values, source)
        return cls(**sections)

    @classmethod
    def from_toml(cls, path: str | Path) -> RuntimeConfig:
        """Read a TOML file, or a preset name from `offload/configs/` (e.g. `cpu-smollm2`)."""
        p = resolve_config_path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        try:
            return cls.from_dict(data, source=str(p))
        except ConfigError as e:  # (a value's error, which names its key: and the file)
            if str(e).startswith(f"{p}: "):
                raise
            raise ConfigError(f"{p}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> RuntimeConfig:
        """A copy with `section.key=value` or unique `key=value` overrides applied."""
        data = self.to_dict()
        for key, value in overrides.items():
            section, leaf = _locate(key)
            data[section][leaf] = value
        return RuntimeConfig.from_dict(data, source="overrides")


def _section_fields(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[name])}


def _locate(key: str) -> tuple[str, str]:
    if "." in key:
        section, leaf = key.split(".", 1)
        if section in SECTIONS and leaf in _section_fields(section):
            return section, leaf
    else:
        for section in SECTIONS:
            if key in _section_fields(section):
                return section, key
    known = [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]
    raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(known)}")


def _shown(key) -> str:
    """A key as an error names it: quoted where it is not a plain name (a newline in it)."""
    return key if str(key).isidentifier() else repr(key)


def _build_section(name: str, values: dict[str, Any], source: str):
    fields = _section_fields(name)
    for key in values:
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {name}.{_shown(key)}; known in [{name}]: {', '.join(fields)}"
            )
    cls = SECTIONS[name]
    defaults = cls()
    typed = {}
    for key, value in values.items():
        typed[key] = _coerce(value, type(getattr(defaults, key)), fields[key], f"{name}.{key}")
    return cls(**typed)


def _coerce(value: Any, default_type: type, f: dataclasses.Field, key: str) -> Any:
    """Accept TOML/CLI values of the field's type; strings from `--set` are converted."""
    annot = str(f.type)
    if value is None:
        if "None" in annot:
            return None
        raise ConfigError(f"{key}: a value is required")
    want = default_type
    if "int | str" in annot:  # a size: an integer or a string with units
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value
    if want is type(None):  # field defaults to None: read its annotation
        want = int if "int" in annot else str
    try:
        if want is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if want is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if want is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if want is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}")


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists() and p.name == str(path):  # a bare name: look among the presets
        preset = CONFIG_DIR / f"{p.name}.toml"
        if preset.exists():
            return preset
    if not p.is_file():
        presets = sorted(q.stem for q in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(
            f"config file not found: {p}" + (f" (presets: {', '.join(presets)})" if presets else "")
        )
    return p
