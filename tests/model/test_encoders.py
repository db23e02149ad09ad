"""Foundation encoders: each named architecture builds with timm on the meta device from the publisher's settings, and
the loader maps the publisher's tensor names and shapes onto it exactly; wrong weights are one line naming the file."""

import pytest
import torch

from calciscope.errors import CalciscopeError
from calciscope.model.backbones import BACKBONES
from calciscope.model.encoders import ENCODERS, build_encoder, map_state_dict, state_problem

pytest.importorskip("timm")


def vit_keys(dim: int, depth: int, hidden: int, *, patch: int, positions: int, reg: int = 0, swiglu: bool = False,
             layer_scale: bool = True, prefix: str = "") -> dict[str, tuple]:
    """A timm-layout ViT checkpoint's tensor names and shapes, as the publishers ship them (UNI, UNI2-h, Virchow2,
    H-optimus, Prov-GigaPath: ``pytorch_model.bin`` keyed as timm's VisionTransformer)."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, positions, dim),
            "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    if reg:
        keys["reg_token"] = (1, reg, dim)
    fc1 = hidden if swiglu else hidden
    fc2_in = hidden // 2 if swiglu else hidden
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                     b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "mlp.fc1.weight": (fc1, dim),
                     b + "mlp.fc1.bias": (fc1,), b + "mlp.fc2.weight": (dim, fc2_in), b + "mlp.fc2.bias": (dim,)})
        if layer_scale:
            keys.update({b + "ls1.gamma": (dim,), b + "ls2.gamma": (dim,)})
    return {prefix + k: v for k, v in keys.items()}


def hf_dinov2_keys(dim: int, depth: int, hidden: int, positions: int) -> dict[str, tuple]:
    """Hugging Face ``Dinov2Model`` (Phikon-v2's ``model.safetensors``) names and shapes."""
    keys = {"embeddings.cls_token": (1, 1, dim), "embeddings.mask_token": (1, dim),
            "embeddings.position_embeddings": (1, positions, dim),
            "embeddings.patch_embeddings.projection.weight": (dim, 3, 16, 16),
            "embeddings.patch_embeddings.projection.bias": (dim,), "layernorm.weight": (dim,), "layernorm.bias": (dim,)}
    for i in range(depth):
        b = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            keys[b + f"attention.attention.{part}.weight"] = (dim, dim)
            keys[b + f"attention.attention.{part}.bias"] = (dim,)
        keys.update({b + "attention.output.dense.weight": (dim, dim), b + "attention.output.dense.bias": (dim,),
                     b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "norm2.weight": (dim,),
                     b + "norm2.bias": (dim,), b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                     b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,),
                     b + "layer_scale1.lambda1": (dim,), b + "layer_scale2.lambda1": (dim,)})
    return keys


def conch_keys() -> dict[str, tuple]:
    """The CONCH CoCa checkpoint: the vision trunk (timm ViT-B/16 at 448), the contrastive attentional pooler, and the
    parts the vision tower does not use (text tower, caption pooler, projections)."""
    keys = vit_keys(768, 12, 3072, patch=16, positions=785, layer_scale=False, prefix="visual.trunk.")
    pool = "visual.attn_pool_contrast."
    keys.update({pool + "query": (1, 512), pool + "attn.q_proj_weight": (512, 512),
                 pool + "attn.k_proj_weight": (512, 768), pool + "attn.v_proj_weight": (512, 768),
                 pool + "attn.in_proj_bias": (1536,), pool + "attn.out_proj.weight": (512, 512),
                 pool + "attn.out_proj.bias": (512,), pool + "ln_q.weight": (512,), pool + "ln_q.bias": (512,),
                 pool + "ln_k.weight": (768,), pool + "ln_k.bias": (768,), "visual.ln_contrast.weight": (512,),
                 "visual.ln_contrast.bias": (512,), "visual.proj_contrast": (512, 512),
                 "visual.attn_pool_caption.query": (256, 768), "visual.ln_caption.weight": (768,),
                 "text.token_embedding.weight": (32007, 768), "text.text_projection": (768, 512),
                 "logit_scale": ()})
    return keys


