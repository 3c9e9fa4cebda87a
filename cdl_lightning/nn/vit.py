"""A timm Vision Transformer that accepts per-layer key/value prefixes and extra tokens.

Prefix tuning (Li & Liang, 2021) as used by prompt-based continual learning (L2P, DualPrompt, CODA-Prompt): a
prompt for layer ``l`` is a pair ``(Pk, Pv)`` concatenated to that block's attention keys and values,
``K = [Pk; K]``, ``V = [Pv; V]``. Queries come only from the real tokens, so the sequence length does not grow.

`PromptedViT` wraps a timm ``VisionTransformer`` (it never copies timm's code): it walks ``vit.blocks`` itself and,
for a block that receives a prefix, re-states ``Block.forward``/``Attention.forward`` with the block's own
submodules and ``F.scaled_dot_product_attention`` (fused kernels), so with no prompts the output is bit-identical to
``vit.forward_features``.

`GemmPatchEmbed` (opt-in, ``PromptedViT.patch_embed_gemm_``) runs timm's patch-embedding convolution (kernel == stride
== patch size, no padding) as a reshape and one GEMM: the same map, rounded differently.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, PatchEmbed
from timm.layers.trace_utils import _assert
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

Prefix = tuple[Tensor, Tensor]
"""A key prefix and a value prefix, each ``B x L x D`` (or ``1 x L x D`` to broadcast over the batch)."""


def merge_prefixes(*prefix_maps: dict[int, Prefix] | None) -> dict[int, Prefix]:
    """Concatenate several ``{layer: (Pk, Pv)}`` maps along the token axis (batch-broadcasting as needed)."""
    merged: dict[int, list[Prefix]] = {}
    for prefixes in prefix_maps:
        for layer, prefix in (prefixes or {}).items():
            merged.setdefault(layer, []).append(prefix)
    out: dict[int, Prefix] = {}
    for layer, parts in merged.items():
        if len(parts) == 1:
            out[layer] = parts[0]
            continue
        batch = max(p[0].shape[0] for p in parts)
        keys = torch.cat([p[0].expand(batch, -1, -1) for p in parts], dim=1)
        values = torch.cat([p[1].expand(batch, -1, -1) for p in parts], dim=1)
        out[layer] = (keys, values)
    return out


def prefix_attention(attn: Attention, x: Tensor, prefix: Prefix) -> Tensor:
    """timm ``Attention.forward`` with a key/value prefix; the prefix enters after the qkv projection and q/k norm."""
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim)
    q, k, v = qkv.unbind(2)  # B x N x H x hd views
    q, k = attn.q_norm(q.transpose(1, 2)), attn.k_norm(k.transpose(1, 2)).transpose(1, 2)
    pk, pv = prefix
    # prefix and tokens are joined along the token axis in B x N x H x hd layout (rows of H*hd contiguous values: a
    # fast copy), then viewed as B x H x N x hd for the attention kernel
    k = torch.cat([pk.to(k.dtype).expand(batch, -1, -1).reshape(batch, -1, heads, head_dim), k], dim=1)
    v = torch.cat([pv.to(v.dtype).expand(batch, -1, -1).reshape(batch, -1, heads, head_dim), v], dim=1)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def prefix_block(block: Block, x: Tensor, prefix: Prefix) -> Tensor:
    """timm ``Block.forward`` whose attention receives a key/value prefix."""
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def gemm_patch_embed_ineligibility(patch_embed: nn.Module) -> str | None:
    """Why ``patch_embed`` cannot run as `GemmPatchEmbed` (its reasons joined by ``"; "``), or ``None`` if it can.

    Eligible: timm's own ``PatchEmbed`` (not a subclass with another forward) whose ``proj`` is a plain ``nn.Conv2d``
    with kernel size == stride == ``patch_size``, no padding, dilation 1, one group; a fixed input size (``img_size``
    set, ``strict_img_size``: what a ViT built without ``dynamic_img_size`` has) that is a multiple of the patch size;
    no ``dynamic_img_pad``; flattened ``B x N x C`` output (``flatten``, no ``output_fmt``).
    """
    if type(patch_embed) not in (PatchEmbed, GemmPatchEmbed):
        return f"the patch embedding is a {type(patch_embed).__name__}, not timm's PatchEmbed"
    proj, patch = patch_embed.proj, tuple(patch_embed.patch_size)
    if type(proj) is not nn.Conv2d:
        return f"its projection is a {type(proj).__name__}, not a plain nn.Conv2d"
    reasons = []
    if tuple(proj.kernel_size) != patch or tuple(proj.stride) != patch:
        reasons.append(f"its convolution's kernel {tuple(proj.kernel_size)} and stride {tuple(proj.stride)} are not "
                       f"the patch size {patch}")
    if proj.padding not in ((0, 0), "valid"):
        reasons.append(f"its convolution pads ({proj.padding})")
    if tuple(proj.dilation) != (1, 1) or proj.groups != 1:
        reasons.append(f"its convolution has dilation {tuple(proj.dilation)} and {proj.groups} groups")
    if patch_embed.dynamic_img_pad:
        reasons.append("dynamic_img_pad=True (inputs are padded to a multiple of the patch size)")
    if patch_embed.img_size is None or not patch_embed.strict_img_size:
        reasons.append("it takes any image size (dynamic_img_size=True or strict_img_size=False)")
    elif any(size % p for size, p in zip(patch_embed.img_size, patch, strict=True)):
        reasons.append(f"its image size {tuple(patch_embed.img_size)} is not a multiple of the patch size {patch}")
    if not patch_embed.flatten:
        reasons.append(f"it returns a {patch_embed.output_fmt.value} feature map, not flattened tokens "
                       "(dynamic_img_size=True or output_fmt set)")
    return "; ".join(reasons) or None


def patch_embed_as_gemm(images: Tensor, weight: Tensor, bias: Tensor | None, patch_size: tuple[int, int]) -> Tensor:
    """A patch convolution (kernel == stride == ``patch_size``, no padding; ``weight`` ``D x C x ph x pw``) as one
    GEMM over the flattened patches: ``B x N x D`` tokens, row-major over the patch grid, as timm's ``proj(x)
    .flatten(2).transpose(1, 2)``. Image sides must be multiples of the patch size."""
    batch, channels, height, width = images.shape
    (ph, pw), (gh, gw) = patch_size, (height // patch_size[0], width // patch_size[1])
    patches = images.reshape(batch, channels, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    return F.linear(patches.reshape(batch, gh * gw, channels * ph * pw), weight.flatten(1), bias)


class GemmPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with its convolution run as a reshape and one GEMM (opt-in: ``patch_embed_gemm``).

    A convolution whose kernel equals its stride (the patch size ``p``) and that does not pad maps each ``p x p``
    patch on its own: it is ``F.linear`` over the flattened patches, ``x[b, c, gi*p+i, gj*p+j] -> patches[b, gi*W/p+gj,
    (c, i, j)]`` with ``proj.weight.flatten(1)`` and ``proj.bias``. The output is timm's ``proj(x).flatten(2)
    .transpose(1, 2)`` followed by ``norm``, after the same image-size assertion, so every caller of
    ``vit.patch_embed`` (the prompted `PromptedViT.forward` and the query pass ``vit.forward_features``) gets it.

    Not bitwise equal to the convolution: the GEMM sums the ``C p^2`` products in another order (float64: within
    1e-12 of it, ``tests/test_patch_embed_gemm.py``; the deviation of a whole bf16 training step:
    ``benchmarks/check_fast_paths.py --patch-embed-gemm``). In fp32 on CUDA, cuDNN may run the convolution in TF32
    (``torch.backends.cudnn.allow_tf32``, on by default) while the GEMM follows ``torch.backends.cuda.matmul
    .allow_tf32`` (off by default): there the GEMM is the more precise of the two. Why it exists: in a torch.profiler
    trace of a bf16 ViT-B -> ViT-S KDP step at batch 64, 224 px on an H200
    (``benchmarks/measured/2026-12-01_h200_packed_snapshots/call1/profile_step_distill_bf16.log``; the concurrent
    teacher overlaps kernels there, which inflates per-kernel times) cuDNN's kernels for this convolution took 395 (B)
    and 519 (S) us per call, for a map that is a ~15 GFLOP GEMM at ViT-B's width; ``benchmarks/ops.py`` times the two
    alone: on an H100 617 vs 89 us (ViT-B, batch 64, bf16), and the whole B->S step 6% faster
    (``benchmarks/measured/2026-12-07_h100``). Under autocast the images are cast to the autocast dtype
    before the patch copy (``F.linear`` would cast them after; the cast is elementwise, so the bits are the same) and
    the copy moves half the bytes.

    Applied by assigning ``__class__`` on the ViT's own module (`PromptedViT.patch_embed_gemm_`), not by wrapping it:
    the module keeps its identity, parameters, attributes and place in the tree, so ``state_dict`` keys
    (``patch_embed.proj.weight``), checkpoints, `load_local_weights` / timm's ``checkpoint_filter_fn``, weight casting
    (``proj`` is still the ``nn.Conv2d``), ``vit.patch_embed.img_size`` readers and ``torch.export`` see what they saw;
    assigning ``PatchEmbed`` back undoes it. A module that stops being eligible after the swap (an attribute changed
    by hand) runs timm's convolution, with a warning.
    """

    def forward(self, x: Tensor) -> Tensor:
        reason = gemm_patch_embed_ineligibility(self)
        if reason is not None:
            warnings.warn(f"patch_embed_gemm: running the patch-embedding convolution instead of the GEMM: {reason}",
                          stacklevel=2)
            return super().forward(x)
        height, width = x.shape[-2:]
        # timm's strict image-size check (the only input check a strict, unpadded PatchEmbed makes)
        _assert(height == self.img_size[0], f"Input height ({height}) doesn't match model ({self.img_size[0]}).")
        _assert(width == self.img_size[1], f"Input width ({width}) doesn't match model ({self.img_size[1]}).")
        device = x.device.type
        if (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device) and x.is_floating_point()
                and x.dtype != torch.float64):  # autocast's own rule for which inputs it casts
            x = x.to(torch.get_autocast_dtype(device))
        return self.norm(patch_embed_as_gemm(x, self.proj.weight, self.proj.bias, tuple(self.patch_size)))


