"""The system: a frozen Stable Diffusion pipeline, trainable adapters, and a noise objective."""

from __future__ import annotations

import typing
import warnings
from typing import ClassVar

import torch
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from lightning_sd._version import __version__
from lightning_sd.adapters import AdapterConfig, part_groups, prepare_trainable
from lightning_sd.base_prior import BasePrior, adapters_disabled, with_base_prior
from lightning_sd.compilation import check_backend, compile_denoiser
from lightning_sd.components import load_components
from lightning_sd.encoding import vae_encode, vae_scale_factor
from lightning_sd.families import ModelFamily
from lightning_sd.families.base import warn_if_contradicts
from lightning_sd.lora_io import load_lora_into
from lightning_sd.objectives import DiffusionObjective
from lightning_sd.optim import (
    LRSchedule,
    OptimizerFactory,
    build_optimizer,
    lr_lambda,
)
from lightning_sd.pivotal import ExtendedEmbedding, PivotalTuning, add_tokens
from lightning_sd.quantization import QuantizedBase, quantize_linear_layers
from lightning_sd.resume import (
    apply_configured_learning_rates,
    check_learning_rates,
    check_resumable,
    reopen_last_epoch,
    schedule_changed_warning,
)
from lightning_sd.rng import gather_rng_states, restore_rng_states
from lightning_sd.sampling import Sampler
from lightning_sd.serialization import from_config, to_config
from lightning_sd.text_to_image import generate_images

__all__ = ["StableDiffusionLoRA"]


