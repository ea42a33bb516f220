"""Vision-side token compression (VisionZip, PruMerge+): the LLM receives fewer image tokens per image.

The methods decide in the vision encoder's feature space, before the projector, as the papers do:
1. forward hooks on `q_proj` / `k_proj` of the vision layer LLaVA reads (`vision_feature_layer`; the penultimate
   one for LLaVA-1.5) keep that layer's queries and keys. The [CLS] query row's attention over the patches is
   computed from them (`cls_attention`): the tower stays on SDPA, nothing asks it for attention weights;
2. a forward pre-hook on the projector receives the selected patch features (num_images, N, C) and hands each
   image to the method's `compress`, which returns the image's N rows with its K output tokens (kept patches,
   merged tokens) and the (num_images, N) mask of the patches they come from:
   - `positions="renumber"` (default, the papers' behaviour): the rows are *reordered*, the K output tokens first
     in the order the method emits them, the other rows after them;
   - `positions="original"`: every output token is written into its source slot (a kept patch's own slot, a
     merged group's target slot), and the mask is copied into a persistent device buffer;
3. a pruning step at the input of decoder layer 0 (on the pruning engine) removes, per image,
   - renumber: the visual tokens beyond the first K (the LLM sees a contiguous sequence, as if the processor had
     put K placeholders per image);
   - original: the visual tokens whose slot the buffer marks as not kept; the kept ones keep their original
     position ids (the patch grid's layout stays readable through RoPE, like DivPrune's layer-0 removal).
The step's host numbers depend only on the prompt's layout (N tokens per image, K from the config): no scores
from the LLM, no host read beyond the visual counts (the original-position mask is read on the device). Left
padding, batches, `generate`, the KV cache and the fast path's captured prefill all work as for any layer-0 step;
the compression runs eagerly in the vision tower, outside the captured prefill, and writes into buffers the
captured graph reads.
K >= N (ratio 0) changes nothing: no hook modifies the features and the step is not planned.

Supported: LLaVA-1.5-style models (`LlavaForConditionalGeneration`: a CLIP tower with a [CLS] token, one
`vision_feature_layer`, `vision_feature_select_strategy="default"`). Other families are refused at `apply` with
the reason (anyres packing of LLaVA-NeXT / OneVision, M-RoPE grids of Qwen-VL, encoders without [CLS]).
Spec: docs/vision_side.md.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError, NoVisualTokensError, UnsupportedMethodError
from .engine import AttachedStep, PruningStats, RatioStep, Request, StepResult


# ----------------------------------------------------------------------------------------- the tower's [CLS] row
def cls_attention(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Attention of the [CLS] query (token 0) over the patch tokens, averaged over heads: (B, N) in fp32.
    `q`, `k` (B, 1+N, D) are the layer's projections (heads concatenated); the softmax runs over all 1+N keys,
    [CLS] included (what the layer computes), and the [CLS] column is then dropped."""
    B, T, D = k.shape
    hd = D // heads
    q0 = q[:, 0].float().view(B, heads, 1, hd)
    kh = k.float().view(B, T, heads, hd).transpose(1, 2)  # (B, H, T, hd)
    probs = torch.softmax((q0 @ kh.transpose(-1, -2)) * scale, dim=-1)  # (B, H, 1, T)
    return probs[:, :, 0, 1:].mean(1)


@dataclasses.dataclass
class VisionSideStats(PruningStats):
    """PruningStats (over the LLM's visual tokens) plus the vision side of the last forward with images."""

    patch_keep: torch.Tensor | None = None  # (num_images, N) bool: patches whose token (or group) the LLM receives
    cls_attention: torch.Tensor | None = None  # (num_images, N) the [CLS] attention the selection used
    images: int = 0  # images compressed by the last vision forward
    per_image: tuple[int, int] = (0, 0)  # (N patches, K output tokens) per image


POSITIONS = ("renumber", "original")


def check_positions(name: str, value) -> None:
    if value not in POSITIONS:
        raise ConfigError(f"{name}: positions must be one of {list(POSITIONS)} ('renumber': the output tokens "
                          "get contiguous positions, as in the papers; 'original': each keeps the position of "
                          f"its source patch), got {value!r}")


