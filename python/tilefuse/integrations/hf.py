# SPDX-License-Identifier: Apache-2.0
"""Hugging Face ``transformers`` self-attention modules on tilefuse kernels.

The adapter keeps the original projection submodules (same objects, same state_dict keys) and
replaces only the attention computation. Matching is by class name so that importing this
module never imports ``transformers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..nn.attention import check_backend, run_attention


@dataclass(frozen=True)
class HFAttentionSpec:
    q: str
    k: str
    v: str
    out: Optional[str]  # output projection inside the module (ViT in transformers 5), if any
    head_dim_attr: str


# Self-attention classes whose forward is "project q/k/v, attend with a padding mask".
SPECS = {
    "BertSelfAttention": HFAttentionSpec("query", "key", "value", None, "attention_head_size"),
    "RobertaSelfAttention": HFAttentionSpec("query", "key", "value", None, "attention_head_size"),
    "XLMRobertaSelfAttention": HFAttentionSpec("query", "key", "value", None, "attention_head_size"),
    "ViTSelfAttention": HFAttentionSpec("query", "key", "value", None, "attention_head_size"),
    "ViTAttention": HFAttentionSpec("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"),
}


def why_not(module: nn.Module) -> Optional[str]:
    """None if :class:`HFSelfAttention` can replace the module exactly, else the reason."""
    spec = SPECS.get(type(module).__name__)
    if spec is None:
        return "not a known Hugging Face self-attention class"
    if getattr(module, "is_decoder", False) or getattr(module, "is_causal", False):
        return "decoder / causal attention with a KV cache is not converted"
    for name in (spec.q, spec.k, spec.v) + ((spec.out,) if spec.out else ()):
        if not isinstance(getattr(module, name, None), nn.Module):
            return f"missing projection {name!r}"
    return None


def _dropout_p(module) -> float:
    d = getattr(module, "dropout", None)
    if isinstance(d, nn.Dropout):
        return float(d.p)
    return float(getattr(module, "attention_dropout", 0.0) or 0.0)


def key_mask_from_hf(attention_mask: Optional[torch.Tensor], batch: int, seq_k: int):
    """The key-padding mask (bool [B, Sk], True = attend) of a Hugging Face encoder mask.

    HF passes bool [B, 1, Sq, Sk] (sdpa; True = attend), additive float [B, 1, Sq, Sk] (eager;
    0 kept, dtype-min masked) or a [B, Sk] 1/0 tokenizer mask. Encoder masks only pad keys, so
    every query row is the same and the last one is taken.
    """
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
        if m.dtype != torch.bool:
            m = m == 0
    elif m.dim() == 2:
        m = m.bool() if m.dtype != torch.bool else m
    else:
        raise ValueError(f"unsupported attention_mask shape {tuple(attention_mask.shape)}")
    return m.expand(batch, seq_k)


class HFSelfAttention(nn.Module):
    """Drop-in for a Hugging Face self-attention module (see ``SPECS``) on the fused kernel."""

    def __init__(self, module: nn.Module, backend: str = "tilefuse"):
        super().__init__()
        reason = why_not(module)
        if reason:
            raise ValueError(f"cannot convert {type(module).__name__}: {reason}")
        spec = SPECS[type(module).__name__]
        self.spec = spec
        self.source_class = type(module).__name__
        for name in (spec.q, spec.k, spec.v) + ((spec.out,) if spec.out else ()):
            self.add_module(name, getattr(module, name))
        self.head_dim = int(getattr(module, spec.head_dim_attr))
        self.num_heads = getattr(self, spec.q).out_features // self.head_dim
        self.num_kv_heads = getattr(self, spec.k).out_features // self.head_dim
        self.scaling = float(getattr(module, "scaling", 1.0 / math.sqrt(self.head_dim)))
        self.dropout_p = _dropout_p(module)
        self.backend = check_backend(backend)
        self.train(module.training)  # a fresh Module is in training mode; keep the model's mode

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                *args, **kwargs) -> Tuple[torch.Tensor, None]:
        B, S, _ = hidden_states.shape
        q = getattr(self, self.spec.q)(hidden_states).view(B, S, self.num_heads, self.head_dim)
        k = getattr(self, self.spec.k)(hidden_states).view(B, S, self.num_kv_heads, self.head_dim)
        v = getattr(self, self.spec.v)(hidden_states).view(B, S, self.num_kv_heads, self.head_dim)
        key_mask = key_mask_from_hf(attention_mask, B, S)
        if self.training and self.dropout_p > 0:
            # The fused kernel has no dropout: train with torch's SDPA so numbers match.
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                dropout_p=self.dropout_p, scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads).transpose(1, 2)
        else:
            out = run_attention(self.backend, q, k, v, scale=self.scaling, key_mask=key_mask)
        out = out.reshape(B, S, self.num_heads * self.head_dim)
        if self.spec.out:
            out = getattr(self, self.spec.out)(out)
        return out, None

    def extra_repr(self) -> str:
        return (f"from={self.source_class}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scaling:.4g}, dropout(train, via SDPA)={self.dropout_p}, "
                f"backend={self.backend!r}")


class HFSwinLayer(nn.Module):
    """Drop-in for a Hugging Face ``SwinLayer``: one fused window-attention call on the feature
    map instead of pad + roll + partition + attention + reverse + roll + crop.

    The submodules (layer norms, ``attention`` with its projections and relative position
    bias table, MLP) are the original objects, so ``state_dict`` keys are unchanged. HF pads
    the normalised map with zeros *before* the projections, so padded keys and values are the
    projection biases: they are passed as ``pad_kv``.
    """

    def __init__(self, layer: nn.Module, backend: str = "tilefuse"):
        super().__init__()
        if backend != "tilefuse":
            raise NotImplementedError("HFSwinLayer: only the tilefuse backend (the reference "
                                      "is the original layer)")
        for name in ("layernorm_before", "layernorm_after", "attention", "mlp", "dropout",
                     "drop_path"):
            self.add_module(name, getattr(layer, name))
        self.window_size = int(layer.window_size)
        self.shift_size = int(layer.shift_size)
        self.attention_dropout = float(getattr(self.attention, "attention_dropout", 0.0) or 0.0)
        self.train(layer.training)

    def forward(self, hidden_states: torch.Tensor, input_dimensions, always_partition=False,
                **kwargs):
        from ..neighborhood import window_attention

        height, width = int(input_dimensions[0]), int(input_dimensions[1])
        ws, shift = self.window_size, self.shift_size
        if not always_partition and min(height, width) <= ws:
            # HF: a map no larger than the window is one unshifted window.
            ws, shift = min(height, width), 0
        if self.training and self.attention_dropout > 0:
            raise NotImplementedError("HFSwinLayer: attention dropout in training (the fused "
                                      "kernel has none); set attention_probs_dropout_prob=0")
        attn = self.attention
        B, L, C = hidden_states.shape
        heads, hd = attn.num_attention_heads, attn.head_dim
        shortcut = hidden_states
        x = self.layernorm_before(hidden_states).view(B, height, width, C)
        q = attn.q_proj(x).view(B, height, width, heads, hd)
        k = attn.k_proj(x).view(B, height, width, heads, hd)
        v = attn.v_proj(x).view(B, height, width, heads, hd)
        pad_kv = None
        if (height % ws or width % ws) and attn.k_proj.bias is not None:
            pad_kv = (attn.k_proj.bias.view(heads, hd), attn.v_proj.bias.view(heads, hd))
        rpb = attn.relative_position_bias.relative_position_bias_table
        out = window_attention(q, k, v, ws, shift, rpb=rpb, scale=attn.scaling, pad_kv=pad_kv)
        out = attn.o_proj(out.reshape(B, height, width, C))
        out = self.dropout(out).view(B, L, C)
        hidden_states = shortcut + self.drop_path(out)
        residual = hidden_states
        hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + residual
        return hidden_states, None

    def extra_repr(self) -> str:
        return (f"from=SwinLayer, window_size={self.window_size}, shift_size={self.shift_size}, "
                f"heads={self.attention.num_attention_heads}, head_dim={self.attention.head_dim}, "
                "rpb=table, backend='tilefuse'")


def swin_why_not(layer: nn.Module) -> Optional[str]:
    attn = getattr(layer, "attention", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias")
    if attn is None or not all(hasattr(attn, n) for n in needed):
        return "unrecognised SwinLayer layout (this transformers version is not supported)"
    return None


class HFSwinv2Layer(nn.Module):
    """Drop-in for a Hugging Face ``Swinv2Layer`` (post-norm, cosine attention, continuous
    position bias) on one fused window-attention call.

    Cosine attention folds into the kernel's inputs: q' = normalize(q) * exp(clamped
    logit_scale) per head, k' = normalize(k), scale 1; the continuous position bias table
    16 * sigmoid(cpb_mlp(coords)) is an ordinary ``[(2W-1)^2, H]`` rpb table, so its MLP and
    ``logit_scale`` train through autograd. HF pads the raw hidden states, so padded keys and
    values are the normalised key bias (zeros without one) and the value bias.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        for name in ("attention", "layernorm_before", "layernorm_after", "drop_path",
                     "intermediate", "output"):
            self.add_module(name, getattr(layer, name))
        self.window_size = int(layer.window_size)
        self.shift_size = int(layer.shift_size)
        self.train(layer.training)

    def forward(self, hidden_states: torch.Tensor, input_dimensions, output_attentions=False,
                **kwargs):
        from ..neighborhood import window_attention

        sa = self.attention.self
        if self.training and sa.dropout.p > 0:
            raise NotImplementedError("HFSwinv2Layer: attention dropout in training (the fused "
                                      "kernel has none); set attention_probs_dropout_prob=0")
        height, width = int(input_dimensions[0]), int(input_dimensions[1])
        B, L, C = hidden_states.shape
        heads, hd = sa.num_attention_heads, sa.attention_head_size
        x = hidden_states.view(B, height, width, C)
        logit_scale = torch.clamp(sa.logit_scale, max=math.log(1.0 / 0.01)).exp().view(heads, 1)
        q = nn.functional.normalize(sa.query(x).view(B, height, width, heads, hd), dim=-1)
        q = q * logit_scale
        k = nn.functional.normalize(sa.key(x).view(B, height, width, heads, hd), dim=-1)
        v = sa.value(x).view(B, height, width, heads, hd)
        table = sa.continuous_position_bias_mlp(sa.relative_coords_table).view(-1, heads)
        rpb = 16 * torch.sigmoid(table)
        pad_kv = None
        if height % self.window_size or width % self.window_size:
            kb = sa.key.bias if sa.key.bias is not None else x.new_zeros(C)
            vb = sa.value.bias if sa.value.bias is not None else x.new_zeros(C)
            pad_kv = (nn.functional.normalize(kb.view(heads, hd), dim=-1), vb.view(heads, hd))
        out = window_attention(q, k, v, self.window_size, self.shift_size, rpb=rpb, scale=1.0,
                               pad_kv=pad_kv)
        out = self.attention.output(out.reshape(B, height * width, C), hidden_states)
        hidden_states = hidden_states + self.drop_path(self.layernorm_before(out))
        layer_output = self.output(self.intermediate(hidden_states))
        layer_output = hidden_states + self.drop_path(self.layernorm_after(layer_output))
        return (layer_output,)

    def extra_repr(self) -> str:
        sa = self.attention.self
        return (f"from=Swinv2Layer, window_size={self.window_size}, shift_size={self.shift_size}, "
                f"heads={sa.num_attention_heads}, head_dim={sa.attention_head_size}, "
                "cosine attention, rpb=continuous (cpb_mlp), backend='tilefuse'")


