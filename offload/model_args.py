"""`ModelArgs`: the shape of a Llama-family decoder, read from an HF `config.json` or
from GGUF metadata, and checked against bounds far above any real model's."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from offload.errors import ConfigError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3")
ROPE_SCALINGS = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency scaling (`rope_scaling` in config.json, `rope.scaling.*` in GGUF):

    llama3  Llama 3.1: long wavelengths slowed by `factor`, short ones kept, the band
            between (`low_freq_factor`, `high_freq_factor`) interpolated
    yarn    YaRN (Qwen2.5 and Qwen3 past 32k): the same split, its band set by
            `beta_fast` and `beta_slow` rotations over `original_max_position`, and
            cos/sin scaled by `attention_factor` (default 0.1 ln(factor) + 1)
    linear  every frequency divided by `factor` (positions interpolated)
    longrope  Phi-3 past its original context: each frequency divided by its own
            `long_factor` (`short_factor` where the model's window is the original's),
            cos/sin scaled by `attention_factor` (default sqrt(1 + ln(factor) / ln(original)))
    """

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    kind: str = "llama3"  # (older weight caches stored llama3 scalings without a kind)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    short_factor: tuple[float, ...] | None = None  # longrope's, one a dimension pair
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self):
        for key in ("short_factor", "long_factor"):  # (a weight cache's JSON has lists)
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, tuple(float(x) for x in value))
        if self.kind not in ROPE_SCALINGS[1:]:
            raise ConfigError(
                f"unsupported rope scaling type {self.kind!r} "
                f"(supported: {', '.join(ROPE_SCALINGS)})"
            )
        for key in ("factor", "beta_fast", "beta_slow", "attention_factor"):
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ConfigError(
                    f"rope scaling {key} must be a finite number above 0, got {value!r}"
                )
        if self.original_max_position < 1:
            raise ConfigError(
                "rope scaling original_max_position_embeddings must be a positive integer, "
                f"got {self.original_max_position!r}"
            )

    @property
    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (YaRN's attention temperature; else 1)."""
        if self.kind not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor <= 1:
            return 1.0
        if self.kind == "longrope":
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position))
        return 0.1 * math.log(self.factor) + 1.0

    @property
    def context(self) -> int:
        """The context the scaling is for: YaRN and linear stretch the original by `factor`
        (llama3 and longrope: 0, their files give the context)."""
        stretched = self.kind in ("yarn", "linear")
        return int(self.original_max_position * self.factor) if stretched else 0

    @classmethod
    def from_hf(cls, rope: dict[str, Any], max_positions: int) -> RopeScaling | None:
        """From config.json's `rope_scaling` (or `rope_parameters`); None for the default."""
        kind = rope.get("rope_type", rope.get("type"))
        if kind in (None, "default"):
            return None
        if kind not in ROPE_SCALINGS:
            raise ConfigError(
                f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_SCALINGS)})"
            )
        original = int(rope.get("original_max_position_embeddings") or max_positions)
        if kind == "llama3":
            return cls(factor=float(rope["factor"]), kind=kind,
                       low_freq_factor=float(rope["low_freq_factor"]),
                       high_freq_factor=float(rope["high_freq_factor"]),
                       original_max_position=int(rope["original_max_position_embeddings"]))  # fmt: skip
        factor = rope.get("factor")
        factor = float(factor) if factor is not None else max_positions / original
        if kind == "longrope":
            short, long = rope["short_factor"], rope["long_factor"]
            attention = rope.get("attention_factor")
            return cls(factor=factor, kind=kind, original_max_position=original,
                       short_factor=short, long_factor=long,
                       attention_factor=None if attention is None else float(attention))  # fmt: skip
        if kind == "linear":  # (files give the stretched context, not the original one)
            if not rope.get("original_max_position_embeddings"):
                original = max(1, int(max_positions / factor))
            return cls(factor=factor, kind=kind, original_max_position=original)
        attention = rope.get("attention_factor")
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if attention is None and mscale and mscale_all and factor > 1:
            attention = (0.1 * mscale * math.log(factor) + 1) / (
                0.1 * mscale_all * math.log(factor) + 1
            )
        return cls(factor=factor, kind=kind, original_max_position=original,
                   beta_fast=float(rope.get("beta_fast") or 32.0),
                   beta_slow=float(rope.get("beta_slow") or 1.0),
                   attention_factor=None if attention is None else float(attention))  # fmt: skip


