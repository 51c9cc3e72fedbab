"""GiMP: gene-induced multimodal pre-training (Jin et al., MICCAI 2023), as read in ../shared/METHODS.md.

Image side: :class:`SlideTransformer` over the patient's patch features; gene side: :class:`GeneGMSA`.
The two [CLS] tokens are fused by an MLP; a linear or MLP head on the fused token classifies.

Pre-training (:meth:`GiMP.pretrain_loss`) = MPM + lambda * triplet:

- **MPM** (masked patch modelling): per slide, one contiguous span of ``mask_length`` embedded patch
  tokens (raster order) is replaced by a learnable mask token *before* positional encoding and the
  encoder (:func:`span_mask`); a light decoder of cross-attention blocks from the masked positions'
  encoder outputs to the **gene tokens** ("gene-induced") and a linear layer reconstruct the original
  patch features; loss = MSE on masked positions only (:func:`mpm_loss`). Only patients with an image
  contribute; for a patient without expression the decoder's cross-attention is a zero update (no gene
  context), so it still reconstructs from image context alone.
- **Triplet**: batch-hard triplet margin loss on the L2-normalised fused tokens of the masked pass
  (:func:`batch_hard_triplet_loss`). Positives are patients of the same class (``positives="label"``,
  unlabelled patients are not anchors) or the same patient under another random mask
  (``positives="instance"``: two masked views per patient; MPM is then averaged over both views).

Masking is applied in pre-training when ``use_mpm`` is on or positives are instance views (the two
masks are what makes the views differ); with ``use_mpm=False`` and label positives the triplet loss
sees unmasked slides.

Missing modality: a patient without slides gets the learned ``image_missing`` token as image [CLS], one
without expression the learned ``gene_missing`` token as gene [CLS], and its gene tokens are masked out
of the decoder's cross-attention. Nobody is dropped: every patient gets a fused token and logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wsiomics.models.batch import Batch, ModelOutput
from wsiomics.models.blocks import CrossAttentionBlock, FeatureStandardizer, HeadSplit, Mlp, init_weights, trunc_normal_
from wsiomics.models.gene_gmsa import GeneGMSA, GeneGMSAConfig
from wsiomics.models.slide_transformer import SlideTransformer, SlideTransformerConfig

POSITIVES = ("label", "instance")
HEADS = ("linear", "mlp")


# ---------------------------------------------------------------- losses and masking


def span_mask(slide_index: torch.Tensor, token_mask: torch.Tensor, mask_length: int,
              generator: torch.Generator) -> torch.Tensor:
    """One contiguous span of ``mask_length`` tokens per slide of each patient: ``(B, L)`` bool, True = masked.

    slide_index: (B, L) long, the slide of each token (-1 = padding); token_mask: (B, L) bool, True =
    real token. Contiguity is in token order within a slide (the raster order of that slide). The
    start is drawn uniformly among the positions that keep the span inside the slide. A slide of
    ``n <= mask_length`` tokens gets a span of ``n - 1`` tokens, so at least one of its tokens stays
    visible (a one-token slide is not masked). Padding is never masked. Deterministic given the
    generator (one uniform draw per patient x slide slot, on the generator's device).
    """
    b, n_tok = slide_index.shape
    valid = token_mask & (slide_index >= 0)  # (B, L)
    n_slides = int(slide_index.max()) + 1 if slide_index.numel() else 0
    if mask_length <= 0 or n_slides <= 0:
        return torch.zeros_like(valid)
    s = slide_index.clamp(min=0)  # (B, L)
    member = F.one_hot(s, n_slides).to(torch.int32) * valid[..., None].to(torch.int32)  # (B, L, S)
    rank = (member.cumsum(dim=1) - 1).gather(2, s[..., None])[..., 0]  # (B, L): index of the token in its slide
    counts = member.sum(dim=1)  # (B, S) tokens per slide
    span = torch.minimum(counts - 1, torch.full_like(counts, mask_length)).clamp(min=0)  # (B, S)
    n_starts = counts - span + 1  # (B, S) >= 1
    u = torch.rand(b, n_slides, generator=generator, dtype=torch.float64, device=generator.device)
    start = (u.to(slide_index.device) * n_starts).floor().long()
    start = torch.minimum(start, n_starts - 1)  # (B, S)
    tok_start, tok_span = start.gather(1, s), span.gather(1, s)  # (B, L)
    return valid & (rank >= tok_start) & (rank < tok_start + tok_span)


def mpm_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked positions only (mean over masked tokens x features).

    pred, target: (B, L, Din); masked: (B, L) bool. 0 (still attached to the graph) when nothing is masked.
    """
    diff = pred[masked].float() - target[masked].float()  # (N, Din)
    denom = (masked.sum() * pred.shape[-1]).clamp(min=1)
    return diff.pow(2).sum() / denom


def triplet_anchors(ids: torch.Tensor, valid: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive pairs (B, B), negative pairs (B, B) and anchors (B,) of a batch: an anchor is a valid sample with
    at least one positive (same id, not itself) and one negative (another id) among the valid samples."""
    n = ids.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=ids.device) if valid is None else valid.to(ids.device)
    pair = valid[:, None] & valid[None, :]
    same = ids[:, None] == ids[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=ids.device)
    pos, neg = pair & same & ~eye, pair & ~same
    return pos, neg, valid & pos.any(dim=1) & neg.any(dim=1)


def batch_hard_triplet_loss(embeddings: torch.Tensor, ids: torch.Tensor, margin: float = 0.3,
                            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-hard triplet margin loss (Hermans et al. 2017) on L2-normalised embeddings.

    embeddings: (B, E); ids: (B,) long (same id = positive pair); valid: (B,) bool or None (all).
    For each valid anchor with at least one positive (same id, not itself) and one negative: the
    farthest positive and the nearest negative in Euclidean distance; loss = mean over those anchors
    of relu(d_ap - d_an + margin). 0 (attached to the graph) when no anchor qualifies.
    """
    with torch.autocast(embeddings.device.type, enabled=False):  # distances in fp32 under any autocast
        e = F.normalize(embeddings.float(), dim=-1)  # (B, E)
        d2 = (2.0 - 2.0 * (e @ e.T)).clamp(min=1e-12)  # (B, B); |a-b|^2 for unit vectors
    dist = d2.sqrt()
    pos, neg, anchors = triplet_anchors(ids, valid)
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(dim=1)  # (B,)
    d_an = dist.masked_fill(~neg, float("inf")).amin(dim=1)  # (B,)
    hinge = F.relu(torch.where(anchors, d_ap, 0.0) - torch.where(anchors, d_an, 0.0) + margin)
    hinge = hinge * anchors.to(hinge.dtype)
    return hinge.sum() / anchors.sum().clamp(min=1)


# ---------------------------------------------------------------- model


def _image_config(c: SlideTransformerConfig | dict) -> SlideTransformerConfig:
    return SlideTransformerConfig(**c) if isinstance(c, dict) else c


def _gene_config(c: GeneGMSAConfig | dict) -> GeneGMSAConfig:
    return GeneGMSAConfig(**c) if isinstance(c, dict) else c


@dataclass
class GiMPConfig:
    """``image`` / ``gene`` may be given as dicts (e.g. from YAML or ``dataclasses.asdict``)."""

    image: SlideTransformerConfig
    gene: GeneGMSAConfig
    n_classes: int
    fusion_dim: int = 128
    mask_length: int = 16
    decoder_depth: int = 1
    triplet_margin: float = 0.3
    triplet_weight: float = 1.0  # lambda in loss = mpm + lambda * triplet
    use_mpm: bool = True
    use_triplet: bool = True
    positives: str = "label"  # "label" (same class) or "instance" (same patient, another mask)
    head: str = "linear"  # "linear" or "mlp" on the fused token
    dropout: float = 0.1  # fusion MLP, head and decoder

    def __post_init__(self) -> None:
        self.image = _image_config(self.image)
        self.gene = _gene_config(self.gene)
        if self.positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}, got {self.positives!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.n_classes < 1 or self.mask_length < 0 or self.decoder_depth < 0:
            raise ValueError(f"need n_classes >= 1, mask_length >= 0, decoder_depth >= 0; got {self.n_classes}, "
                             f"{self.mask_length}, {self.decoder_depth}")


def build_head(in_dim: int, n_classes: int, kind: str, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, n_classes)
    return Mlp(in_dim, in_dim, n_classes, act_layer=nn.GELU, drop=(dropout, 0.0))


class GiMP(HeadSplit):
    """Image transformer + GMSA gene encoder, fused [CLS] tokens, classification head, MPM decoder."""

    def __init__(self, cfg: GiMPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = SlideTransformer(cfg.image)
        self.gene_encoder = GeneGMSA(cfg.gene)
        di, dg = cfg.image.dim, cfg.gene.dim
        self.image_missing = nn.Parameter(torch.zeros(di))
        self.gene_missing = nn.Parameter(torch.zeros(dg))
        self.mask_token = nn.Parameter(torch.zeros(di))
        # Fixed per-dimension z-scoring of the patch features (training-tile statistics, set by the builder):
        # frozen encoders' features vary little around a large common mean. MPM reconstructs these z-scores.
        self.feature_norm = FeatureStandardizer(cfg.image.in_dim)
        self.fusion = Mlp(di + dg, cfg.fusion_dim, cfg.fusion_dim, act_layer=nn.GELU, drop=(cfg.dropout, 0.0))
        self.decoder = nn.ModuleList(
            CrossAttentionBlock(di, cfg.image.heads, context_dim=dg, mlp_ratio=cfg.image.mlp_ratio,
                                dropout=cfg.dropout) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(di)
        self.decoder_out = nn.Linear(di, cfg.image.in_dim)
        self.head = build_head(cfg.fusion_dim, cfg.n_classes, cfg.head, cfg.dropout)
        for module in (self.fusion, self.decoder, self.decoder_norm, self.decoder_out, self.head):
            init_weights(module)
        for p in (self.image_missing, self.gene_missing, self.mask_token):
            trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"image_missing", "gene_missing", "mask_token"}

    # -------------------------------------------------- encoders

    def _image(self, batch: Batch, tokens: torch.Tensor,
               attention: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # tokens: (B, L, Di) embedded (possibly masked) -> cls (B, Di), out (B, L, Di), attention (B, L) or None
        enc = self.image_encoder
        if attention:
            cls, out, att = enc.encode_with_attention(tokens, batch.positions, batch.token_mask)
        else:
            (cls, out), att = enc.encode(tokens, batch.positions, batch.token_mask), None
        cls = torch.where(batch.has_image[:, None], cls, self.image_missing.to(cls.dtype))
        return cls, out, att

    def _gene(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # genes (B, G) -> cls (B, Dg), tokens (B, n_groups, Dg), token mask (B, n_groups)
        cls, tokens = self.gene_encoder(batch.genes)
        cls = torch.where(batch.has_gene[:, None], cls, self.gene_missing.to(cls.dtype))
        mask = self.gene_encoder.group_valid[None, :] & batch.has_gene[:, None]
        return cls, tokens, mask

    def fuse(self, image_cls: torch.Tensor, gene_cls: torch.Tensor) -> torch.Tensor:
        # (B, Di), (B, Dg) -> (B, fusion_dim)
        return self.fusion(torch.cat([image_cls, gene_cls], dim=-1))

    def forward(self, batch: Batch) -> ModelOutput:
        tokens = self.image_encoder.embed(self.feature_norm(batch.features))  # (B, L, Di)
        image, _, attention = self._image(batch, tokens, attention=True)
        gene, _, _ = self._gene(batch)
        fused = self.fuse(image, gene)  # (B, E)
        return ModelOutput(logits=self.head(fused), image=image, gene=gene, fused=fused, attention=attention)

    # -------------------------------------------------- pre-training

    def _masked_view(self, batch: Batch, tokens: torch.Tensor, features: torch.Tensor, generator: torch.Generator,
                     mask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pre-training view: (fused (B, E), MPM loss scalar, number of masked tokens)."""
        if mask:
            masked = span_mask(batch.slide_index, batch.token_mask & batch.has_image[:, None],
                               self.cfg.mask_length, generator)  # (B, L)
            tokens = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens)
        else:
            masked = torch.zeros_like(batch.token_mask)
        image, out, _ = self._image(batch, tokens, attention=False)
        gene, gene_tokens, gene_mask = self._gene(batch)
        fused = self.fuse(image, gene)
        if self.cfg.use_mpm:
            mpm = self._reconstruction_loss(out, masked, gene_tokens, gene_mask, features)
        else:
            mpm = fused.new_zeros(())
        return fused, mpm, masked.sum()

    def _reconstruction_loss(self, out: torch.Tensor, masked: torch.Tensor, gene_tokens: torch.Tensor,
                             gene_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # out: (B, L, Di) encoder outputs; masked: (B, L); gene_tokens: (B, n, Dg); features: (B, L, Din)
        counts = masked.sum(dim=1)  # (B,)
        m = int(counts.max()) if counts.numel() else 0
        if m == 0:
            return out.sum() * 0.0
        # the masked positions of each patient first, in token order: (B, M); only those go through the decoder
        order = torch.argsort((~masked).to(torch.uint8), dim=1, stable=True)[:, :m]
        valid = torch.arange(m, device=masked.device)[None, :] < counts[:, None]  # (B, M)
        q = out.gather(1, order[..., None].expand(-1, -1, out.shape[-1]))  # (B, M, Di)
        target = features.gather(1, order[..., None].expand(-1, -1, features.shape[-1]))  # (B, M, Din)
        for block in self.decoder:
            q = block(q, gene_tokens, gene_mask)  # gene-induced: masked positions attend to the gene tokens
        pred = self.decoder_out(self.decoder_norm(q))  # (B, M, Din)
        return mpm_loss(pred, target, valid)

    def pretrain_loss(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """loss = mpm + triplet_weight * triplet (as configured); returns ``loss`` and detached parts."""
        cfg = self.cfg
        if not (cfg.use_mpm or cfg.use_triplet):
            raise ValueError("GiMP pre-training with use_mpm=False and use_triplet=False has no loss; "
                             "skip pre-training instead (method gimp_no_pretrain)")
        mask = cfg.use_mpm or cfg.positives == "instance"
        features = self.feature_norm(batch.features)  # (B, L, Din) z-scored: the MPM targets
        tokens = self.image_encoder.embed(features)  # (B, L, Di), shared by both views
        fused, mpm, n_masked = self._masked_view(batch, tokens, features, generator, mask)
        zero = fused.sum() * 0.0
        triplet = zero
        ids, valid = batch.labels, batch.labels >= 0
        if cfg.positives == "instance":
            fused2, mpm2, _ = self._masked_view(batch, tokens, features, generator, mask)
            mpm = (mpm + mpm2) / 2
            ids, valid = torch.cat([batch.patient_index, batch.patient_index]), None
            if cfg.use_triplet:
                triplet = batch_hard_triplet_loss(torch.cat([fused, fused2]), ids, cfg.triplet_margin)
        elif cfg.use_triplet:
            triplet = batch_hard_triplet_loss(fused, ids, cfg.triplet_margin, valid=valid)
        loss = zero
        if cfg.use_mpm:
            loss = loss + mpm
        if cfg.use_triplet:
            loss = loss + cfg.triplet_weight * triplet
        if not self._contributes(n_masked, ids, valid):
            loss = loss.detach()  # no sample to learn from: the training loop skips the batch
        return {"loss": loss, "mpm": mpm.detach(), "triplet": triplet.detach()}

    def _contributes(self, n_masked: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None) -> bool:
        """Whether some sample feeds the loss: MPM needs a masked token, the triplet an anchor with a positive
        and a negative (one host sync per step, as the loop's loss logging already makes)."""
        if self.cfg.use_mpm and int(n_masked) > 0:
            return True
        return self.cfg.use_triplet and bool(triplet_anchors(ids, valid)[2].any())