def swinv2_why_not(layer: nn.Module) -> Optional[str]:
    sa = getattr(getattr(layer, "attention", None), "self", None)
    needed = ("query", "key", "value", "logit_scale", "continuous_position_bias_mlp",
              "relative_coords_table")
    if sa is None or not all(hasattr(sa, n) for n in needed):
        return "unrecognised Swinv2Layer layout (this transformers version is not supported)"
    return None


class HFNeighborhoodAttention(nn.Module):
    """Drop-in for Hugging Face DiNAT's ``NeighborhoodAttention`` (2-D NA with dilation and the
    NAT/DiNAT relative positional bias ``rpb [H, 2k-1, 2k-1]``) on the fused NA kernel."""

    def __init__(self, module: nn.Module):
        super().__init__()
        for name in ("query", "key", "value", "dropout"):
            self.add_module(name, getattr(module, name))
        self.rpb = module.rpb  # the same Parameter: state_dict keys are unchanged
        self.kernel_size = int(module.kernel_size)
        self.dilation = int(module.dilation)
        self.num_heads = int(module.num_attention_heads)
        self.head_dim = int(module.attention_head_size)
        self.train(module.training)

    def forward(self, hidden_states: torch.Tensor, output_attentions=False, **kwargs):
        from ..neighborhood import na2d

        if self.training and self.dropout.p > 0:
            raise NotImplementedError("HFNeighborhoodAttention: attention dropout in training "
                                      "(the fused kernel has none)")
        B, H, W, C = hidden_states.shape
        shape = (B, H, W, self.num_heads, self.head_dim)
        q = self.query(hidden_states).view(shape)
        k = self.key(hidden_states).view(shape)
        v = self.value(hidden_states).view(shape)
        out = na2d(q, k, v, self.kernel_size, dilation=self.dilation, rpb=self.rpb,
                   scale=self.head_dim ** -0.5)
        return (out.reshape(B, H, W, C),)

    def extra_repr(self) -> str:
        return (f"from=NeighborhoodAttention, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, heads={self.num_heads}, head_dim={self.head_dim}, "
                "rpb=[H, 2k-1, 2k-1], backend='tilefuse'")