def parse_rope_override(spec: str) -> tuple[str, float, int | None]:
    """`model.rope_scaling`: "yarn:FACTOR[:ORIGINAL]" or "linear:FACTOR[:ORIGINAL]" ->
    (kind, factor, original context or None for the model's own)."""
    parts = spec.split(":")
    usage = (
        f"model.rope_scaling: {spec!r} is not yarn:FACTOR or linear:FACTOR, optionally "
        ":ORIGINAL (the context the model was trained for; its own by default), e.g. yarn:4"
    )
    if parts[0] not in ("yarn", "linear") or len(parts) not in (2, 3):
        raise ConfigError(usage)
    try:
        factor = float(parts[1])
        original = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise ConfigError(usage) from None
    if not (math.isfinite(factor) and factor >= 1) or (original is not None and original < 1):
        raise ConfigError(f"{usage}; FACTOR must be at least 1 and ORIGINAL positive")
    return parts[0], factor, original


NOPE_INTERVAL = 4  # SmolLM3: every 4th layer has no RoPE (llama.cpp's, for GGUF files)


def _nope_layers(cfg: dict[str, Any]) -> tuple[int, ...]:
    """SmolLM3's layers without RoPE: where `no_rope_layers` says 0, or every
    `no_rope_layer_interval`-th layer (4) where it is not given, as transformers does."""
    layers = int(cfg["num_hidden_layers"])
    flags = cfg.get("no_rope_layers")
    if flags is None:
        step = int(cfg.get("no_rope_layer_interval") or NOPE_INTERVAL)
        return tuple(i for i in range(layers) if (i + 1) % step == 0)
    if not isinstance(flags, list) or len(flags) != layers:
        raise ConfigError(f"no_rope_layers must be a list of {layers} flags, got {flags!r}")
    return tuple(i for i, rotates in enumerate(flags) if not rotates)


def whole_number(value: Any, name: str) -> int:
    """`value` (a config's or a GGUF header's) as an int where it is a whole number, or its
    digits: JSON's and GGUF's true and false are not numbers here (`int(True)` made a head
    of one dimension), nor is 64.5 a count of 64, nor infinity."""
    try:
        number = int(value)
        whole = isinstance(value, str) or number == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return number


