"""Pathology foundation-model tile encoders, built with timm from the publisher's own architecture settings and loaded
from local weights in the publisher's layout (never downloaded).

    encoder = build_encoder("uni", "/models/UNI/pytorch_model.bin")      # a file, or the folder holding it
    embeddings = encoder(tiles)         # tiles: (N, 3, H, W) float, normalised with ENCODERS["uni"].mean / std

Each :class:`EncoderSpec` carries what the publisher's model card says: the timm architecture and its arguments, the
input size, the resize (and centre crop) in front of it, mean/std, how the embedding is pooled from the tokens, and
how the publisher's tensor names map onto timm's (:func:`map_state_dict`; checked name by name and shape by shape,
one line naming the file on any mismatch). Tiles reach :class:`FoundationEncoder` at the model's ``tile_px`` and are
resized on the tensor to the encoder's input (resizing a normalised tile equals normalising a resized one: the
normalisation is affine per channel).

The encoder's weights are the publisher's: their licences (several are non-commercial, no-derivatives) forbid
copying them into every model. So a :class:`FoundationEncoder` keeps them out of its state dict: a model saved with
one holds its head only, and its card names the encoder and the weights path (``head_config.encoder_weights``);
loading the card builds the encoder from that path again, or from the environment variable ``CALCISCOPE_<NAME>_WEIGHTS``
(``CALCISCOPE_UNI2_H_WEIGHTS``, ...) where the weights sit elsewhere on the scoring machine.

timm is an optional extra (``pip install 'calciscope[encoders]'``): it is imported only when an encoder is built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from calciscope.errors import CalciscopeError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "model.pt")


@dataclass(frozen=True)
class EncoderSpec:
    """One foundation encoder: how to build it, what it eats, how its weights are named.

    ``timm_kwargs`` may name layers by string ("swiglu" → ``timm.layers.SwiGLUPacked``, "silu" → ``nn.SiLU``).
    ``pool``: "token" (the model's pooled class token), "cls_mean" (class token ++ mean of the patch tokens, skipping
    ``prefix_tokens``: Virchow2) or "conch" (CONCH's attentional pooler + LayerNorm on the tokens). ``resize_px``
    then a centre crop of ``input_px`` is the publisher's preprocessing; ``tile_px`` the tile size to cut.
    ``layout``: "timm" (names as timm's, optionally under ``prefix``), "hf_dinov2" (Hugging Face Dinov2Model) or
    "conch" (the CoCa checkpoint: ``visual.trunk.*`` plus the contrastive pooler).
    """

    name: str
    publisher: str
    arch: str
    timm_kwargs: dict[str, Any]
    embed_dim: int
    input_px: int = 224
    resize_px: int = 224
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    interpolation: str = "bicubic"
    pool: str = "token"
    prefix_tokens: int = 1
    layout: str = "timm"
    prefix: str = ""
    mpp: float = 0.5
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tile_px(self) -> int:
        return self.resize_px

    def preprocessing(self) -> dict[str, Any]:
        """What travels in a card: input size, resize, crop, mean/std, interpolation, pooling, recommended mpp."""
        return {"encoder": self.name, "input_px": self.input_px, "resize_px": self.resize_px,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
                "pool": self.pool, "embed_dim": self.embed_dim, "mpp": self.mpp}


_VIT_L16 = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}
_GIANT = {"patch_size": 14, "embed_dim": 1536, "depth": 40, "num_heads": 24, "mlp_ratio": 2.66667 * 2,
          "mlp_layer": "swiglu", "act_layer": "silu"}

ENCODERS: dict[str, EncoderSpec] = {spec.name: spec for spec in (
    EncoderSpec("uni", "MahmoodLab/UNI (pytorch_model.bin)", "vit_large_patch16_224", dict(_VIT_L16), 1024,
                resize_px=224, interpolation="bilinear"),
    EncoderSpec("uni2-h", "MahmoodLab/UNI2-h (pytorch_model.bin)", "vit_giant_patch14_224",
                {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                 "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                 "mlp_layer": "swiglu", "act_layer": "silu", "reg_tokens": 8, "dynamic_img_size": True}, 1536,
                interpolation="bilinear"),
    EncoderSpec("virchow2", "paige-ai/Virchow2 (pytorch_model.bin)", "vit_huge_patch14_224",
                {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
                 "global_pool": "", "dynamic_img_size": True, "mlp_layer": "swiglu", "act_layer": "silu"}, 2560,
                pool="cls_mean", prefix_tokens=5),
    EncoderSpec("h-optimus-0", "bioptimus/H-optimus-0 (pytorch_model.bin)", "vit_giant_patch14_reg4_dinov2",
                {"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5,
                 "dynamic_img_size": True}, 1536, mean=HOPTIMUS[0], std=HOPTIMUS[1]),
    EncoderSpec("h-optimus-1", "bioptimus/H-optimus-1 (pytorch_model.bin)", "vit_giant_patch14_reg4_dinov2",
                {"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5,
                 "dynamic_img_size": True}, 1536, mean=HOPTIMUS[0], std=HOPTIMUS[1]),
    EncoderSpec("phikon-v2", "owkin/phikon-v2 (model.safetensors, Hugging Face Dinov2Model)", "vit_large_patch16_224",
                dict(_VIT_L16), 1024, interpolation="bilinear", layout="hf_dinov2"),
    EncoderSpec("conch", "MahmoodLab/CONCH (pytorch_model.bin, CoCa; the vision tower only)", "vit_base_patch16_224",
                {"img_size": 448, "patch_size": 16, "num_classes": 0, "global_pool": "", "dynamic_img_size": True},
                512, input_px=448, resize_px=448, mean=OPENAI_CLIP[0], std=OPENAI_CLIP[1], pool="conch",
                layout="conch", extra={"pool_heads": 8}),
    EncoderSpec("prov-gigapath", "prov-gigapath/prov-gigapath (pytorch_model.bin, the tile encoder)",
                "vit_giant_patch14_dinov2",
                {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                 "mlp_ratio": 5.33334, "num_classes": 0, "dynamic_img_size": True}, 1536, resize_px=256),
)}


def get_encoder_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except (KeyError, TypeError):
        raise CalciscopeError(f"unknown encoder {name!r}; choose one of: {', '.join(sorted(ENCODERS))}") from None


# -- building -----------------------------------------------------------------------------------------------------
def _timm():
    try:  # imported here: timm is an optional extra, needed only when an encoder is built
        import timm
    except ImportError:
        raise CalciscopeError("foundation encoders need timm: pip install 'calciscope[encoders]'") from None
    return timm


def _resolved_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    timm = _timm()
    layers = {"swiglu": timm.layers.SwiGLUPacked, "silu": nn.SiLU}
    return {k: layers.get(v, v) if isinstance(v, str) and k in ("mlp_layer", "act_layer") else v
            for k, v in spec.timm_kwargs.items()}


class ConchPooler(nn.Module):
    """CONCH's contrastive head without its projection: attentional pooling (one query, ``heads`` heads) over the
    trunk's tokens, then LayerNorm; parameter names as in the CONCH checkpoint (``attn_pool_contrast``,
    ``ln_contrast``)."""

    def __init__(self, d_model: int, context_dim: int, heads: int = 8):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, d_model))
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_contrast = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(tokens).permute(1, 0, 2)  # (T, N, C)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        pooled = self.attn(q, x, x, need_weights=False)[0][0]  # (N, d_model)
        return self.ln_contrast(pooled)


class FoundationEncoder(nn.Module):
    """A foundation encoder as a calciscope backbone: normalised tiles (N, 3, H, W) → embeddings (N, embed_dim).

    Its weights stay out of ``state_dict()`` (they are the publisher's file, named in the card), and a state dict
    loaded into a model holding one needs no tensor of it.
    """

    foldable = False  # no BatchNorm to fold at inference

    def __init__(self, spec: EncoderSpec, net: nn.Module, pooler: nn.Module | None = None,
                 weights: Path | None = None):
        super().__init__()
        self.spec, self.weights = spec, weights
        self.net = net
        self.pooler = pooler
        self._prefix = ""
        self._register_state_dict_hook(_drop_own_keys)
        self._register_load_state_dict_pre_hook(_remember_prefix, with_module=True)
        self.register_load_state_dict_post_hook(_forgive_missing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if x.shape[-1] != spec.resize_px or x.shape[-2] != spec.resize_px:
            x = F.interpolate(x, size=(spec.resize_px, spec.resize_px), mode=spec.interpolation,
                              align_corners=False, antialias=spec.interpolation != "nearest")
        if spec.resize_px != spec.input_px:  # the publisher's centre crop
            o = (spec.resize_px - spec.input_px) // 2
            x = x[..., o:o + spec.input_px, o:o + spec.input_px]
        out = self.net(x)
        if spec.pool == "cls_mean":
            return torch.cat([out[:, 0], out[:, spec.prefix_tokens:].mean(1)], dim=-1)
        if spec.pool == "conch":
            return self.pooler(out)
        return out


def _drop_own_keys(module: FoundationEncoder, state_dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _remember_prefix(module: FoundationEncoder, state_dict, prefix, *args) -> None:
    module._prefix = prefix


def _forgive_missing(module: FoundationEncoder, incompatible) -> None:
    missing = incompatible.missing_keys
    missing[:] = [k for k in missing if not k.startswith(module._prefix)]


def build_encoder(name: str, weights: str | Path | None = None, *, device: str | torch.device | None = None
                  ) -> FoundationEncoder:
    """The encoder ``name`` with the publisher's local ``weights`` (a file, or a folder holding one of
    ``WEIGHT_FILES``), in eval mode. ``weights`` None: random weights (tests), or the meta device with
    ``device="meta"`` (shapes only, nothing allocated)."""
    spec = get_encoder_spec(name)
    path = resolve_weights(spec, weights) if weights is not None else None
    target = torch.device("meta") if path is not None or device == "meta" else None
    with torch.device(target) if target is not None else nullcontext():
        net, pooler = _build_modules(spec)
    encoder = FoundationEncoder(spec, net, pooler, path)
    if path is not None:
        load_encoder_weights(encoder, path)
    return encoder.eval()


def _build_modules(spec: EncoderSpec) -> tuple[nn.Module, nn.Module | None]:
    net = _timm().create_model(spec.arch, pretrained=False, **_resolved_kwargs(spec))
    pooler = None
    if spec.pool == "conch":
        pooler = ConchPooler(spec.embed_dim, net.num_features, spec.extra.get("pool_heads", 8))
    return net, pooler


def resolve_weights(spec: EncoderSpec, weights: str | Path) -> Path:
    """The weights file: ``CALCISCOPE_<NAME>_WEIGHTS`` when set, else ``weights`` (a file, or a folder holding one of
    ``WEIGHT_FILES``); one error line naming the path and what to set when there is none."""
    env = env_variable(spec.name)
    path = Path(os.environ.get(env) or weights).expanduser()
    if path.is_dir():
        found = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if found is None:
            raise CalciscopeError(f"{path}: no weights file for encoder {spec.name!r} in this folder (looked for "
                                  f"{', '.join(WEIGHT_FILES)}; the publisher's is {spec.publisher})")
        return found
    if not path.is_file():
        raise CalciscopeError(f"{path}: weights for encoder {spec.name!r} not found (give the publisher's file or "
                              f"folder, {spec.publisher}; or set {env})")
    return path


def env_variable(name: str) -> str:
    return "CALCISCOPE_" + re.sub(r"[^A-Z0-9]+", "_", name.upper()) + "_WEIGHTS"


def read_publisher_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch .bin/.pth (``weights_only``: nothing unpickled beyond tensors);
    common wrappers (``state_dict``, ``model``) and a ``module.`` prefix are taken off."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as exc:  # truncated file, not a checkpoint, forbidden pickle globals ...
        raise CalciscopeError(f"{path}: cannot read weights ({type(exc).__name__}: {str(exc)[:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CalciscopeError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_encoder_weights(encoder: FoundationEncoder, path: Path) -> None:
    """Map the publisher's tensors onto the encoder and load them (assigned: a meta-device encoder materialises)."""
    spec = encoder.spec
    mapped = map_state_dict(spec, read_publisher_state(path))
    want = {**{f"net.{k}": v for k, v in encoder.net.state_dict().items()},
            **({f"pooler.{k}": v for k, v in encoder.pooler.state_dict().items()} if encoder.pooler else {})}
    problem = state_problem(mapped, {k: tuple(v.shape) for k, v in want.items()})
    if problem:
        raise CalciscopeError(f"{path}: does not hold {spec.name} weights ({problem}; the publisher's file is "
                              f"{spec.publisher})")
    encoder.net.load_state_dict({k[4:]: v for k, v in mapped.items() if k.startswith("net.")}, strict=True,
                                assign=True)
    if encoder.pooler is not None:
        encoder.pooler.load_state_dict({k[7:]: v for k, v in mapped.items() if k.startswith("pooler.")},
                                       strict=True, assign=True)
    encoder.weights = path


def state_problem(mapped: dict[str, Any], want: dict[str, tuple]) -> str | None:
    """What differs between mapped tensors and the names/shapes the encoder needs, in a few words; None if nothing."""
    missing, unexpected = sorted(set(want) - set(mapped)), sorted(set(mapped) - set(want))
    shapes = sorted(k for k in set(want) & set(mapped) if tuple(mapped[k].shape) != tuple(want[k]))
    parts = [f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for label, keys in
             (("missing", missing), ("unexpected", unexpected)) if keys]
    parts += [f"'{k}' is {tuple(mapped[k].shape)}, needs {tuple(want[k])}" for k in shapes[:2]]
    return "; ".join(parts) or None


# -- the publishers' layouts --------------------------------------------------------------------------------------
def map_state_dict(spec: EncoderSpec, state: dict[str, Any]) -> dict[str, Any]:
    """The publisher's tensors renamed (and fused where needed) to this encoder's names: ``net.*`` for the timm
    trunk, ``pooler.*`` for CONCH's head. Tensors the encoder does not use (a text tower, a mask token) are left
    out; anything else that does not fit shows up as missing or unexpected in :func:`state_problem`."""
    mappers: dict[str, Callable[[EncoderSpec, dict], dict]] = {
        "timm": _from_timm, "hf_dinov2": _from_hf_dinov2, "conch": _from_conch}
    return mappers[spec.layout](spec, state)


def _from_timm(spec: EncoderSpec, state: dict) -> dict:
    prefix = spec.prefix
    return {f"net.{k[len(prefix):]}": v for k, v in state.items()
            if k.startswith(prefix) and not k.startswith(prefix + "head.")}


def _from_conch(spec: EncoderSpec, state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("visual.trunk."):
            out["net." + key.removeprefix("visual.trunk.")] = value
        elif key.startswith("visual.attn_pool_contrast."):
            out["pooler." + key.removeprefix("visual.attn_pool_contrast.")] = value
        elif key.startswith("visual.ln_contrast."):
            out["pooler.ln_contrast." + key.removeprefix("visual.ln_contrast.")] = value
    return out


_HF_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}


def _from_hf_dinov2(spec: EncoderSpec, state: dict) -> dict:
    """Hugging Face ``Dinov2Model`` names → timm's ViT: q, k and v fuse into one ``qkv``."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    out, qkv = {}, {}
    simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    for key, value in state.items():
        if key in simple:
            out["net." + simple[key]] = value
            continue
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", key)
        if key == "embeddings.mask_token" or key.startswith("pooler."):
            continue  # the masked-image-modelling token and an unused pooler: not part of the encoder
        if match is None:
            out["net." + key] = value  # unknown: reported as unexpected
            continue
        block, name, kind = match.groups()
        if name.startswith("attention.attention."):
            qkv.setdefault((block, kind), {})[name.rsplit(".", 1)[-1]] = value
            continue
        name = f"{name}.{kind}" if kind != "lambda1" else f"{name}.lambda1"
        target = _HF_BLOCK.get(name.rsplit(".", 1)[0] if kind != "lambda1" else name)
        tail = "" if kind == "lambda1" else f".{kind}"
        out[f"net.blocks.{block}.{target}{tail}" if target else "net." + key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            out[f"net.blocks.{block}.attn.qkv.{kind}.incomplete"] = next(iter(parts.values()))
            continue
        out[f"net.blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out
