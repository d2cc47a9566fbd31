"""ELECTRA-style replaced token detection with gradient-disentangled embedding sharing.

He, Gao, Chen, "DeBERTaV3: Improving DeBERTa using ELECTRA-Style Pre-Training with
Gradient-Disentangled Embedding Sharing", arXiv 2111.09543, sections 3-4:
a generator (masked LM, half the discriminator's depth) fills in masked tokens, a
discriminator tells every token replaced or original; loss = L_MLM + lambda * L_RTD.

Embedding sharing (`sharing`) and where the tables live:
- "gdes" (default, eq. 5): E_D = sg(E_G) + E_delta. `generator.deberta.embeddings.word_embeddings`
  holds E_G; `discriminator.embeddings.word_embeddings` holds E_delta, initialised to zero.
- "es": E_D = E_G; the discriminator has no word embedding of its own (both losses update E_G).
- "nes": two independent tables, each in its own backbone.
The discriminator's token embedding is computed as `E_G_module(ids).detach() + E_delta_module(ids)`
(lookup is linear), each a call of the module owning the table, so it is correct under ZeRO-3
where a module's parameters exist only while its forward runs. The export writes
E_D = E_G + E_delta as the discriminator's embedding (`launcher.hf.mapping`).

Shape legend: B batch, L sequence length, H hidden size, N masked tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import DebertaV3Backbone
from model.config import DebertaV3Config
from model.heads import MLMHead, RTDHead
from model.vocab_head import VocabOutput, VocabTargets, inverse_cdf_sample, make_vocab_head

SHARING_MODES = ("gdes", "es", "nes")


def check_rtd_options(sharing: str, mask_prob: float) -> None:
    """ValueError naming the option (the run config prefixes its section)."""
    if sharing not in SHARING_MODES:
        raise ValueError(f"sharing={sharing!r}; choices: {', '.join(SHARING_MODES)}")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob={mask_prob} must be in (0, 1)")


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the tokenizer. `vocab_size` is the tokenizer's real size (<= the model's
    rounded vocabulary); ids >= vocab_size are padding rows, never sampled."""

    pad_id: int
    cls_id: int
    sep_id: int
    unk_id: int
    mask_id: int
    vocab_size: int

    @property
    def ids(self) -> tuple[int, ...]:
        """Ids never masked and never sampled as replacements."""
        return (self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id)

    def __post_init__(self) -> None:
        bad = [i for i in self.ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"special token ids {bad} are outside [0, {self.vocab_size})")


@dataclass
class RTDOutput:
    """Losses and metrics of one RTD step; every field is a 0-dim tensor."""

    loss: torch.Tensor  # mlm_loss + rtd_weight * rtd_loss
    mlm_loss: torch.Tensor  # generator cross-entropy, mean over masked tokens
    rtd_loss: torch.Tensor  # discriminator BCE, mean over non-pad tokens
    gen_acc: torch.Tensor  # generator argmax == original, over masked tokens
    disc_acc: torch.Tensor  # discriminator (logit > 0) == label, over non-pad tokens
    disc_precision: torch.Tensor  # of tokens predicted replaced, fraction truly replaced
    disc_recall: torch.Tensor  # of replaced tokens, fraction predicted replaced
    replaced_frac: torch.Tensor  # num_replaced / num_tokens
    num_masked: torch.Tensor
    num_tokens: torch.Tensor  # non-pad tokens
    num_replaced: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class RTDTokens:
    """Per-token results of steps 1-5 of one RTD pass (what evaluation aggregates)."""

    masked: torch.Tensor  # (B, L) bool, the positions the generator filled in
    targets: torch.Tensor  # (N,) the original ids there
    mlm: VocabOutput  # per masked token: loss, argmax hit, sampled replacement
    replaced: torch.Tensor  # (B, L) bool, the discriminator's labels
    rtd_logits: torch.Tensor  # (B, L), > 0 = predicted replaced


class MaskedLMGenerator(nn.Module):
    """Backbone + tied MLM head; parameter names of HF `DebertaV2ForMaskedLM` (legacy)."""

    def __init__(self, cfg: DebertaV3Config, vocab_head: str = "fused"):
        super().__init__()
        self.deberta = DebertaV3Backbone(cfg)
        self.cls = MLMHead(cfg, make_vocab_head(vocab_head))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L)
        masked: torch.Tensor,  # (B, L) bool
        request: VocabTargets,  # N = masked.sum() rows, in row-major order of `masked`
    ) -> VocabOutput:
        """MLM loss, samples and argmax hits at the masked positions only: the vocabulary head
        over every token would be most of the step's FLOPs."""
        h = self.deberta(input_ids, attention_mask)  # (B, L, H)
        return self.cls(h[masked], self.deberta.embeddings.word_embeddings, request)