def _count(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    """`whole_number` of a `config.json`'s `key`, `default` where it is absent or null
    (KeyError where there is none)."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        value = default
    return whole_number(value, key)


# Upper bounds of a model's dimensions, far above any real model's (Llama-3.1-405B: dim
# 16384, 126 layers, 128 heads; 256k-entry vocabularies; 10M-token contexts).
MODEL_BOUNDS = {"dim": 1 << 18, "num_layers": 1 << 12, "num_heads": 1 << 12,
                "num_kv_heads": 1 << 12, "head_dim": 1 << 12, "hidden_dim": 1 << 20,
                "vocab_size": 1 << 24, "max_seq_len": 1 << 24}  # fmt: skip


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors stored by llama.cpp (`rope_freqs.weight`) in place of rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # qwen3: an RMS norm over each q and k head before RoPE
    # RoPE over the first `rotary_dim` dimensions of each head only (Phi-4-mini: 96 of
    # 128); None: the whole head. See `weights.pair_rotary_dims` for how it is run.
    rotary_dim: int | None = None
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (SmolLM3: every 4th)
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        for key, most in MODEL_BOUNDS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model {key} must be a positive integer, got {value!r}")
            if value > most:  # a header's claim, before anything is sized from it
                raise ConfigError(f"model {key} must be at most {most:,}, got {value:,}")
        if self.head_dim % 2:
            raise ConfigError(
                f"model head_dim must be even (RoPE turns pairs of dimensions), got {self.head_dim}"
            )
        for key in ("norm_eps", "rope_theta"):
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"model {key} must be a finite number above 0, got {value!r}")
        object.__setattr__(self, "nope_layers", tuple(self.nope_layers))  # (JSON: a list)
        if any(type(i) is not int or not 0 <= i < self.num_layers for i in self.nope_layers):
            raise ConfigError(
                f"model nope_layers must be layer numbers below {self.num_layers}, "
                f"got {list(self.nope_layers)!r}"
            )
        r = self.rotary_dim
        if not (r is None or type(r) is int and 0 < r < self.head_dim and r % 2 == 0):
            raise ConfigError(
                f"model rotary_dim must be an even number of dimensions below the head's "
                f"{self.head_dim}, got {r!r}"
            )
        s = self.rope_scaling
        if s is not None and s.kind == "longrope":
            for key in ("short_factor", "long_factor"):
                n = len(getattr(s, key) or ())
                if n != self.rope_dim // 2:
                    raise ConfigError(
                        f"rope scaling {key}: {n} factors for {self.rope_dim // 2} "
                        "rotated dimension pairs"
                    )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def rope_dim(self) -> int:
        """The dimensions of each head that RoPE rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Build from the dict of an HF `config.json` (llama, mistral, qwen2, qwen3, phi3,
        smollm3)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"{source}: unsupported model_type {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        try:
            dim = _count(cfg, "hidden_size")
            num_heads = _count(cfg, "num_attention_heads")
            head_dim = _count(cfg, "head_dim", 0) or (dim // num_heads if num_heads > 0 else 0)
            rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
            theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
            max_pos = _count(cfg, "max_position_embeddings", 4096)
            rotary = float(cfg.get("partial_rotary_factor",
                                   rope.get("partial_rotary_factor", 1.0)))  # fmt: skip
            if not 0 < rotary <= 1:
                raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {rotary!r}")
            rotary_dim = int(head_dim * rotary)  # (as transformers rounds it; Phi-4-mini: 96)
            if cfg.get("original_max_position_embeddings") and isinstance(rope, dict):
                rope = {"original_max_position_embeddings": cfg["original_max_position_embeddings"],
                        **rope}  # (Phi-3 keeps it beside rope_scaling)  # fmt: skip
            scaling = RopeScaling.from_hf(rope, max_pos)
            if scaling is not None:  # (YaRN's files keep the original in max_position)
                max_pos = max(max_pos, scaling.context)
            window = _count(cfg, "sliding_window", 0)
            slides = cfg.get("use_sliding_window", arch in ("mistral", "phi3"))
            if window and slides and window < max_pos:
                # Attention here is global: exact for contexts up to the window only.
                max_pos = window
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                arch=arch,
                dim=dim,
                num_layers=_count(cfg, "num_hidden_layers"),
                num_heads=num_heads,
                num_kv_heads=_count(cfg, "num_key_value_heads", 0) or num_heads,
                head_dim=head_dim,
                hidden_dim=_count(cfg, "intermediate_size"),
                vocab_size=_count(cfg, "vocab_size"),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_seq_len=max_pos,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                qk_norm=arch == "qwen3",
                rotary_dim=rotary_dim if rotary_dim != head_dim else None,
                nope_layers=_nope_layers(cfg) if arch == "smollm3" else (),
                bos_id=cfg.get("bos_token_id"),
                eos_ids=tuple(whole_number(e, "eos_token_id") for e in eos_ids),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
        except ConfigError as e:  # a value out of bounds: name the file
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:  # a list for a number, and such
            raise ConfigError(f"{source}: invalid value: {e}") from None

    def with_rope_override(self, spec: str) -> ModelArgs:
        """These args with `model.rope_scaling`'s scaling in place of the file's (what
        llama.cpp's --rope-scaling does): the context becomes ORIGINAL x FACTOR, ORIGINAL
        being the context the file's scaling starts from, or the file's context."""
        kind, factor, original = parse_rope_override(spec)
        if original is None:
            s = self.rope_scaling
            original = s.original_max_position if s is not None else self.max_seq_len
        scaling = RopeScaling(factor=factor, kind=kind, original_max_position=original)
        return dataclasses.replace(
            self, rope_scaling=scaling, rope_freq_factors=None, max_seq_len=scaling.context
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """`to_dict` without the fields added after sessions were first saved where they
        hold the value every earlier model had: a saved session names its model by this
        (`LoadedModel.fingerprint`), so those sessions still match their models."""
        d = self.to_dict()
        if not self.qk_norm:
            del d["qk_norm"]
        if self.rotary_dim is None:
            del d["rotary_dim"]
        if not self.nope_layers:
            del d["nope_layers"]
        if self.rope_scaling is not None and self.rope_scaling.kind == "llama3":
            for key in ("kind", "beta_fast", "beta_slow", "attention_factor", "short_factor",
                        "long_factor"):  # fmt: skip
                del d["rope_scaling"][key]
        return d
