"""`ModelArgs`: the shape of a Llama-family decoder, read from an HF `config.json` or
from GGUF metadata, and checked against bounds far above any real model's."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from offload.errors import ConfigError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


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
        for key in ("norm_eps", "rope_theta"):
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"model {key} must be a finite number above 0, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Build from the dict of an HF `config.json` (llama, mistral, qwen2)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"{source}: unsupported model_type {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        try:
            dim = int(cfg["hidden_size"])
            num_heads = int(cfg["num_attention_heads"])
            head_dim = int(cfg.get("head_dim") or (dim // num_heads if num_heads > 0 else 0))
            rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
            theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
            scaling = None
            if rope.get("rope_type", rope.get("type")) == "llama3":
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position=int(rope["original_max_position_embeddings"]),
                )
            elif rope.get("rope_type", rope.get("type")) not in (None, "default"):
                raise ConfigError(
                    f"{source}: unsupported rope scaling type "
                    f"{rope.get('rope_type', rope.get('type'))!r} (supported: default, llama3)"
                )
            max_pos = int(cfg.get("max_position_embeddings", 4096))
            window = cfg.get("sliding_window")
            if window and cfg.get("use_sliding_window", arch == "mistral") and window < max_pos:
                # Attention here is global: exact for contexts up to the window only.
                max_pos = int(window)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                arch=arch,
                dim=dim,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                hidden_dim=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_seq_len=max_pos,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                bos_id=cfg.get("bos_token_id"),
                eos_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:  # a list for a number, and such
            raise ConfigError(f"{source}: invalid value: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
