"""The shared CLaRa model: one frozen base LLM, three LoRA roles, memory tokens (README: "How CLaRa reads a
document" and "What a step costs").

- compressor (`encoder_adapter`): document + memory tokens -> final hidden states at the memory positions;
- generator (`decoder_adapter`): chat prompt whose memory slots take the compressed vectors;
- query reasoner (`query_reasoner_adapter`, stage 2): encodes the question like a document.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import LogitsProcessorList, StoppingCriteriaList

from clara.errors import ConfigError
from clara.model.collate import IGNORE_INDEX, Batch
from clara.model.decoding import RowDecoding, RowSampler, RowWatch, finish
from clara.model.losses import LOSS_TERMS, WEIGHT_SETTINGS
from clara.model.topk import cosine_scores, differentiable_topk
from clara.parallel.distributed import gathered, in_lockstep, most_over_ranks
from clara.stages import COMPRESSOR, GENERATOR, QUERY_REASONER
from clara.stages.prompts import SpecialTokens, end_of_turn

ADAPTERS = (COMPRESSOR, GENERATOR, QUERY_REASONER)


@dataclass
class ModelSettings:
    """What defines a CLaRa model beyond its base weights; saved in the checkpoint's config.json."""

    base_model: str
    n_mem_tokens: int
    compress_rate: int
    doc_max_length: int
    generation_top_k: int = 5
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    topk_temperature: float = 0.02
    candidate_chunk_size: int = 64


@dataclass
class LMOutput:
    """LM loss and what the debug print needs, all at supervised positions only."""

    loss: torch.Tensor
    logits: torch.Tensor  # [S, V], detached, float32
    targets: torch.Tensor  # [S]
    sample_index: torch.Tensor  # [S]: which sample of the batch each position belongs to
    positions: torch.Tensor  # [S]: position in the decoder input of the token being predicted


@dataclass
class StepOutput:
    loss: torch.Tensor
    lm: LMOutput
    chosen: torch.Tensor | None = None  # stage 2: [B, k] candidate indices
    scores: torch.Tensor | None = None  # stage 2: [B, N] retrieval scores, -inf at padding
    # The loss terms of clara.model.losses this step computed, by name ("mse", "retrieval"); absent: not computed.
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run in eval mode (no LoRA dropout) and give the module back in the mode it came in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def lora_config(settings: ModelSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear",
        bias="none",
    )


def attention_implementation(flash_attn: str, on_cuda: bool) -> str:
    """FlashAttention-2 where installed and on CUDA (or when asked), else PyTorch SDPA."""
    if flash_attn == "false" or not on_cuda:
        if flash_attn == "true" and not on_cuda:
            raise ConfigError("flash_attn", flash_attn, "auto or false on the CPU (FlashAttention-2 needs CUDA)")
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        if flash_attn == "true":
            raise ConfigError(
                "flash_attn",
                flash_attn,
                "auto or false, or flash-attn installed: pip install --no-build-isolation -r requirements-gpu.txt",
            ) from None
        return "sdpa"
    return "flash_attention_2"