class VisionSideStep(RatioStep):
    """At the input of layer 0: keep each image's K output tokens. positions="renumber": the first K of its N
    visual tokens, renumbered; "original": the slots `slot_keep` marks, at their original positions."""

    score_layer = None

    def __init__(self, config, method_name: str, per_image: int, keep: int, stats: VisionSideStats,
                 slot_keep=None):
        self.config = config
        self.layer = 0
        self.mode = "inplace"
        self.positions = getattr(config, "positions", "renumber")
        self.slot_keep = slot_keep  # positions="original": images -> (images, N) bool device buffer
        self.graph_capture = True  # host numbers: the prompt's visual counts only (through HostValues)
        self.method_name = method_name
        self.per_image, self.keep_per_image = per_image, keep
        self.stats = stats
        self._keep: list[int] = []

    def plan(self, visual: torch.Tensor, counts: list[int], real_lengths: list[int]) -> bool:
        if sum(counts) == 0 and not self.config.allow_text_only:
            raise NoVisualTokensError(f"{self.method_name}: no image tokens found in the prompt")
        N, K = self.per_image, self.keep_per_image
        for b, n in enumerate(counts):
            if n % N:
                raise ValueError(f"{self.method_name}: sample {b} has {n} image tokens, not a multiple of the "
                                 f"{N} patches of one image (the vision-side methods need every image expanded "
                                 "to the tower's patch count)")
        self._keep = [n // N * K for n in counts]
        st = self.stats
        st.num_visual, st.keep_count, st.kept_visual_mask, st.cache_lengths = counts, list(self._keep), visual, None
        return K < N and sum(counts) > 0

    def select(self, req: Request, hidden: torch.Tensor) -> StepResult:
        visual = req.visual  # original coordinates
        if self.positions == "original":
            # the j-th visual token of the batch (row-major, the order LLaVA scatters image features in) is
            # row j of the flattened (images, N) features: its slot is kept when the compression wrote an output
            # token there. Device ops only (the buffer is filled by the projector hook, outside the capture).
            images = sum(req.prompt_visual_counts) // self.per_image
            flat = self.slot_keep(images).flatten()
            rank = (visual.flatten().long().cumsum(0) - 1).clamp(0, flat.numel() - 1).view_as(visual)
            kept_orig = visual & flat[rank]
        else:
            local = (visual.cumsum(1) - 1) % self.per_image  # index of each visual token inside its image
            kept_orig = visual & (local < self.keep_per_image)
        kept_vis = kept_orig.gather(1, req.kept) & req.valid
        keep = (~visual).gather(1, req.kept) | kept_vis
        return self.result(req, list(req.visual_counts), list(self._keep), keep, kept_vis)


class VisionSideMethod(AttachedStep):
    """Hooks of one vision-side method on a LLaVA model; subclasses implement `compress` and `output_count`."""

    method_name = ""

    def __init__(self, model, adapter, config):
        self.config = config
        inner, tower, layer_idx = _llava_parts(model, adapter, self.method_name)
        attn = tower.encoder.layers[layer_idx].self_attn
        self.heads, self.scale = attn.num_heads, attn.scale
        vcfg = tower.config
        self.num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
        self.keep = self.output_count(self.num_patches)
        stats = VisionSideStats(per_image=(self.num_patches, self.keep))
        self.positions = getattr(config, "positions", "renumber")
        self._slot_keep: dict = {}  # positions="original": images -> persistent (images, N) bool buffer
        self._qk: dict = {}
        self._hooks = []
        if self.keep < self.num_patches:  # otherwise the features are never touched (ratio 0: the model itself)
            self._hooks = [attn.q_proj.register_forward_hook(self._grab("q")),
                           attn.k_proj.register_forward_hook(self._grab("k")),
                           inner.multi_modal_projector.register_forward_pre_hook(self._on_projector)]
        try:
            self.attach_step(model, adapter, VisionSideStep(config, self.method_name, self.num_patches, self.keep,
                                                            stats, slot_keep=self.slot_keep))
        except BaseException:
            self._remove_hooks()
            raise

    # subclasses
    def output_count(self, num_patches: int) -> int:
        raise NotImplementedError

    def compress(self, feats: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor):
        """(num_images, N, C) features, (num_images, N) [CLS] attention, (num_images, N, D) patch keys ->
        (features with the K output tokens first (positions="renumber") or in their source slots ("original"),
        (num_images, N) bool patch_keep: the K source slots)."""
        raise NotImplementedError

    def slot_keep(self, images: int) -> torch.Tensor:
        """positions="original": the persistent (images, N) bool buffer of the last compression's source slots."""
        buf = self._slot_keep.get(images)
        if buf is None:
            raise RuntimeError(f"{self.method_name}: no compressed features for {images} image(s) were seen "
                               "before the prefill (were the image tokens passed without pixel_values?)")
        return buf

    # hooks
    def _grab(self, name: str):
        def hook(module, args, output):
            self._qk[name] = output

        return hook

    def _on_projector(self, module, args):
        feats = args[0]
        q, k = self._qk.pop("q", None), self._qk.pop("k", None)
        if q is None or k is None:
            raise RuntimeError(f"{self.method_name}: the vision layer's queries and keys were not seen before the "
                               "projector (was the vision tower called outside the model's forward?)")
        N = self.num_patches
        if feats.dim() != 3 or feats.shape[1] != N or k.shape[1] != N + 1:
            raise RuntimeError(f"{self.method_name}: expected ({N} patches + [CLS]) per image, got projector input "
                               f"{tuple(feats.shape)} and keys {tuple(k.shape)}")
        attn = cls_attention(q, k, self.heads, self.scale)
        out, patch_keep = self.compress(feats, attn, k[:, 1:])
        if self.positions == "original":
            buf = self._slot_keep.get(feats.shape[0])
            if buf is None or buf.device != patch_keep.device:
                buf = self._slot_keep[feats.shape[0]] = torch.zeros_like(patch_keep)
            buf.copy_(patch_keep)  # in place: a captured prefill reads this buffer
        st = self.stats
        st.patch_keep, st.cls_attention, st.images = patch_keep, attn, feats.shape[0]
        return (out.to(feats.dtype),) + tuple(args[1:])

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._qk = {}
        self._slot_keep = {}

    def remove(self) -> None:
        self._remove_hooks()
        super().remove()


def _llava_parts(model, adapter, name: str):
    """(LlavaModel, the CLIP vision transformer (embeddings, encoder), index of the encoder layer whose output LLaVA reads); refuses the rest."""
    family = getattr(adapter, "family", "decoder")
    if family != "llava":
        why = {"llava_next": "its anyres tiles are unpadded and packed with newline tokens after the projector, "
                             "so an image's tokens are not one block of tower patches",
               "llava_onevision": "its anyres tiles are unpadded and packed with newline tokens after the "
                                  "projector, and its SigLIP tower has no [CLS] token",
               "qwen2_vl": "its vision tokens are merged 2x2 patches placed on an M-RoPE grid, and its tower has "
                           "no [CLS] token",
               "qwen2_5_vl": "its vision tokens are merged 2x2 patches placed on an M-RoPE grid, and its tower has "
                             "no [CLS] token",
               "qwen3_vl": "its vision tokens are merged patches on an M-RoPE grid with DeepStack features",
               }.get(family, "it has no CLIP vision tower with a [CLS] token feeding a LLaVA projector")
        raise UnsupportedMethodError(f"{name} is not supported on {type(model).__name__} ({family}): {why}. "
                                     "Supported: LLaVA-1.5-style models (LlavaForConditionalGeneration)")
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "vision_tower") else model
    tower = getattr(inner, "vision_tower", None)
    body = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps a CLIPVisionTransformer before 5.24
    embeddings = getattr(body, "embeddings", None)
    if getattr(embeddings, "class_embedding", None) is None:
        raise UnsupportedMethodError(f"{name} is not supported on {type(model).__name__}: its vision tower "
                                     f"({type(tower).__name__}) has no [CLS] token (CLIP-style towers only)")
    cfg = model.config
    layer = cfg.vision_feature_layer
    strategy = cfg.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise UnsupportedMethodError(f"{name}: vision_feature_layer={layer!r} concatenates several layers; one "
                                     "layer is supported")
    if strategy != "default":
        raise UnsupportedMethodError(f"{name}: vision_feature_select_strategy={strategy!r} is not supported "
                                     "('default': the patch tokens without [CLS])")
    n = len(body.encoder.layers)
    idx = n + layer if layer < 0 else layer - 1  # hidden_states[i] is the output of encoder layer i - 1
    if idx == -1:
        # the features are the patch embeddings, which no attention layer produced: score them with the
        # attention of the first layer, the one that reads them
        idx = 0
    if not 0 <= idx < n:
        raise UnsupportedMethodError(f"{name}: vision_feature_layer={layer} is outside the tower's {n} layers")
    return inner, body, idx


def check_budget(name: str, field: str, value, num_patches: int) -> None:
    if value > num_patches:
        raise ConfigError(f"{name}: {field} = {value} exceeds the {num_patches} patch tokens per image of this "
                          f"vision tower: allowed [1, {num_patches}]")