PUBLISHED = {
    "uni": lambda: vit_keys(1024, 24, 4096, patch=16, positions=197),
    "uni2-h": lambda: vit_keys(1536, 24, 8192, patch=14, positions=256, reg=8, swiglu=True),
    "virchow2": lambda: vit_keys(1280, 32, 6832, patch=14, positions=261, reg=4, swiglu=True),
    "h-optimus-0": lambda: vit_keys(1536, 40, 8192, patch=14, positions=256, reg=4, swiglu=True),
    "h-optimus-1": lambda: vit_keys(1536, 40, 8192, patch=14, positions=256, reg=4, swiglu=True),
    "prov-gigapath": lambda: vit_keys(1536, 40, 8192, patch=16, positions=197, swiglu=True),
    "phikon-v2": lambda: hf_dinov2_keys(1024, 24, 4096, positions=197),
    "conch": conch_keys,
}
EMBED = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "h-optimus-0": 1536, "h-optimus-1": 1536,
         "prov-gigapath": 1536, "phikon-v2": 1024, "conch": 512}


def meta_state(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def encoder_shapes(encoder) -> dict[str, tuple]:
    out = {f"net.{k}": tuple(v.shape) for k, v in encoder.net.state_dict().items()}
    if encoder.pooler is not None:
        out.update({f"pooler.{k}": tuple(v.shape) for k, v in encoder.pooler.state_dict().items()})
    return out


def test_every_named_encoder_is_listed_and_a_backbone():
    assert set(PUBLISHED) == set(ENCODERS)
    assert all(BACKBONES[name].feature_dim == EMBED[name] for name in ENCODERS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_encoder_builds_on_the_meta_device_and_maps_the_publishers_checkpoint_exactly(name):
    encoder = build_encoder(name, device="meta")
    spec = encoder.spec
    assert next(encoder.net.parameters()).device.type == "meta"
    mapped = map_state_dict(spec, meta_state(PUBLISHED[name]()))
    assert state_problem(mapped, encoder_shapes(encoder)) is None
    out = encoder(torch.empty(2, 3, spec.tile_px, spec.tile_px, device="meta"))
    assert tuple(out.shape) == (2, EMBED[name])
    assert encoder.state_dict() == {}  # the publisher's weights never go into a calciscope checkpoint


def test_a_checkpoint_of_another_encoder_does_not_map():
    encoder = build_encoder("uni", device="meta")
    wrong = map_state_dict(encoder.spec, meta_state(PUBLISHED["uni2-h"]()))
    problem = state_problem(wrong, encoder_shapes(encoder))
    assert "unexpected ['net.reg_token']" in problem and "needs" in problem


def test_phikon_v2_query_key_value_fuse_in_that_order():
    from calciscope.model.encoders import ENCODERS as specs

    state = {"encoder.layer.0.attention.attention.query.weight": torch.full((2, 2), 1.0),
             "encoder.layer.0.attention.attention.key.weight": torch.full((2, 2), 2.0),
             "encoder.layer.0.attention.attention.value.weight": torch.full((2, 2), 3.0)}
    fused = map_state_dict(specs["phikon-v2"], state)["net.blocks.0.attn.qkv.weight"]
    assert fused[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_bad_weights_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(CalciscopeError, match="weights for encoder 'uni' not found"):
        build_encoder("uni", tmp_path / "missing.bin")
    with pytest.raises(CalciscopeError, match="no weights file for encoder 'uni'"):
        build_encoder("uni", tmp_path)
    with pytest.raises(CalciscopeError, match="unknown encoder 'uni3'; choose one of"):
        build_encoder("uni3")
    junk = tmp_path / "pytorch_model.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CalciscopeError, match=f"{junk}: cannot read weights"):
        build_encoder("conch", junk)