class ClaraModel(nn.Module):
    def __init__(self, peft_model: PeftModel, tokenizer, tokens: SpecialTokens, settings: ModelSettings):
        super().__init__()
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.settings = settings
        embedding = self.causal_lm.get_input_embeddings().weight
        # The memory embeddings train as their own small parameter, merged into the matrix on export.
        with gathered([embedding]):
            self.mem_embeddings = nn.Parameter(embedding[list(tokens.mem_ids)].detach().clone().float())
        self._active = None
        self.refresh_lora_layers()
        # With tied input and output embeddings, the export (which merges the memory embeddings into
        # the matrix) also changes the LM head's memory rows; the head uses those rows here as well,
        # so that the trained model, its export and a reload compute the same logits.
        head = self.causal_lm.get_output_embeddings()
        if head is not None and head.weight is self.causal_lm.get_input_embeddings().weight:
            head.register_forward_hook(self._tied_memory_logits)

    def _tied_memory_logits(self, module: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        first, n = self.tokens.first_mem_id, self.tokens.n_mem
        # A copy, for the same reason as in embed(): the backward must not read the parameter's data.
        memory = (args[0] @ self.mem_embeddings.to(args[0].dtype, copy=True).T).to(logits.dtype)
        return torch.cat([logits[..., :first], memory, logits[..., first + n :]], dim=-1)

    # -- the pieces of the base model -------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        return self.peft_model.base_model.model

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its LM head (output: final-norm hidden states)."""
        return self.causal_lm.get_decoder()

    @property
    def hidden_size(self) -> int:
        return self.mem_embeddings.shape[1]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_model.peft_config)

    # -- adapter roles ------------------------------------------------------------------------------
    def refresh_lora_layers(self) -> None:
        """Find the LoRA layers again after adapters were added or deleted."""
        self._lora_layers = [m for m in self.peft_model.modules() if isinstance(m, BaseTunerLayer)]

    def set_active_adapter(self, name: str) -> None:
        # peft's set_adapter also flips requires_grad, which would freeze the other trained role.
        for layer in self._lora_layers:
            layer._active_adapter = name
        self._active = name

    @contextlib.contextmanager
    def adapter(self, name: str):
        previous = self._active
        self.set_active_adapter(name)
        try:
            yield
        finally:
            if previous is not None:
                self.set_active_adapter(previous)

    def _checkpoint_contexts(self):
        # Checkpointed layers are recomputed during backward, when another role may be active:
        # the recompute must run with the adapter the forward used.
        return contextlib.nullcontext(), self.adapter(self._active)

    def enable_gradient_checkpointing(self) -> None:
        self.causal_lm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        )

    def set_trainable(self, adapters: tuple[str, ...] | list[str], memory_embeddings: bool) -> None:
        """Train exactly these adapters (and the memory embeddings if asked); freeze everything else."""
        for name, param in self.peft_model.named_parameters():
            param.requires_grad_(any(f".{adapter}." in name for adapter in adapters))
        self.mem_embeddings.requires_grad_(memory_embeddings)

    def add_fresh_adapter(self, name: str) -> None:
        """A newly initialised LoRA adapter under `name`, replacing one of that name."""
        if name in self.adapter_names:
            self.peft_model.delete_adapter(name)
        self.peft_model.add_adapter(name, lora_config(self.settings))
        self.refresh_lora_layers()

    @torch.no_grad()
    def copy_adapter(self, source: str, target: str) -> None:
        """A new adapter `target` with `source`'s weights, device and dtype (how stage 2 starts its query reasoner)."""
        self.add_fresh_adapter(target)
        state = get_peft_model_state_dict(self.peft_model, adapter_name=source, save_embedding_layers=False)
        set_peft_model_state_dict(self.peft_model, state, adapter_name=target)
        params = dict(self.peft_model.named_parameters())
        for name, param in params.items():
            if f".{target}." in name:
                twin = params[name.replace(f".{target}.", f".{source}.")]
                param.data = param.data.to(device=twin.device, dtype=twin.dtype)
                param.requires_grad_(twin.requires_grad)

    # -- compute ------------------------------------------------------------------------------------
    def _mem_mask(self, ids: torch.Tensor) -> torch.Tensor:
        first = self.tokens.first_mem_id
        return (ids >= first) & (ids < first + self.tokens.n_mem)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, with the trained memory embeddings at memory-token positions."""
        embeds = self.causal_lm.get_input_embeddings()(ids)
        offset = (ids - self.tokens.first_mem_id).clamp(0, self.tokens.n_mem - 1)
        # F.embedding's backward needs only the row count, not the parameter's data, which ZeRO-3 may
        # have released by then (it cannot see into StepOutput to gather it again before backward).
        mem = F.embedding(offset, self.mem_embeddings.to(embeds.dtype))
        return torch.where(self._mem_mask(ids).unsqueeze(-1), mem, embeds)

    def compress(
        self, ids: torch.Tensor, mask: torch.Tensor, adapter: str = COMPRESSOR, with_mse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Documents (memory tokens appended) -> memory states [D, n, H] and optionally the MSE loss.

        Runs the transformer body only: no vocabulary projection, no per-layer hidden states.
        """
        n = self.tokens.n_mem
        with self.adapter(adapter):
            hidden = self.backbone(
                inputs_embeds=self.embed(ids), attention_mask=mask, use_cache=False
            ).last_hidden_state
        states = hidden[:, -n:]
        if not with_mse:
            return states, None
        doc_mask = mask.clone()
        doc_mask[:, -n:] = 0
        doc_mask = doc_mask.unsqueeze(-1).to(hidden.dtype)
        doc_mean = (hidden * doc_mask).sum(1) / doc_mask.sum(1).clamp(min=1)
        mse = (states.float().mean(1) - doc_mean.float()).pow(2).mean()
        return states, mse

    def inject(self, ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Decoder input embeddings with `vectors` [slots * n, H] placed, in order, at the memory positions."""
        embeds = self.causal_lm.get_input_embeddings()(ids)
        return embeds.masked_scatter(self._mem_mask(ids).unsqueeze(-1), vectors.to(embeds.dtype))

    def lm_loss(self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> LMOutput:
        """Generator forward; the LM head projects only the supervised positions."""
        with self.adapter(GENERATOR):
            hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = self.causal_lm.get_output_embeddings()(hidden[:, :-1][supervised]).float()
        gold = targets[supervised]
        loss = F.cross_entropy(logits, gold)
        where = supervised.nonzero()
        return LMOutput(
            loss=loss, logits=logits.detach(), targets=gold, sample_index=where[:, 0], positions=where[:, 1] + 1
        )

    def compress_candidates(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Stage-2 candidates through the frozen compressor, without gradient, in bounded chunks.

        Under ZeRO-3 a rank with fewer chunks than another compresses its first candidate again until
        both have run as many forwards (the extra results are dropped).
        """
        chunk = self.settings.candidate_chunk_size
        starts = range(0, ids.shape[0], chunk)
        extra = most_over_ranks(len(starts), ids.device) - len(starts) if in_lockstep(self) else 0
        with eval_mode(self), torch.no_grad():
            parts = [self.compress(ids[i : i + chunk], mask[i : i + chunk])[0] for i in starts]
            for _ in range(extra):
                self.compress(ids[:1], mask[:1])
        return torch.cat(parts)

    def select(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 2: score the candidates against the question, pick top-k differentiably.

        Returns the selected memory vectors [B * k * n, H], the chosen indices [B, k] and the scores
        [B, N] (-inf at padding, with their gradient).
        """
        query, _ = self.compress(batch.query_ids, batch.query_mask, QUERY_REASONER)
        candidates = self.compress_candidates(batch.enc_ids, batch.enc_mask).flatten(1)
        counts = torch.tensor(batch.docs_per_sample, device=candidates.device)
        padded = nn.utils.rnn.pad_sequence(list(candidates.split(batch.docs_per_sample)), batch_first=True)
        valid = torch.arange(padded.shape[1], device=padded.device).unsqueeze(0) < counts.unsqueeze(1)
        scores = cosine_scores(query.flatten(1).float(), padded.float())
        chosen, weights = differentiable_topk(
            scores, self.settings.generation_top_k, self.settings.topk_temperature, valid
        )
        selected = torch.einsum("bkn,bnd->bkd", weights.to(padded.dtype), padded)
        return selected.reshape(-1, self.hidden_size), chosen, scores.masked_fill(~valid, float("-inf"))

    def decoder_inputs(self, batch: Batch, with_mse: bool = False) -> tuple[torch.Tensor, StepOutput]:
        """Decoder input embeddings, plus the MSE / retrieval results of producing them."""
        extras = StepOutput(loss=None, lm=None)
        if batch.query_ids is None:
            states, mse = self.compress(batch.enc_ids, batch.enc_mask, with_mse=with_mse)
            if mse is not None:
                extras.terms["mse"] = mse
            vectors = states.reshape(-1, self.hidden_size)
        else:
            vectors, extras.chosen, extras.scores = self.select(batch)
        return self.inject(batch.dec_ids, vectors), extras

    def forward(self, batch: Batch, **weights: float) -> StepOutput:
        """The LM loss plus each loss term of clara.model.losses times its weight (`<name>_weight=`; default 0)."""
        unknown = sorted(set(weights) - set(WEIGHT_SETTINGS))
        if unknown:
            raise TypeError(f"unknown loss weights {unknown}: expected some of {', '.join(WEIGHT_SETTINGS)}")
        measured = any(weights.get(t.weight_setting, 0.0) > 0 for t in LOSS_TERMS if t.measured_while_compressing)
        embeds, out = self.decoder_inputs(batch, with_mse=measured)
        out.lm = self.lm_loss(embeds, batch.dec_mask, batch.labels)
        out.loss = out.lm.loss
        for term in LOSS_TERMS:
            weight = weights.get(term.weight_setting, 0.0)
            value = term.compute(self, batch, out) if weight > 0 else None
            if value is None:
                out.terms.pop(term.name, None)
            else:
                out.terms[term.name] = value
                out.loss = out.loss + weight * value
        return out

    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        max_new_tokens: int = 64,
        vectors: torch.Tensor | None = None,
        rows: list[RowDecoding] | None = None,
    ) -> tuple[list[str], torch.Tensor | None]:
        """Greedy answers for a batch built without targets; stage 2 also returns the chosen indices.

        vectors: memory vectors computed earlier ([slots * n, H], in slot order) to use instead of
        compressing the batch's documents. rows: one clara.model.decoding.RowDecoding per answer, decoded
        with its own sampling, token limit and stop strings, streamed and cancellable, for at most
        max_new_tokens more tokens in this call; greedy rows get the same answers as without rows.
        """
        # Greedy decoding must not depend on the mode the caller left the model in (LoRA dropout). Under
        # ZeRO-3 (collective: every rank calls this) the memory embeddings, read outside forward(), are
        # gathered, and ranks that finished keep stepping until all have (synced_gpus).
        lockstep = in_lockstep(self)
        with eval_mode(self), gathered([self.mem_embeddings]):
            if vectors is None:
                embeds, extras = self.decoder_inputs(batch)
            else:
                embeds, extras = self.inject(batch.dec_ids, vectors), StepOutput(loss=None, lm=None)
            stop_ids = stop_token_ids(self.tokenizer)
            # CLaRa's own tokens are not text: a generated <MEMi> would be read back through the plain
            # embedding row rather than the trained memory embedding.
            added = list(self.tokens.mem_ids) + [self.tokens.ae_id, self.tokens.enc_id, self.tokens.sep_id]
            hooks = {}
            if rows is not None:
                max_new_tokens = min(max_new_tokens, max(r.sampling.max_new_tokens - len(r.tokens) for r in rows))
                hooks = {
                    "logits_processor": LogitsProcessorList([RowSampler(rows, stop_ids)]),
                    "stopping_criteria": StoppingCriteriaList([RowWatch(rows, self.tokenizer, stop_ids)]),
                }
            with self.adapter(GENERATOR):
                out = self.causal_lm.generate(
                    inputs_embeds=embeds,
                    attention_mask=batch.dec_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokens.pad_id,
                    eos_token_id=sorted(stop_ids),
                    suppress_tokens=added,
                    synced_gpus=lockstep,
                    **hooks,
                )
        if rows is None:
            return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)], extras.chosen
        for row in rows:
            finish(row)
        return [row.text for row in rows], extras.chosen


def stop_token_ids(tokenizer) -> set[int]:
    """The tokens that end an answer: the end token and the chat template's end of turn."""
    stop_ids = {tokenizer.eos_token_id}
    turn_end = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id:
        stop_ids.add(turn_end)
    return stop_ids


def attach_adapters(base: nn.Module, names: list[str], settings: ModelSettings) -> PeftModel:
    config = lora_config(settings)
    peft_model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    return peft_model
