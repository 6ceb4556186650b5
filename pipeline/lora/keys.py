"""Read a Wan LoRA file's own keys and say, for every one, which parameter of the transformer it changes.

Published Wan LoRAs name their weights in one of three ways: diffusers/PEFT names (`transformer.blocks.0.attn1.to_q`,
bare, or PEFT's `base_model.model.`), Wan's original names (`diffusion_model.blocks.0.self_attn.q`, or bare) and
kohya/musubi's (`lora_unet_blocks_0_self_attn_q`: the original name with underscores). Each key ends in a kind:

- a LoRA pair, `lora_A`/`lora_down` and `lora_B`/`lora_up` (+ an optional `.alpha`: scale alpha / rank, else 1);
- a full difference: `diff` (a whole weight: norms, patch embedding, img_emb, any Linear), `diff_b` (a bias) and
  `diff_m` (a modulation table: `blocks.N.diff_m`, `head.diff_m`), added as they are;
- PEFT's `lora_B.bias` (a bias difference, scaled like its pair).

The plan is made from the file's keys before anything is loaded (diffusers' own converter drops some kinds with
an INFO log line), so every key either has a target here or is named in `problems` with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

# Wan's original module names -> diffusers' (diffusers/scripts/convert_wan_to_diffusers.py). Wan calls the
# cross-attention norm `norm3` and the pre-FFN norm `norm2`; diffusers swaps the two.
_BLOCK_NAMES = {
    **{f"self_attn.{o}": f"attn1.{d}" for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                                                    ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    **{f"cross_attn.{o}": f"attn2.{d}" for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                                                     ("norm_q", "norm_q"), ("norm_k", "norm_k"),
                                                     ("k_img", "add_k_proj"), ("v_img", "add_v_proj"),
                                                     ("norm_k_img", "norm_added_k"))},
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm1": "norm1",
    "norm2": "norm3",
    "norm3": "norm2",
    "modulation": "scale_shift_table",
}
_TOP_NAMES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_TO_ORIGINAL_BLOCK = {d: o for o, d in _BLOCK_NAMES.items()}
_TO_ORIGINAL_TOP = {d: o for o, d in _TOP_NAMES.items()}

_PREFIXES = ("base_model.model.transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.",
             "transformer.")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_")
_KINDS = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_B.bias", "up_bias"), (".alpha", "alpha"),
    (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
_PAIR_KINDS = ("down", "up", "alpha", "up_bias")
_KNOWN_UNSUPPORTED = {"dora_scale": "DoRA", "hada_": "LoHa", "lokr_": "LoKr", "oft_": "OFT", "set_weight": "set_weight"}


def original_name(diffusers_name: str) -> str | None:
    """Wan's original name of a diffusers module or parameter (blocks.0.attn1.to_q -> blocks.0.self_attn.q)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", diffusers_name)
    if match:
        local = _TO_ORIGINAL_BLOCK.get(match[2])
        return f"blocks.{match[1]}.{local}" if local else None
    return _TO_ORIGINAL_TOP.get(diffusers_name)


@dataclass
class ModelParts:
    """What a LoRA may target in one transformer, by every name a published layout uses for it."""

    shapes: dict[str, tuple[int, ...]]
    """diffusers parameter name -> shape (LoRA wrappers' `base_layer` left out of the name)."""
    linears: dict[str, tuple[int, int]]
    """diffusers name of every Linear -> (in_features, out_features)."""
    aliases: dict[str, str]
    """diffusers, original and underscored names -> the diffusers module (or table parameter) name."""

    @classmethod
    def of(cls, transformer: torch.nn.Module) -> ModelParts:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                continue  # an adapter's own weights, not the model's
            shapes[name.replace(".base_layer", "")] = tuple(getattr(param, "quant_shape", param.shape))  # GGUF
        linears = {}
        for name, module in transformer.named_modules():
            base = getattr(module, "base_layer", module)
            if isinstance(base, torch.nn.Linear) and ".lora_" not in name and not name.endswith("base_layer"):
                linears[name] = (base.in_features, base.out_features)
        owners = {n.rsplit(".", 1)[0] if n.endswith((".weight", ".bias")) else n for n in shapes}
        aliases: dict[str, str] = {}
        for owner in owners:
            for alias in (owner, original_name(owner)):
                if alias:
                    aliases[alias] = owner
                    aliases[alias.replace(".", "_")] = owner
        return cls(shapes, linears, aliases)