class StableDiffusionLoRA(LightningModule):
    """Fine-tune a Stable Diffusion denoiser (UNet or SD3's transformer) through LoRA/DoRA
    adapters with a chosen objective.

    Everything that differs between SD1.x/2.x, SDXL and SD3 (parts, text encoding,
    micro-conditioning, the network call, file layouts) is asked of ``self.family``.

    The base weights are frozen and reloaded from their source; checkpoints hold only what
    trains (adapters), plus the optimizer and loop state Lightning adds.

    Args:
        pretrained_model_name_or_path: hub id or local pipeline folder, as diffusers takes it.
        revision: hub revision of the base model.
        variant: weight-file variant of the base model (e.g. ``fp16``).
        adapter: the denoiser's adapter (kind, rank, alpha, targets). Checkpoints store it as a
            dict, which is accepted too (likewise for the next two).
        text_encoder_adapter: an adapter on the (first CLIP) text encoder too; ``None`` keeps
            it frozen.
        text_encoder_2_adapter: an adapter on the second CLIP text encoder (SDXL, SD3);
            ``None`` keeps it frozen.
        vae_name_or_path: a standalone VAE instead of the pipeline's (hub id or folder), e.g.
            ``madebyollin/sdxl-vae-fp16-fix``. It is cast to half precision with the frozen
            base under ``16-mixed``, so it must be fp16-safe; the pipeline's own VAE stays
            float32 (SDXL's overflows in fp16).
        pivotal_tuning: new tokens trained with the LoRA (prompts use the abstraction).
        lora_weights: a LoRA file or folder (diffusers or kohya layout) to continue training
            from; it must match the configured adapters (modules, rank, alpha).
        objective: the noise objective; default the one the base model was trained with, read
            from its scheduler config (epsilon or v, EDM for Playground, rectified flow for
            SD3). Checkpoints store it as a ``class_path`` dict, which is accepted too.
        clip_skip: condition on the text encoder's hidden state this many layers before the
            last (diffusers' ``clip_skip``; 0 = last layer). Skipped layers get no adapter.
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant, so
            adapters on a frozen base still get gradients) to trade compute for memory.
        learning_rate: learning rate of the UNet adapters.
        text_encoder_lr: learning rate of the text-encoder adapters (default ``learning_rate``).
        text_encoder_2_lr: learning rate of SDXL's second text-encoder adapters (default
            ``text_encoder_lr``).
        optimizer: the optimizer class, or a ``functools.partial`` of one (YAML: ``class_path``
            and ``init_args``): e.g. ``bitsandbytes.optim.AdamW8bit`` or ``prodigyopt.Prodigy``
            (set ``learning_rate: 1.0`` for Prodigy). Each group's learning rate overrides its
            ``lr``. Default: AdamW, weight decay 1e-2, fused where the device has the kernel,
            and ``DeepSpeedCPUAdam`` under DeepSpeed optimizer offload.
        lr_scheduler: the schedule after warm-up, stepped every optimizer step.
        lr_warmup_steps: linear warm-up steps of the schedule.
        lr_power: the exponent of the ``polynomial`` schedule.
        channels_last: keep the UNet's weights and inputs in channels-last memory format
            (faster convolutions with tensor cores).
        compile: ``torch.compile`` the denoiser once, in place, after its adapters and
            gradient checkpointing are set (checkpoint keys and exported files are unchanged);
            the first step pays the compilation (``benchmarks/results/compile.md``).
        compile_backend: the ``torch.compile`` backend: ``inductor`` (generated kernels) or
            ``aot_eager`` (quick to compile, no speed-up; for checking a graph).
        quantize_base: store the frozen denoiser's linear layers in 4-bit NF4 (QLoRA) or 8-bit
            (``int8``) with bitsandbytes; the adapters stay float32 and export as usual (the
            files load on an unquantized base). Not with adapter kind ``full``.
        heldout_seed: seeds the fixed noise and timesteps of the held-out validation loss.
        base_prior: prior preservation without class images (``BasePrior``): the adapted
            model's class-prompt output is pulled to the base's (adapters off) at the same
            noisy latents; beside, or instead of, class-image prior preservation in the data.
        family: the model family with its settings, e.g. ``SD3(t5=False)`` (YAML:
            ``class_path: lightning_sd.families.SD3``); default detected from the base
            model's ``model_index.json``.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        adapter: AdapterConfig | None = None,
        text_encoder_adapter: AdapterConfig | None = None,
        text_encoder_2_adapter: AdapterConfig | None = None,
        vae_name_or_path: str | None = None,
        pivotal_tuning: PivotalTuning | None = None,
        lora_weights: str | None = None,
        objective: DiffusionObjective | None = None,
        clip_skip: int = 0,
        gradient_checkpointing: bool = False,
        learning_rate: float = 1e-4,
        text_encoder_lr: float | None = None,
        text_encoder_2_lr: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedule = "constant",
        lr_warmup_steps: int = 0,
        lr_power: float = 1.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        quantize_base: QuantizedBase | None = None,
        heldout_seed: int = 0,
        family: ModelFamily | None = None,
        base_prior: BasePrior | None = None,
    ):
        super().__init__()
        check_learning_rates(
            learning_rate=learning_rate,
            text_encoder_lr=text_encoder_lr,
            text_encoder_2_lr=text_encoder_2_lr,
        )
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {lr_warmup_steps}")
        check_backend(compile_backend)
        # Every part is stored the way YAML writes it (plain data: checkpoints load with
        # torch.load(weights_only=True)) and rebuilt from that form by from_config.
        given = {
            "adapter": adapter,
            "text_encoder_adapter": text_encoder_adapter,
            "text_encoder_2_adapter": text_encoder_2_adapter,
            "pivotal_tuning": pivotal_tuning,
            "objective": objective,
            "optimizer": optimizer,
            "family": family,
            "base_prior": base_prior,
        }
        hints = typing.get_type_hints(StableDiffusionLoRA.__init__)
        parts = {name: from_config(value, hints[name]) for name, value in given.items()}
        parts["adapter"] = parts["adapter"] or AdapterConfig()
        self.save_hyperparameters(ignore=list(parts))
        self.hparams.update({name: to_config(value) for name, value in parts.items()})
        self.adapter: AdapterConfig = parts["adapter"]
        self.text_encoder_adapter: AdapterConfig | None = parts["text_encoder_adapter"]
        self.text_encoder_2_adapter: AdapterConfig | None = parts["text_encoder_2_adapter"]
        self.pivotal_tuning: PivotalTuning | None = parts["pivotal_tuning"]
        # None until configure_model reads the base's scheduler (see default_objective).
        self.objective: DiffusionObjective | None = parts["objective"]
        self.optimizer: OptimizerFactory | None = parts["optimizer"]
        self.family: ModelFamily | None = parts["family"]
        self.base_prior: BasePrior | None = parts["base_prior"]
        # The networks, set by configure_model under their diffusers names (unet or
        # transformer; text_encoder, text_encoder_2, text_encoder_3 as the family has them).
        self.vae = self.unet = self.transformer = None
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        self.tokenizer = self.tokenizer_2 = self.tokenizer_3 = None
        self.tokenizers: dict = {}
        # Checkpoints hold adapters only; on_load_checkpoint checks nothing trainable is missing.
        self.strict_loading = False
        self._rng_states_to_restore: list | None = None
        self._saved_total_steps: int | None = None
        self._planned_steps: int | None = None

    # -- model ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the frozen base and inject the adapters; idempotent, as Lightning requires."""
        if self.vae is not None:
            return
        h = self.hparams
        parts = load_components(
            h.pretrained_model_name_or_path,
            h.revision,
            h.variant,
            vae_name_or_path=h.vae_name_or_path,
            family=self.family,
        )
        self.family = family = parts.family
        for name, module in parts.modules().items():
            setattr(self, name, module)
        self.tokenizers = parts.tokenizers
        for name, tokenizer in parts.tokenizers.items():  # pipelines' attribute names
            setattr(self, name.replace("text_encoder", "tokenizer"), tokenizer)
        # Frozen weights in the mixed-precision dtype; the pipeline's VAE stays float32 (SDXL's
        # overflows in fp16) and adapters are made float32 by add_adapter.
        dtype = self.frozen_dtype()
        if dtype != torch.float32:
            frozen = [self.denoiser, *self.text_encoders().values()]
            for model in frozen + ([self.vae] if h.vae_name_or_path else []):
                model.to(dtype)
        if self.base_prior is not None and (
            self.adapter.kind == "full" or self.adapter.init in ("pissa", "olora")
        ):
            raise ValueError(
                f"base_prior needs the base model behind switched-off adapters; adapter kind "
                f"{self.adapter.kind!r} with init {self.adapter.init!r} changes the base "
                "weights themselves: use class images (the data's class_data_dir) instead"
            )
        if h.quantize_base is not None:  # before the adapters, which wrap the quantized layers
            if self.adapter.kind == "full":
                raise ValueError(
                    "quantize_base needs adapters: adapter kind 'full' trains the base"
                )
            quantize_linear_layers(self.denoiser, h.quantize_base, compute_dtype=dtype)
        prepare_trainable(self.denoiser, self.adapter)
        for name, config in self.text_encoder_adapters().items():
            if name not in parts.text_encoders:
                raise ValueError(
                    f"{name}_adapter is set but {h.pretrained_model_name_or_path!r} is a "
                    f"{family.description} pipeline without {name}"
                )
            # Layers whose output is unused get no adapter (no gradient would reach them).
            skip = family.unused_last_layers(name, h.clip_skip)
            prepare_trainable(parts.text_encoders[name], config, skip_last_layers=skip)
        if self.pivotal_tuning is not None:
            for name in family.embedding_keys:
                add_tokens(self.tokenizers[name], parts.text_encoders[name], self.pivotal_tuning)
        if h.lora_weights:
            load_lora_into(h.lora_weights, self.adapted_components(), family=family)
        if h.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()  # diffusers: use_reentrant=False
            for encoder in self.text_encoders().values():
                encoder.activation_checkpointing_enable({"use_reentrant": False})
        if h.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if h.compile:  # last: it traces the adapted, checkpointed network
            compile_denoiser(self.denoiser, h.compile_backend)
        if self.objective is None:
            self.objective = family.default_objective(parts.scheduler)
        else:
            warn_if_contradicts(self.objective, parts.scheduler)
        self.objective.set_schedule(parts.scheduler)

    @property
    def denoiser(self) -> torch.nn.Module | None:
        """The network the objective trains: the UNet, or SD3's transformer."""
        return getattr(self, self.family.denoiser_name) if self.family is not None else None

    def text_encoder_adapters(self) -> dict[str, AdapterConfig]:
        """The configured text-encoder adapters by diffusers name."""
        configs = {
            "text_encoder": self.text_encoder_adapter,
            "text_encoder_2": self.text_encoder_2_adapter,
        }
        return {k: v for k, v in configs.items() if v is not None}

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The loaded text encoders by diffusers name."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def frozen_dtype(self) -> torch.dtype:
        """float16/bfloat16 under ``16-mixed``/``bf16-mixed`` precision, else float32.

        ``*-true`` precisions would cast the adapters too (and Adam's updates underflow in
        half precision), so they are refused.
        """
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        if precision in ("16-true", "bf16-true"):
            raise ValueError(
                f"precision={precision!r} casts the trainable adapters to half precision; use "
                f"{precision.replace('true', 'mixed')!r}: the frozen base is cast to half, "
                "the adapters stay float32"
            )
        return {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(
            precision, torch.float32
        )

    def adapted_components(self) -> dict[str, torch.nn.Module]:
        """The parts that may carry adapters, by their diffusers names."""
        return {self.family.denoiser_name: self.denoiser, **self.text_encoders()}

    def fully_trained_components(self) -> dict[str, torch.nn.Module]:
        """The parts trained in full (adapter kind ``full``), by their diffusers names."""
        if self.family is None:  # nothing loaded yet
            return {}
        configs = {self.family.denoiser_name: self.adapter, **self.text_encoder_adapters()}
        parts = self.adapted_components()
        return {
            name: parts[name]
            for name, config in configs.items()
            if config.kind == "full" and parts.get(name) is not None
        }

    def training_metadata(self) -> dict:
        """Facts written into exported files' headers and model cards."""
        h = self.hparams
        return {
            "base_model": h.pretrained_model_name_or_path,
            **self.family.facts(),
            "family_config": to_config(self.family),
            "revision": h.revision,
            "adapter": h.adapter,
            "text_encoder_adapter": h.text_encoder_adapter,
            "text_encoder_2_adapter": h.text_encoder_2_adapter,
            "pivotal_tuning": h.pivotal_tuning,
            "objective": to_config(self.objective),
            "clip_skip": h.clip_skip,
            "steps": self.trainer.global_step if self._trainer is not None else None,
            "lightning_sd_version": __version__,
        }

    # Settings known not to change what ``text_embeddings`` returns; every other hparam (clip
    # skip, pivotal tokens, settings added later) keys the text cache, so none is served stale.
    TRAINING_ONLY_HPARAMS: ClassVar[frozenset[str]] = frozenset({
        "adapter", "objective", "learning_rate", "text_encoder_lr", "text_encoder_2_lr",
        "optimizer", "lr_scheduler", "lr_warmup_steps", "lr_power", "heldout_seed",
        "vae_name_or_path", "gradient_checkpointing", "channels_last",
    })  # fmt: skip

    def text_settings(self) -> dict:
        """The settings that may change ``text_embeddings``: what keys cached embeddings."""
        return {k: v for k, v in self.hparams.items() if k not in self.TRAINING_ONLY_HPARAMS}

    def denoiser_fn(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The denoiser as the objective calls it: ``model(x_in, t, **cond) -> output``."""
        return self.family.denoiser_fn(self.denoiser)(x, t, **cond)

    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] to scaled VAE latents (the mode, when ``sample`` is False)."""
        return vae_encode(self.vae, pixel_values, sample)

    def text_embeddings(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts to their text embeddings: what depends on the prompt alone (and is cached).

        The family's encoder, the one ``generate`` calls too. The pivotal-tuning abstraction
        (``TOK``) is replaced by its tokens here, so data, validation prompts and generation
        all write prompts the same way.
        """
        if self.pivotal_tuning is not None:
            prompts = [self.pivotal_tuning.substitute(p) for p in prompts]
        return self.family.text_embeddings(
            self.tokenizers, self.text_encoders(), prompts, self.hparams.clip_skip
        )

    def native_size(self) -> tuple[int, int]:
        """The denoiser's native image size in pixels (height, width)."""
        side = self.denoiser.config.sample_size * vae_scale_factor(self.vae)
        return side, side

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts to the denoiser's conditioning keyword arguments, for the native size
        (SDXL's time ids: uncropped images of that size)."""
        return self.family.conditioning(self.text_embeddings(prompts), self.native_size())

    # -- steps ------------------------------------------------------------------------------
    def batch_latents(self, batch: dict, sample: bool = True) -> torch.Tensor:
        """Cached latents when the data serves them, else the VAE encoding of the pixels."""
        if "latents" in batch:
            return batch["latents"].float()
        pixels = batch["pixel_values"]
        self.check_image_size(*pixels.shape[-2:])
        return self.encode_latents(pixels, sample=sample)

    def check_image_size(self, height: int, width: int) -> None:
        """Sides must be multiples of the VAE's and the UNet's downsampling (64 for SD).

        Otherwise the VAE crops the latents and the UNet interpolates mismatched feature maps:
        it trains, on the wrong thing, with no word.
        """
        factor = vae_scale_factor(self.vae) * self.denoiser_downsampling()
        if height % factor or width % factor:
            raise ValueError(
                f"training images of {width}x{height} px: each side must be a multiple of "
                f"{factor} (the VAE's downsampling times the UNet's); set the data's resolution "
                f"to e.g. {max(factor, round(width / factor) * factor)}"
            )

    def denoiser_downsampling(self) -> int:
        """How much the denoiser downsamples its latents (UNet: its resamplers; DiT: patches)."""
        config = self.denoiser.config
        return getattr(config, "patch_size", None) or 2 ** getattr(
            self.denoiser, "num_upsamplers", 0
        )

    def batch_cond(self, batch: dict, latents: torch.Tensor | None = None) -> dict:
        """The denoiser's conditioning for a batch: its cached text embeddings (``batch["cond"]``)
        or its encoded prompts, plus what the family takes from the images (SDXL's time ids
        from the batch's sizes and crops, else uncropped images of the latents' size)."""
        text = batch["cond"] if "cond" in batch else self.text_embeddings(batch["prompt"])
        if latents is None:
            latents = batch.get("latents")
        if latents is not None:
            size = tuple(int(d) * vae_scale_factor(self.vae) for d in latents.shape[-2:])
        else:
            size = tuple(int(d) for d in batch["pixel_values"].shape[-2:])
        return self.family.conditioning(text, size, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents = self.batch_latents(batch)
        cond = self.batch_cond(batch, latents)
        priors: list[torch.Tensor] = []
        model = self.training_denoiser(batch, latents, priors)
        per_sample = self.objective.loss(model, latents, mask=batch.get("mask"), **cond)
        loss = (per_sample * batch["loss_weight"]).mean()
        for prior in priors:  # BasePrior's term, from the same noisy latents
            self.log("train/base_prior_loss", prior.mean(), batch_size=len(latents))
            loss = loss + self.base_prior.weight * prior.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def training_denoiser(self, batch: dict, latents: torch.Tensor, priors: list):
        """The network call the objective trains: with a ``BasePrior``, one that also runs the
        class prompt through the adapted and the base network (its term goes to ``priors``)."""
        if self.base_prior is None:
            return self.denoiser_fn
        prompts = [self.base_prior.class_prompt] * len(latents)
        parts = [self.denoiser, *self.text_encoders().values()]
        student = self.batch_cond({**batch, "cond": self.text_embeddings(prompts)}, latents)
        with torch.no_grad(), adapters_disabled(parts):
            teacher = self.batch_cond({**batch, "cond": self.text_embeddings(prompts)}, latents)
        return with_base_prior(self.denoiser_fn, student, teacher, [self.denoiser], priors)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Held-out loss with noise and timesteps fixed by ``heldout_seed`` and the batch index.

        The same weights always give the same number, so runs and objectives compare.
        """
        latents = self.batch_latents(batch, sample=False)
        noise, sigma = self.heldout_noise(latents, batch_idx)
        cond = self.batch_cond(batch, latents)
        per_sample = self.objective.loss(
            self.denoiser_fn, latents, noise=noise, sigma=sigma, mask=batch.get("mask"), **cond
        )
        loss = (per_sample * batch["loss_weight"]).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def heldout_noise(self, latents: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, ...]:
        """Fixed noise and uniformly drawn training timesteps for one held-out batch."""
        gen = torch.Generator().manual_seed(self.hparams.heldout_seed * 100_003 + batch_idx)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        sigmas = self.objective.schedule.sigmas
        t = torch.randint(0, len(sigmas), (len(latents),), generator=gen)
        return noise, sigmas.cpu()[t].to(latents)

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 20,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        resolution: int | None = None,
        sampler: Sampler | None = None,
    ) -> torch.Tensor:
        """Sample one image per (prompt, seed) pair through the objective's ``denoise``.

        Noise comes from per-seed generators, so sampling never touches the global RNG.

        Args:
            prompts: one prompt per image.
            seeds: one seed per image (its initial noise).
            steps: sampler steps over Karras sigmas of the checkpoint's range.
            guidance_scale: classifier-free guidance weight (1 disables it).
            negative_prompt: the unconditional prompt of guidance.
            resolution: image side; default the denoiser's native sample size.
            sampler: ``Euler``, ``Heun`` or ``DPMPP2M`` (default) from ``lightning_sd.sampling``.

        Returns:
            Images in [0, 1], shape (N, 3, H, W).
        """
        return generate_images(
            self.objective,
            self.family,
            self.denoiser,
            self.vae,
            self.text_embeddings,
            prompts,
            seeds,
            steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            resolution=resolution,
            sampler=sampler,
        )

    # -- optimisation -----------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """One optimizer group per trained part, each with its own learning rate; LoRA+ adds
        a ``<part>.lora_B`` group at ``loraplus_lr_ratio`` times the part's rate.

        Empty groups are never created (DeepSpeed rejects them).
        """
        h = self.hparams
        te_lr = h.text_encoder_lr if h.text_encoder_lr is not None else h.learning_rate
        lrs = {
            "text_encoder": te_lr,
            "text_encoder_2": h.text_encoder_2_lr if h.text_encoder_2_lr is not None else te_lr,
        }
        denoiser = self.family.denoiser_name
        trained = dict(self.denoiser.named_parameters())
        trained = {n: p for n, p in trained.items() if p.requires_grad}
        groups = part_groups(denoiser, trained, h.learning_rate, self.adapter)
        configs = self.text_encoder_adapters()
        new_rows = []
        for name, encoder in self.text_encoders().items():
            embedding = encoder.get_input_embeddings()
            rows = [embedding.new] if isinstance(embedding, ExtendedEmbedding) else []
            new_rows += rows
            # Adapters, or every weight under full fine-tuning; pivotal rows have their group.
            params = {
                n: p
                for n, p in encoder.named_parameters()
                if p.requires_grad and all(p is not r for r in rows)
            }
            groups += part_groups(name, params, lrs.get(name, te_lr), configs.get(name))
        if new_rows:  # pivotal tokens of every encoder: one rate, one stop step
            lr = self.pivotal_tuning.learning_rate
            groups.append({"name": "embeddings", "params": new_rows, "lr": lr, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        h = self.hparams
        groups = self.param_groups()
        optimizer = build_optimizer(self.optimizer, groups, self._cpu_offload())
        # The total that schedules are a function of, kept for the resume check.
        total = self._planned_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        lambdas = []
        for group in groups:
            stop = None
            if group["name"] == "embeddings":
                stop = round(self.pivotal_tuning.train_fraction * total)
            lambdas.append(lr_lambda(h.lr_scheduler, h.lr_warmup_steps, total, stop, h.lr_power))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _cpu_offload(self) -> bool:
        """Whether DeepSpeed keeps the optimizer states on the CPU."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        config = getattr(strategy, "config", None) or {}
        return bool(config.get("zero_optimization", {}).get("offload_optimizer"))

    # -- checkpoints: adapters, optimizer, schedule, loops and RNG --------------------------
    def state_dict(self, *args, **kwargs):
        """Only trainable tensors.

        The signature stays open because DeepSpeed and FSDP pass ``destination``/``prefix``;
        when a parent passes its ``destination`` it reads that dict, not the return value, so
        the frozen entries are removed from it in place.
        """
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in full if k.startswith(prefix) and k not in keep]:
            del full[key]
        return full

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every rank's RNG states, so a resumed run draws the noise an uninterrupted one would.

        Lightning calls this on every rank, which the gather needs.
        """
        checkpoint["rng_states"] = gather_rng_states(self.trainer.strategy)
        if self._planned_steps is not None:
            checkpoint["total_optimizer_steps"] = self._planned_steps

    def on_fit_start(self) -> None:
        # seed_everything gives every rank the same seed, hence the same noise and timesteps;
        # offset it by rank (deterministically: a resume restores each rank's own state).
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_train_start(self) -> None:
        schedule_changed_warning(
            self._saved_total_steps, self._planned_steps, self.hparams.lr_scheduler
        )
        self._saved_total_steps = None
        # After the sanity check, whose draws an uninterrupted run never made.
        if self._rng_states_to_restore is not None:
            restore_rng_states(self._rng_states_to_restore, self.trainer.global_rank)
            self._rng_states_to_restore = None
        if self.trainer.ckpt_path:
            apply_configured_learning_rates(self)

    @classmethod
    def load_from_checkpoint(cls, *args, **kwargs):
        """Lightning's loader, without its warning that the frozen base is not in the file."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found keys that are in the model state")
            return super().load_from_checkpoint(*args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Non-strict loading must still fail when an adapter weight is missing."""
        self.configure_model()
        check_resumable(checkpoint, self)
        saved = checkpoint["state_dict"].keys()
        missing = [n for n, p in self.named_parameters() if p.requires_grad and n not in saved]
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trainable tensors of this model, e.g. "
                f"{missing[:3]}: it was made with another adapter configuration"
            )
        self._rng_states_to_restore = checkpoint.get("rng_states")
        reopen_last_epoch(checkpoint)  # "train N steps, then extend" resumes exactly
        self._saved_total_steps = checkpoint.get("total_optimizer_steps")
