"""Loading an HF model directory: `config.json` plus safetensors (single or sharded).

Tensors are read with safetensors (never pickle), renamed to this project's
module names, cast to the requested dtype and assigned into a model built on
the meta device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from offload.errors import ConfigError, ModelLoadError
from offload.model import Transformer
from offload.model_args import ModelArgs

_HF_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.attention.wq.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.attention.wk.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.attention.wv.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", r"layers.\1.attention.\2_norm.weight"),
    # phi3: q, k, v in one matrix, and gate and up in one (split by `split_fused`)
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", r"layers.\1.attention.wqkv.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", r"layers.\1.feed_forward.w13.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]
_HF_PATTERNS = [(re.compile(p + "$"), r) for p, r in _HF_NAMES]


def rename(name: str, patterns) -> str | None:
    """Map a checkpoint's tensor name to ours with (compiled pattern, replacement) pairs."""
    for pattern, repl in patterns:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def read_hf_config(directory: Path) -> ModelArgs:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory}: no config.json (expected an HF model directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
        raise ModelLoadError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
    try:
        return ModelArgs.from_hf_config(cfg, source=str(path))
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: cannot read the shard index: {e}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard files missing: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if found:
        return [directory / n for n in found]
    other = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.pt")
    )
    hint = f" (found {', '.join(other)}: pickle checkpoints are not loaded)" if other else ""
    raise ModelLoadError(f"{directory}: no safetensors weights{hint}")


def load_hf_model(
    directory: Path, dtype: torch.dtype, device: torch.device, pack=None, args=None
) -> Transformer:
    """The model of an HF directory, its tensors in `dtype` on `device`, or, with `pack`
    (an `Int4Packer`), its block linears packed as they are read (the rest in host
    memory). `args`: its config, where the caller has read it already."""
    args = args or read_hf_config(directory)
    state: dict[str, torch.Tensor] = {}
    for shard in _shard_files(directory):
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in f.keys():
                    ours = rename(name, _HF_PATTERNS)
                    if ours is None:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue  # derived from config, not loaded
                        raise ModelLoadError(f"{shard}: unexpected tensor {name!r}")
                    t = f.get_tensor(name)
                    state[ours] = pack(ours, t) if pack else t.to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{shard}: cannot read safetensors file: {e}") from None
    return build_model(args, split_fused(state, args), str(directory), pack)


def split_fused(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """phi3's fused matrices as the separate ones a model is built from (`fuse` joins
    them again): qkv rows [Hq D | Hkv D | Hkv D], gate_up rows [F | F]. A matrix of
    another size is left whole, for build_model to name."""
    out = {}
    q, kv, F = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.hidden_dim
    for name, t in state.items():
        if name.endswith("attention.wqkv.weight") and t.shape[0] == q + 2 * kv:
            for part, piece in zip("qkv", t.split((q, kv, kv)), strict=True):
                out[name.replace("wqkv", f"w{part}")] = piece
        elif name.endswith("feed_forward.w13.weight") and t.shape[0] == 2 * F:
            out[name.replace("w13", "w1")], out[name.replace("w13", "w3")] = t.split((F, F))
        else:
            out[name] = t
    return out


def pair_rotary_dims(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """RoPE over part of each head (`args.rotary_dim` r of D dimensions, Phi-4-mini's 96
    of 128) run as a whole head's rotation: each q and k head's dimensions are reordered
    so that rotate-half pairs the rotated ones as the partial rotation does (d with
    d + r/2) and the others with each other, at frequency 0 (`model.rope_inv_freq`),
    which leaves them as they are. Attention scores are dot products of q and k, so they
    do not change; every kernel and cache stays whole-head."""
    if args.rotary_dim is None:
        return state
    r, half, D = args.rotary_dim // 2, args.head_dim // 2, args.head_dim
    # first half: the rotated pairs' first members, then half of the others; second
    # half: the pairs' second members, then the rest
    order = torch.cat((torch.arange(r), torch.arange(2 * r, r + half),
                       torch.arange(r, 2 * r), torch.arange(r + half, D)))  # fmt: skip
    out = dict(state)
    for name, t in state.items():
        if re.search(r"attention\.(wq|wk)\.(weight|bias)$|attention\.(q|k)_norm\.weight$", name):
            heads = t.reshape(-1, args.head_dim, *t.shape[1:])
            out[name] = heads[:, order].reshape(t.shape)
    return out


_LAYER = re.compile(r"layers\.(\d+)\.")


def build_model(
    args: ModelArgs, state: dict[str, torch.Tensor], source: str, pack=None
) -> Transformer:
    """Assign a renamed state dict into a model built on the meta device; with `pack`
    (an `Int4Packer` whose meta tensors `state` holds), its packed linears at int4."""
    # The file's tensors, not its metadata, bound what is built: a header claiming 10^9
    # layers must not build 10^9 modules before the tensors are compared.
    layers = {int(m.group(1)) for m in map(_LAYER.match, state) if m}
    if len(layers) != args.num_layers or layers and max(layers) != args.num_layers - 1:
        raise ModelLoadError(
            f"{source}: the config says {args.num_layers} layers, the weights hold "
            f"{len(layers)}" + (f" (numbered up to {max(layers)})" if layers else "")
        )
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict().keys())
    # No output matrix in the checkpoint means tied embeddings, whatever the config says
    # (some checkpoints omit lm_head without setting tie_word_embeddings).
    tied = "output.weight" not in state
    if tied:
        expected.discard("output.weight")
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}")
        raise ModelLoadError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    for name, t in state.items():
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(t.shape)}, config implies {tuple(want)}"
            )
    model.load_state_dict(pair_rotary_dims(state, args), strict=False, assign=True)
    if tied:
        model.tie_weights()
    if pack is not None:  # (the rows as the state: split, then reordered)
        pack.install(model, pair_rotary_dims(split_fused(pack.rows, args), args))
    return model.fuse().eval()