class RTDModel(nn.Module):
    """Generator + discriminator + RTD head; `forward` runs one RTD training step's losses."""

    def __init__(
        self,
        cfg: DebertaV3Config,
        special: SpecialTokens,
        sharing: str = "gdes",
        mask_prob: float = 0.15,
        rtd_weight: float = 50.0,
        vocab_head: str = "fused",  # model.vocab_head: "fused" (training) or "plain" (reference)
    ):
        super().__init__()
        check_rtd_options(sharing, mask_prob)
        if special.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {special.vocab_size} > model vocab_size {cfg.vocab_size}"
            )
        if special.pad_id != cfg.pad_token_id:
            raise ValueError(
                f"special.pad_id {special.pad_id} != cfg.pad_token_id {cfg.pad_token_id}"
            )
        self.config, self.special, self.sharing = cfg, special, sharing
        self.mask_prob, self.rtd_weight = mask_prob, rtd_weight
        self.generator = MaskedLMGenerator(cfg.generator_config(), vocab_head)
        self.discriminator = DebertaV3Backbone(cfg, with_word_embeddings=sharing != "es")
        if sharing == "gdes":
            nn.init.zeros_(self.discriminator.embeddings.word_embeddings.weight)  # E_delta = 0
        self.rtd_head = RTDHead(cfg)

    def banned_ids(self, device: torch.device) -> torch.Tensor:
        """(V,) bool: specials and the rows beyond the tokenizer's vocabulary. Built per call
        (cheap) rather than held as a buffer, so a model built on the meta device is safe."""
        banned = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=device)
        banned[list(self.special.ids)] = True
        banned[self.special.vocab_size :] = True
        return banned

    # -- the steps of RTD ---------------------------------------------------------------
    def mask_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Bernoulli(mask_prob) over non-special, non-pad tokens: (B, L) bool."""
        candidates = attention_mask.bool() & ~self.banned_ids(input_ids.device)[input_ids]
        u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        return candidates & (u < self.mask_prob)

    @torch.no_grad()
    def sample_replacements(self, logits: torch.Tensor, generator: torch.Generator | None):
        """One sample per row from softmax(logits) (temperature 1), banned ids excluded: (N,),
        by inverse-CDF sampling (`model.vocab_head.inverse_cdf_sample`). The training step
        draws the same uniforms (`vocab_targets`) and samples inside its vocabulary head."""
        if logits.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=logits.device)
        u = self.replacement_uniforms(logits.shape[0], generator, logits.device)
        return inverse_cdf_sample(logits, self.banned_ids(logits.device), u)

    @staticmethod
    def replacement_uniforms(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(rows, 1) float32 uniforms, one per masked token, for inverse-CDF sampling."""
        return torch.rand((rows, 1), generator=generator, device=device, dtype=torch.float32)

    def vocab_targets(
        self, input_ids: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None
    ) -> VocabTargets:
        """The originals at the masked positions (N,), the ids never sampled, one uniform per
        masked token for sampling its replacement."""
        targets = input_ids[masked]  # (N,)
        uniforms = self.replacement_uniforms(len(targets), generator, input_ids.device)
        return VocabTargets(targets, self.banned_ids(input_ids.device), uniforms)

    def discriminator_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The discriminator's token embeddings (B, L, H) under the sharing mode."""
        e_g = self.generator.deberta.embeddings.word_embeddings
        if self.sharing == "es":
            return e_g(ids)
        own = self.discriminator.embeddings.word_embeddings(ids)
        if self.sharing == "gdes":
            return e_g(ids).detach() + own  # sg(E_G) + E_delta
        return own

    def replaced_token_detection(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L) bool
        generator: torch.Generator | None,
    ) -> RTDTokens:
        """Steps 1-5 of RTD, per token (the losses are `forward`'s)."""
        # 1. mask: Bernoulli(mask_prob) over real tokens
        masked = self.mask_tokens(input_ids, attention_mask, generator)  # (B, L)
        request = self.vocab_targets(input_ids, masked, generator)  # N masked tokens
        # 2. generator: MLM loss at the masked positions, and 3. one replacement per masked
        # token sampled from its softmax (no gradient through the sample)
        gen_ids = input_ids.masked_fill(masked, self.special.mask_id)
        mlm = self.generator(gen_ids, attention_mask, masked, request)
        # 4. label: replaced unless the sample equals the original
        disc_ids = input_ids.masked_scatter(masked, mlm.samples)  # (B, L)
        replaced = disc_ids != input_ids  # (B, L) bool
        # 5. discriminator: one logit per token, embeddings shared per `sharing`
        h = self.discriminator(
            attention_mask=attention_mask, inputs_embeds=self.discriminator_embeddings(disc_ids)
        )  # (B, L, H)
        return RTDTokens(masked, request.targets, mlm, replaced, self.rtd_head(h))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L); None = input_ids != pad_id
        generator: torch.Generator | None = None,
    ) -> RTDOutput:
        if attention_mask is None:
            attention_mask = input_ids != self.special.pad_id
        attention_mask = attention_mask.bool()
        t = self.replaced_token_detection(input_ids, attention_mask, generator)
        # 6. loss = L_MLM (mean over masked tokens) + lambda * L_RTD (mean over real tokens)
        mlm_loss = t.mlm.loss_sum / max(len(t.targets), 1)
        rtd_logits = t.rtd_logits[attention_mask].float()  # (T,)
        rtd_labels = t.replaced[attention_mask]  # (T,)
        rtd_loss = F.binary_cross_entropy_with_logits(rtd_logits, rtd_labels.float())
        loss = mlm_loss + self.rtd_weight * rtd_loss
        return self._metrics(
            loss, mlm_loss, rtd_loss, t.mlm.correct, t.targets, rtd_logits, rtd_labels
        )

    @torch.no_grad()
    def _metrics(self, loss, mlm_loss, rtd_loss, gen_correct, targets, rtd_logits, rtd_labels):
        num_masked, num_tokens = torch.tensor(targets.numel()), torch.tensor(rtd_labels.numel())
        pred = rtd_logits > 0
        tp = (pred & rtd_labels).sum()
        num_replaced = rtd_labels.sum()
        return RTDOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            rtd_loss=rtd_loss,
            gen_acc=_ratio(gen_correct, num_masked),
            disc_acc=_ratio((pred == rtd_labels).sum(), num_tokens),
            disc_precision=_ratio(tp, pred.sum()),
            disc_recall=_ratio(tp, num_replaced),
            replaced_frac=_ratio(num_replaced, num_tokens),
            num_masked=num_masked.to(loss.device),
            num_tokens=num_tokens.to(loss.device),
            num_replaced=num_replaced,
        )


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num.float() / den.clamp(min=1).float().to(num.device)