@dataclass
class ViTOutput:
    """What `PromptedViT.forward` returns.

    Attributes:
        tokens: final-norm tokens ``B x N x D`` (extra tokens included, in sequence order).
        blocks: every block's output tokens before the final norm, if requested.
    """

    tokens: Tensor
    blocks: list[Tensor] = field(default_factory=list)


class PromptedViT(nn.Module):
    """A frozen timm ``VisionTransformer`` run with per-layer prefixes and extra tokens.

    Args:
        vit: a timm ``VisionTransformer`` with ``global_pool='token'`` and a class token.
        input_norm: ``"timm"`` normalises ``[0, 1]`` images with the model's ``pretrained_cfg`` mean/std (sane
            default); ``"none"`` feeds them unnormalised, as the CODA-Prompt/CDL reference code does (a quirk).
    """

    def __init__(self, vit: VisionTransformer, input_norm: Literal["timm", "none"] = "timm") -> None:
        super().__init__()
        if type(vit) is not VisionTransformer:
            raise TypeError(f"PromptedViT needs a timm VisionTransformer, got {type(vit).__name__}")
        if vit.cls_token is None or vit.global_pool != "token":
            raise ValueError("PromptedViT needs a ViT with a class token and global_pool='token'")
        for i, block in enumerate(vit.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise TypeError(f"block {i} is {type(block).__name__}/{type(block.attn).__name__}: prefixes need "
                                "timm's plain Block and Attention")
        self.vit = vit
        self.input_norm = input_norm
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406)) if input_norm == "timm" else (0.0, 0.0, 0.0)
        std = cfg.get("std", (0.229, 0.224, 0.225)) if input_norm == "timm" else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.matmul_dtype = torch.float32
        self.low_precision_dtype: torch.dtype | None = None  # see `low_precision_`
        self._matmul_dtype_before_low = torch.float32
        self.query_pass: Callable[[Tensor], Tensor] | None = None
        """What `query` runs instead of ``vit.forward_features`` when set (``compile=True``: a compiled one, see
        `cdl_lightning.models.fast_paths.FastPaths.compile_`). Like ``nn.Module.compile``'s compiled call it is not
        copied or pickled with the module: it reads this ViT's weights, not a copy's."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["query_pass"] = None  # bound to this ViT's weights (see ``query_pass``)
        return state

    def cast_matmul_weights_(self, dtype: torch.dtype) -> int:
        """Store the frozen weights and biases of every ``nn.Linear`` and ``nn.Conv2d`` in ``dtype`` (in place).

        Under ``torch.autocast(dtype=dtype)`` these layers compute in ``dtype`` anyway, and autocast re-casts frozen
        fp32 weights on *every* call (its cast cache only keeps trainable leaves): hundreds of copy kernels per step.
        Stored in ``dtype`` they are used as they are, with bit-identical results under autocast. Norms, position
        embedding and class token stay fp32 (autocast runs norms in fp32). Outside autocast the ViT then runs itself
        under ``torch.autocast(dtype=dtype)``, so it keeps working in fp32 code. ``torch.float32`` restores fp32
        storage (values already rounded stay rounded). Returns the number of tensors cast.
        """
        if any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("cast_matmul_weights_ is for frozen ViTs: some parameters require grad")
        if self.low_precision_dtype not in (None, dtype):
            raise RuntimeError(f"this ViT runs entirely in {self.low_precision_dtype} (low_precision_): call "
                               f"low_precision_(None) before storing its matmul weights in {dtype}")
        count = 0
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                for param in (module.weight, module.bias):
                    if param is not None and param.dtype != dtype:
                        param.data = param.data.to(dtype)
                        count += 1
        self.matmul_dtype = dtype
        return count

    def low_precision_(self, dtype: torch.dtype | None) -> None:
        """Run this frozen ViT entirely in ``dtype`` (bf16 / fp16), outside autocast, or (``None``) as before.

        `cast_matmul_weights_` leaves norms, position embedding and class token in fp32, and under autocast the
        residual stream stays fp32: every LayerNorm reads and writes fp32, every residual add reads fp32 and bf16 and
        writes fp32, and each matmul's input is cast first. Here every parameter is stored in ``dtype`` and the passes
        run with autocast disabled, so the residual stream, LayerNorms (fp32 statistics inside the kernel), GELUs and
        adds move half the bytes. Not bitwise equal to the autocast run (the residual stream is rounded to ``dtype``
        after every block); images are normalised in their own dtype and then rounded, as autocast rounds them for
        the patch embedding. Outputs are in ``dtype``. ``None`` stores the parameters in fp32 again (values already
        rounded stay rounded) and the matmul weights in the dtype they had before (`cast_matmul_weights_`).
        """
        if any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("low_precision_ is for frozen ViTs: some parameters require grad")
        if self.low_precision_dtype is not None:  # back to the storage from before (also before another dtype)
            self.vit.float()
            self.low_precision_dtype = None
            self.cast_matmul_weights_(self._matmul_dtype_before_low)
        if dtype is None:
            return
        self._matmul_dtype_before_low = self.matmul_dtype
        self.vit.to(dtype)  # (the normalisation's mean / std, buffers of this module, stay fp32)
        self.matmul_dtype = dtype
        self.low_precision_dtype = dtype

    def patch_embed_gemm_(self, enabled: bool = True) -> bool:
        """Run the patch embedding as a reshape and one GEMM (`GemmPatchEmbed`) or, with ``enabled=False``, as timm's
        convolution again; in place, for every pass that calls ``vit.patch_embed`` (prompted forward and query).

        Opt-in and not bitwise (see `GemmPatchEmbed`). A patch embedding that cannot run as a GEMM
        (`gemm_patch_embed_ineligibility`: e.g. ``dynamic_img_size=True``) keeps its convolution, and a warning names
        why (Python shows a given warning once). Parameters, buffers and ``state_dict`` keys do not change. Returns
        whether the GEMM is used now.
        """
        embed = self.vit.patch_embed
        if not enabled:
            if type(embed) is GemmPatchEmbed:
                embed.__class__ = PatchEmbed
            return False
        reason = gemm_patch_embed_ineligibility(embed)
        if reason is not None:
            arch = (getattr(self.vit, "pretrained_cfg", None) or {}).get("architecture", type(self.vit).__name__)
            warnings.warn(f"patch_embed_gemm: the patch embedding of this {arch} keeps its convolution (not reshape + "
                          f"GEMM): {reason}", stacklevel=2)
            return False
        embed.__class__ = GemmPatchEmbed
        return True

    @property
    def uses_patch_embed_gemm(self) -> bool:
        """The patch embedding runs as reshape + GEMM (`patch_embed_gemm_`)."""
        return type(self.vit.patch_embed) is GemmPatchEmbed

    def _autocast_if_cast(self, images: Tensor) -> contextlib.AbstractContextManager:
        """Autocast to ``matmul_dtype`` when the weights were cast and the caller runs without autocast; autocast
        off when the whole ViT runs in low precision (`low_precision_`)."""
        device = images.device.type
        if self.low_precision_dtype is not None:
            return torch.autocast(device, enabled=False)
        if self.matmul_dtype == torch.float32 or torch.is_autocast_enabled(device):
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=self.matmul_dtype)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        """Class (and register) tokens in front of the patch tokens."""
        return self.vit.num_prefix_tokens

    def normalize(self, images: Tensor) -> Tensor:
        if self.input_norm != "none":
            images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return images if self.low_precision_dtype is None else images.to(self.low_precision_dtype)

    def forward(
        self,
        images: Tensor,
        prefixes: dict[int, Prefix] | None = None,
        prepend: Tensor | None = None,
        append: Tensor | None = None,
        return_blocks: bool = False,
    ) -> ViTOutput:
        """Run the ViT on ``[0, 1]`` images.

        Args:
            images: ``B x 3 x H x W`` in ``[0, 1]``.
            prefixes: ``{layer: (Pk, Pv)}`` key/value prefixes for the given blocks.
            prepend: extra tokens ``1|B x n x D`` put at position 0, before the class token, after the positional
                embedding was added (so they get none): the DeiT distillation token.
            append: extra tokens put at the end of the sequence after the positional embedding (the KDP KD token).
            return_blocks: also return every block's output tokens (before the final norm).
        """
        with self._autocast_if_cast(images):
            return self._forward(images, prefixes, prepend, append, return_blocks)

    def _forward(
        self,
        images: Tensor,
        prefixes: dict[int, Prefix] | None,
        prepend: Tensor | None,
        append: Tensor | None,
        return_blocks: bool,
    ) -> ViTOutput:
        vit = self.vit
        x = vit.patch_drop(vit._pos_embed(vit.patch_embed(self.normalize(images))))
        batch = x.shape[0]
        if prepend is not None:
            x = torch.cat([prepend.to(x.dtype).expand(batch, -1, -1), x], dim=1)
        if append is not None:
            x = torch.cat([x, append.to(x.dtype).expand(batch, -1, -1)], dim=1)
        x = vit.norm_pre(x)
        prefixes = prefixes or {}
        blocks: list[Tensor] = []
        for i, block in enumerate(vit.blocks):
            prefix = prefixes.get(i)
            x = block(x) if prefix is None else prefix_block(block, x, prefix)
            if return_blocks:
                blocks.append(x)
        return ViTOutput(tokens=vit.norm(x), blocks=blocks)

    @torch.no_grad()
    def query(self, images: Tensor) -> Tensor:
        """The prompt query: final-norm class token of the ViT without prompts (``forward_features(x)[:, 0]``)."""
        with self._autocast_if_cast(images):
            return (self.query_pass or self.vit.forward_features)(self.normalize(images))[:, 0]


class OfflineWeightsError(RuntimeError):
    """Pretrained weights could not be fetched (this machine is offline or the hub is unreachable)."""


def create_vit(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> VisionTransformer:
    """Build a timm ViT for prompting, without classifier, from its identity.

    Args:
        name: timm model name; name the pretrained tag explicitly, e.g. ``vit_base_patch16_224.augreg_in21k_ft_in1k``.
        pretrained: download timm's pretrained weights (fails offline with `OfflineWeightsError`).
        checkpoint_path: a local weights file (``.pth``, ``.bin``, ``.safetensors`` or ``.npz``) loaded by
            `load_local_weights` (timm's ViT key filter and pos-embed resizing apply); takes precedence over download.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size``, ``embed_dim``, ``depth`` for tiny test
            models).

    Raises:
        FileNotFoundError: ``checkpoint_path`` does not exist.
        OfflineWeightsError: the weights are not local and the download failed.
    """
    kwargs = dict(model_kwargs or {})
    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("global_pool", "token")
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint_path {str(path)!r} does not exist; point it at a timm/HF "
                                    f"weights file (.pth, .bin, .safetensors or .npz) for {name!r}")
        if path.suffix != ".npz":
            # every weight comes from the file: build without the random initialisation (seconds for a ViT-B on a CPU)
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **kwargs)
            # (a buffer, or a head the file's head weights are not loaded into, would stay uninitialised)
            if not any(True for _ in model.buffers()) and not any(n.startswith("head.") for n, _ in
                                                                   model.named_parameters()):
                model = model.to_empty(device="cpu")
                load_local_weights(model, path)  # raises unless the file sets every parameter
                return model
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_local_weights(model, path)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # network errors surface as many exception types (OSError, HF hub errors, ...)
        raise OfflineWeightsError(
            f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}). This machine may be "
            "offline. Download the weights elsewhere (e.g. the model's `model.safetensors` on the HF hub) and pass "
            "`checkpoint_path: /path/to/model.safetensors` for this backbone, or set `pretrained: false` to train "
            "from random weights."
        ) from err


def load_local_weights(model: VisionTransformer, path: Path) -> None:
    """Load a local weights file into a timm ViT: ``.npz`` (big_vision/JAX) through ``model.load_pretrained``, else a
    PyTorch or safetensors state dict adapted by timm's ViT ``checkpoint_filter_fn`` (position-embedding resizing,
    key renames). Classifier weights are ignored; any other missing or unexpected key is an error."""
    if path.suffix == ".npz":
        model.load_pretrained(str(path))
        return
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(load_state_dict(str(path)), model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"weights file {str(path)!r} does not fit {type(model).__name__} "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]}): is it for this timm model name and "
                         "model_kwargs?")


@dataclass
class BackboneConfig:
    """The identity of a frozen backbone: enough to rebuild it, small enough to live in a checkpoint.

    Args:
        name: timm model name with its pretrained tag.
        pretrained: load timm's pretrained weights.
        checkpoint_path: local weights file instead of a download.
        model_kwargs: extra ``timm.create_model`` arguments.
        input_norm: ``"timm"`` (pretrained_cfg mean/std) or ``"none"`` (the reference's quirk).
        init_seed: seed of the random initialisation when no weights are loaded, so that a random backbone is
            rebuilt identically from its identity (a resumed run, a teacher read by a distiller, ``cdl predict``).
    """

    name: str = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    pretrained: bool = False
    checkpoint_path: str | None = None
    model_kwargs: dict[str, Any] | None = None
    input_norm: Literal["timm", "none"] = "timm"
    init_seed: int = 0

    def build(self) -> PromptedViT:
        """Build the frozen, eval-mode `PromptedViT` (random weights are seeded by ``init_seed``; the global RNG is
        left untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            vit = create_vit(self.name, self.pretrained, self.checkpoint_path, self.model_kwargs)
        model = PromptedViT(vit, input_norm=self.input_norm)
        model.requires_grad_(False)
        return model.eval()

    def identity(self) -> tuple:
        """A hashable key: two configs with the same identity build the same frozen network."""
        kwargs = tuple(sorted((self.model_kwargs or {}).items()))
        seed = None if self.pretrained or self.checkpoint_path else self.init_seed
        return self.name, self.pretrained, self.checkpoint_path, kwargs, self.input_norm, seed


# checkpoints store the backbone identity in their hyper-parameters: let `torch.load(weights_only=True)` (Lightning's
# default when resuming) accept it
torch.serialization.add_safe_globals([BackboneConfig])


def as_backbone_config(value: BackboneConfig | dict[str, Any] | None) -> BackboneConfig | None:
    """Accept a `BackboneConfig` or its fields as a dict (as configs and checkpoint hyper-parameters store it)."""
    if value is None or isinstance(value, BackboneConfig):
        return value
    return BackboneConfig(**dict(value))