@dataclass
class LoraPair:
    """One LoRA pair on a Linear: delta W = scale * up @ down."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    keys: list[str]

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraPlan:
    """Where every key of one file goes; `problems` are (key, why) for the keys that fit nothing."""

    keys: int
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    """diffusers parameter name -> the difference to add at strength 1 (diff, diff_b, diff_m, pair biases,
    and pairs on layers that are not Linear, multiplied out)."""
    delta_keys: dict[str, list[str]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return max((p.rank for p in self.pairs.values()), default=0)

    def drop(self, modules: set[str], why: str) -> None:
        """Move the pairs on `modules` to the problems (the loader did not apply them)."""
        for module in sorted(modules):
            pair = self.pairs.pop(module)
            self.problems.extend((k, why) for k in pair.keys)


def _split(key: str) -> tuple[str, str, bool] | None:
    """(module path, kind, underscored) of a key; None when its kind is not one this loader knows."""
    underscored = False
    name = key
    for prefix in _UNDERSCORE_PREFIXES:
        if name.startswith(prefix):
            name, underscored = name[len(prefix):], True
            break
    else:
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
    for suffix, kind in _KINDS:
        if name.endswith(suffix):
            return name[: -len(suffix)], kind, underscored
    return None


def _unsupported(key: str) -> str:
    for marker, what in _KNOWN_UNSUPPORTED.items():
        if marker in key:
            return f"unsupported kind ({what} weights are not LoRA pairs or differences)"
    return "unsupported kind (not lora_A/B, lora_down/up, alpha, diff, diff_b or diff_m)"


def _resolve(parts: ModelParts, path: str, underscored: bool) -> str | None:
    return parts.aliases.get(path.replace(".", "_") if underscored else path)


def plan_lora(state_dict: dict[str, torch.Tensor], parts: ModelParts) -> LoraPlan:
    """Map every key of `state_dict` (a file's own keys, unconverted) onto `parts`."""
    plan = LoraPlan(keys=len(state_dict))
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        split = _split(key)
        if split is None:
            plan.problems.append((key, _unsupported(key)))
            continue
        path, kind, underscored = split
        if kind in _PAIR_KINDS:
            owner = _resolve(parts, path, underscored)
            if owner is None:
                plan.problems.append((key, f"this model has no layer {path!r}"))
                continue
            groups.setdefault(owner, {})[kind] = (key, tensor.float())
            continue
        _plan_difference(plan, parts, key, tensor.float(), path, kind, underscored)
    for owner, group in groups.items():
        _plan_pair(plan, parts, owner, group)
    return plan


def _add_delta(plan: LoraPlan, param: str, delta: torch.Tensor, keys: list[str]) -> None:
    plan.deltas[param] = plan.deltas[param] + delta if param in plan.deltas else delta
    plan.delta_keys.setdefault(param, []).extend(keys)


def _plan_difference(plan: LoraPlan, parts: ModelParts, key: str, tensor: torch.Tensor, path: str, kind: str,
                     underscored: bool) -> None:
    if kind == "diff_m":
        sep = "_" if underscored else "."
        path = f"{path}{sep}modulation" if path else "modulation"
        if path == "modulation":  # a bare top-level diff_m is the head's table
            path = "head.modulation"
    owner = _resolve(parts, path, underscored)
    if owner is None:
        plan.problems.append((key, f"this model has no layer or table {path!r}"))
        return
    if owner in parts.shapes:  # a table parameter itself (scale_shift_table)
        param = owner if kind != "diff_b" else None
    else:
        param = f"{owner}.bias" if kind == "diff_b" else f"{owner}.weight"
    if param is None or param not in parts.shapes:
        what = "bias" if kind == "diff_b" else "weight"
        plan.problems.append((key, f"{owner!r} has no {what} for a {kind} to change"))
        return
    if tuple(tensor.shape) != parts.shapes[param]:
        plan.problems.append((key, f"shape {tuple(tensor.shape)} does not fit {param} {parts.shapes[param]}"))
        return
    _add_delta(plan, param, tensor, [key])


def _plan_pair(plan: LoraPlan, parts: ModelParts, owner: str, group: dict[str, tuple[str, torch.Tensor]]) -> None:
    keys = [k for k, _ in group.values()]
    if "down" not in group or "up" not in group:
        missing = "lora_down/lora_A" if "down" not in group else "lora_up/lora_B"
        plan.problems.extend((k, f"its pair has no {missing} weight") for k in keys)
        return
    down, up = group["down"][1], group["up"][1]
    rank = down.shape[0]
    if down.ndim < 2 or up.ndim < 2 or up.shape[1] != rank:
        why = f"lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not make a rank-{rank} pair"
        plan.problems.extend((k, why) for k in keys)
        return
    scale = float(group["alpha"][1].item()) / rank if "alpha" in group else 1.0
    if owner in parts.linears:
        in_features, out_features = parts.linears[owner]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_features or up.shape[0] != out_features:
            why = (f"shapes {tuple(down.shape)} / {tuple(up.shape)} do not fit {owner} "
                   f"(in_features {in_features}, out_features {out_features})")
            plan.problems.extend((k, why) for k in keys)
            return
        pair_keys = [group[k][0] for k in ("down", "up", "alpha") if k in group]
        plan.pairs[owner] = LoraPair(owner, down, up, scale, pair_keys)
    else:  # a pair on a convolution or a table: multiplied out into a full difference
        weight = f"{owner}.weight" if f"{owner}.weight" in parts.shapes else owner
        shape = parts.shapes.get(weight)
        product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        if shape is None or product.numel() != torch.Size(shape).numel() or shape[0] != up.shape[0]:
            why = f"shapes {tuple(down.shape)} / {tuple(up.shape)} do not fit {weight} {shape}"
            plan.problems.extend((k, why) for k in keys)
            return
        _add_delta(plan, weight, scale * product.reshape(shape), [group[k][0] for k in ("down", "up", "alpha")
                                                                   if k in group])
    if "up_bias" in group:
        key, bias = group["up_bias"]
        param = f"{owner}.bias"
        if tuple(bias.shape) != parts.shapes.get(param):
            plan.problems.append((key, f"shape {tuple(bias.shape)} does not fit {param} {parts.shapes.get(param)}"))
        else:
            _add_delta(plan, param, scale * bias, [key])