def natten_why_not(module: nn.Module) -> Optional[str]:
    needed = ("query", "key", "value", "rpb", "kernel_size", "dilation", "attention_head_size")
    if not all(hasattr(module, n) for n in needed):
        return "unrecognised NeighborhoodAttention layout"
    return None


def _neighbors(length: int, kernel_size: int, dilation: int, device):
    """Per position: its k neighbour indices and their rpb offsets (old NATTEN semantics)."""
    from ..reference.neighborhood import na_window

    start, _, group = na_window(length, kernel_size, dilation)
    t = torch.arange(kernel_size)
    idx = group[:, None] + (start[:, None] + t[None]) * dilation
    rel = start[:, None] + t[None] - (torch.arange(length) // dilation)[:, None] + kernel_size - 1
    return idx.to(device), rel.to(device)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    """Unfused QK + rpb of natten < 0.16 (``[B, H, X, Y, D]`` -> ``[B, H, X, Y, k*k]``), the
    function transformers' DiNAT calls, in plain PyTorch (reference speed)."""
    X, Y = query.shape[2], query.shape[3]
    ri, rr = _neighbors(X, kernel_size, dilation, query.device)
    ci, cr = _neighbors(Y, kernel_size, dilation, query.device)
    kn = key[:, :, ri[:, None, :, None], ci[None, :, None, :]]  # [B, H, X, Y, k, k, D]
    scores = (query[:, :, :, :, None, None, :] * kn).sum(-1)
    bias = rpb[:, rr[:, None, :, None], cr[None, :, None, :]]  # [H, X, Y, k, k]
    return (scores + bias).flatten(-2)


def natten2dav(attn, value, kernel_size, dilation):
    """Unfused AV of natten < 0.16: ``[B, H, X, Y, k*k]`` x ``[B, H, X, Y, D]``."""
    X, Y = value.shape[2], value.shape[3]
    ri, _ = _neighbors(X, kernel_size, dilation, value.device)
    ci, _ = _neighbors(Y, kernel_size, dilation, value.device)
    vn = value[:, :, ri[:, None, :, None], ci[None, :, None, :]]  # [B, H, X, Y, k, k, D]
    a = attn.unflatten(-1, (kernel_size, kernel_size))
    return (a[..., None] * vn).sum((-3, -2))


def unfused_neighborhood_attention_forward(self, hidden_states, output_attentions=False):
    """DiNAT's original unfused formulation: (q / sqrt(d)) k + rpb, softmax, AV over
    ``[B, heads, X, Y, d]``. transformers 5's own forward transposes the wrong axes
    (``[B, X, Y, heads, d].transpose(1, 2)``) before calling natten, so it is replaced too."""
    B, X, Y, C = hidden_states.shape
    heads, d = self.num_attention_heads, self.attention_head_size

    def split(t):
        return t.view(B, X, Y, heads, d).permute(0, 3, 1, 2, 4)

    q = split(self.query(hidden_states)) / math.sqrt(d)
    k, v = split(self.key(hidden_states)), split(self.value(hidden_states))
    probs = nn.functional.softmax(natten2dqkrpb(q, k, self.rpb, self.kernel_size, self.dilation), -1)
    probs = self.dropout(probs)
    ctx = natten2dav(probs, v, self.kernel_size, self.dilation).permute(0, 2, 3, 1, 4)
    ctx = ctx.reshape(B, X, Y, C)
    return (ctx, probs) if output_attentions else (ctx,)


def enable_dinat():
    """Let transformers build and run DiNAT models without natten.

    transformers' DiNAT calls ``natten.functional.natten2dqkrpb / natten2dav``, which no
    installable natten still has. This installs plain-PyTorch versions of those functions and
    the original unfused forward (so unconverted models run, slowly, as DiNAT defines them) and
    lifts the "requires natten" check; ``tilefuse.convert`` then swaps each
    ``NeighborhoodAttention`` for the fused kernel. Returns the patched ``modeling_dinat``.
    """
    try:
        from transformers.models.dinat import modeling_dinat
    except ImportError as e:
        raise ImportError("transformers' DiNAT could not be imported (an installed natten >= "
                          "0.16 lacks the functions it imports; uninstall natten, tilefuse "
                          f"replaces it): {e}") from e
    modeling_dinat.natten2dqkrpb = natten2dqkrpb
    modeling_dinat.natten2dav = natten2dav
    modeling_dinat.NeighborhoodAttention.forward = unfused_neighborhood_attention_forward
    original = modeling_dinat.requires_backends

    def requires_backends(obj, backends):
        rest = [b for b in backends if b != "natten"]
        if rest:
            original(obj, rest)

    modeling_dinat.requires_backends = requires_backends
    return modeling_dinat
