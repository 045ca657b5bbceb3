"""The training loop: only the aligner learns; what it learns against is the run's objective.

The loop knows nothing of what it optimises: it builds the frozen models (:class:`FrozenModels`),
takes an :class:`~thinkdiff.training.objective.Objective` class (by default the one
``config.objective`` names) and asks it for each micro-batch's loss.

Runs unchanged on CPU, one GPU, several GPUs (DDP) and several nodes: ``accelerate launch`` or
``torchrun`` start the processes, accelerate wraps only the aligner, and every rank reads its own
slice of the data. One optimiser step = ``accumulation`` micro-batches per process, so the global
batch is reached on fewer GPUs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from thinkdiff.models.aligner import Aligner
from thinkdiff.models.bundle import ThinkDiffInfo, save_model
from thinkdiff.models.proxy_decoder import ProxyT5Decoder
from thinkdiff.training.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    init_aligner_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from thinkdiff.training.config import TrainConfig
from thinkdiff.training.data import StepData, build_step_data, feature_width
from thinkdiff.training.objective import FrozenModels, Objective
from thinkdiff.training.objectives import OBJECTIVES
from thinkdiff.training.resume import agree_on_checkpoint, config_changes, record_config_changes
from thinkdiff.training.schedule import build_optimizer, lr_at, set_lr
from thinkdiff.utils import atomic_write_text, remove_debris

logger = logging.getLogger(__name__)


RUN_RECORDS = ("config.json", "metrics.jsonl", "samples.jsonl", "tensorboard", "changes.jsonl")
"""What a run writes in its folder besides checkpoints and the exported model."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    output_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    model_dir: Path | None = None


class Trainer:
    """Builds the models and data for a config and runs the loop (see :meth:`fit`).

    ``objective``: the :class:`~thinkdiff.training.objective.Objective` class to build; ``None``:
    the one ``config.objective`` names.
    """

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Accelerator | None = None,
        objective: type[Objective] | None = None,
    ) -> None:
        if accelerator is None:
            mixed = config.mixed_precision
            if mixed == "auto":
                mixed = "bf16" if torch.cuda.is_available() else "no"
            # cpu=True is what makes accelerate start gloo DDP under torchrun on a machine without GPUs.
            accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        self.accelerator = accelerator
        config.validate(accelerator.num_processes)
        self.config = config
        self.output_dir = Path(config.output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"output_dir {self.output_dir} is an existing file, not a run folder")
        self.accumulation = config.accumulation_steps(accelerator.num_processes)
        self.micro_batch = config.global_batch_size // accelerator.num_processes // self.accumulation
        set_seed(config.seed, device_specific=False)

        device = accelerator.device
        frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.proxy = ProxyT5Decoder.from_pretrained(
            config.proxy_t5,
            with_encoder=config.variant == "clip",
            dropout=config.proxy_dropout,
            dtype=frozen_dtype,
            device=device,
        )
        if config.activation_checkpointing:
            self.proxy.enable_activation_checkpointing()
        self.vision = None
        if config.variant == "clip":
            from thinkdiff.models.clip_vision import CLIPVisionFeatures

            self.vision = CLIPVisionFeatures.from_pretrained(
                config.vision_model, dtype=frozen_dtype, device=device
            )
        self.in_dim = self.vision.hidden_size if self.vision is not None else feature_width(config)
        # The images are resized to the vision tower's own input side (224 for EVA ViT-g).
        self.image_size = self.vision.image_size if self.vision is not None else 224

        aligner = Aligner(
            self.in_dim, self.proxy.d_model, hidden_dim=config.aligner_hidden_dim, norm=config.aligner_norm
        )
        if config.aligner_norm == "t5":
            aligner.init_norm_from_t5(self.proxy)
        if config.init_aligner is not None:
            init_aligner_weights(aligner, config.init_aligner)
        frozen = FrozenModels(self.proxy, self.vision, device, frozen_dtype)
        self.objective = (objective or OBJECTIVES[config.objective]).build(config, frozen)
        optimizer = build_optimizer(aligner, config)
        self.aligner, self.optimizer = accelerator.prepare(aligner, optimizer)
        self.data: StepData = build_step_data(
            config,
            self.proxy.tokenizer,
            accelerator.process_index,
            accelerator.num_processes,
            self.micro_batch,
            self.accumulation,
            image_size=self.image_size,
        )
        self.val_data: StepData | None = None
        if config.val_data:
            self.val_data = build_step_data(
                config,
                self.proxy.tokenizer,
                accelerator.process_index,
                accelerator.num_processes,
                self.micro_batch,
                1,
                validation=True,
                image_size=self.image_size,
            )
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_bad = 0
        self.last_val_loss: float | None = None

    # ------------------------------------------------------------------ pieces
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrapped_aligner(self) -> Aligner:
        return self.accelerator.unwrap_model(self.aligner)

    def loss_of(self, batch: Any) -> torch.Tensor:
        return self.objective.loss(self.aligner, batch.to(self.accelerator.device), self.step)

    def decode(self, batch: Any, n: int) -> list[dict[str, str]]:
        self.proxy.eval()  # no dropout in the decoded samples
        batch = batch.to(self.accelerator.device)
        with self.accelerator.autocast():
            return self.objective.decode(self.unwrapped_aligner(), batch, n)

    def train_step(self, micro_batches: list[Any]) -> tuple[float, float, bool]:
        """One optimiser step over this rank's micro-batches: (mean loss, grad norm, applied)."""
        self.aligner.train()
        # The frozen proxy follows too: HF recomputes activations (activation_checkpointing) and
        # applies dropout (proxy_dropout) only in training mode.
        self.proxy.train()
        losses = []
        for i, batch in enumerate(micro_batches):
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = i == len(micro_batches) - 1
            context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.aligner)
            with context, self.accelerator.autocast():
                loss = self.loss_of(batch)
                self.accelerator.backward(loss / len(micro_batches))
            losses.append(loss.detach().float())
        mean_loss = torch.stack(losses).mean()
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(self.aligner.parameters(), max_norm)
        # Every rank must agree on skipping, or DDP would diverge.
        finite = torch.isfinite(mean_loss) & torch.isfinite(
            torch.as_tensor(grad_norm, device=mean_loss.device)
        )
        finite = bool(
            self.accelerator.reduce(finite.float().reshape(1), reduction="sum").item()
            == self.accelerator.num_processes
        )
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(mean_loss), float(grad_norm), finite

    @torch.no_grad()
    def validate(self) -> float:
        assert self.val_data is not None
        self.aligner.eval()
        self.proxy.eval()
        self.val_data.load_state_dict({})  # the same held-out batches every time
        losses = []
        for _ in range(self.config.val_batches):
            batches = self.val_data.next_step()
            with self.accelerator.autocast():
                losses.append(self.loss_of(batches[0]).float())
        mean = torch.stack(losses).mean().reshape(1)
        return float(self.accelerator.reduce(mean, reduction="mean").item())

    # -------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "data": self.data.state_dict(),
            "world_size": self.accelerator.num_processes,
            "config": self.config.to_dict(),
        }

    def save(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_checkpoint(
                self.output_dir,
                self.step,
                self.unwrapped_aligner(),
                self.trainer_state(),
                self.config.keep_last,
            )
        self.accelerator.wait_for_everyone()

    def resume(
        self, checkpoint: str | Path | None = "auto", allow_change: tuple[str, ...] = ()
    ) -> bool:
        """Continue from ``checkpoint`` (a folder) or, with ``"auto"``, the run's newest good one.

        Every rank continues from the checkpoint rank 0 chose (see
        :func:`thinkdiff.training.resume.agree_on_checkpoint`); config fields that change the
        result must match the checkpoint's unless named in ``allow_change``.
        """
        if checkpoint in (None, "never"):
            return False
        chosen = agree_on_checkpoint(self.accelerator, self.output_dir, checkpoint, self.unwrapped_aligner())
        if chosen is None:
            return False
        state = chosen.trainer_state
        if state["world_size"] != self.accelerator.num_processes:
            raise ValueError(
                f"checkpoint {chosen.folder} was written by {state['world_size']} processes; resume with the same "
                f"number (this run has {self.accelerator.num_processes}) so every rank continues its own data"
            )
        changes = config_changes(state["config"], self.config, allow_change, chosen.folder)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.data.load_state_dict(state["data"])
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"trainer state of {chosen.folder} does not fit this run: {exc!r}") from exc
        self.unwrapped_aligner().load_state_dict(chosen.aligner_state, strict=True)
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        if self.is_main:
            record_config_changes(self.output_dir, changes, chosen)
        logger.info("resumed from %s at step %d", chosen.folder, self.step)
        return True

    def _resumed_elsewhere(self, resume: str | Path | None) -> bool:
        """Whether the run resumed from a checkpoint folder outside its own run folder."""
        if resume in (None, "never", "auto") or self.step == 0:
            return False
        return Path(resume).resolve().parent.parent != self.output_dir.resolve()

    # ---------------------------------------------------------------- the loop
    def fit(
        self,
        resume: str | Path | None = "auto",
        stop_after: int | None = None,
        allow_change: tuple[str, ...] = (),
        progress: bool = True,
    ) -> TrainResult:
        """Train to ``max_steps`` (or until ``stop_after`` steps, to simulate an interruption).

        ``allow_change``: config fields that may differ from the resumed checkpoint's. A run that
        fails before its first step (bad data caught on the first read, a refused checkpoint)
        leaves the run folder as it found it: the records it had begun are removed again.
        """
        config = self.config
        fresh = not self.output_dir.exists()
        begun = [name for name in RUN_RECORDS if not (self.output_dir / name).exists()]
        if self.is_main:  # only rank 0 writes in the run folder
            for folder in (self.output_dir, self.output_dir / "checkpoints"):
                removed = remove_debris(folder)
                if removed:
                    logger.info("%s: removed temporary files of a killed run: %s", folder, ", ".join(removed))
        first_step: int | None = None
        log: RunLog | None = None
        try:
            self.resume(resume, allow_change)
            first_step = self.step
            if self.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                config.save(self.output_dir / "config.json")
            if self._resumed_elsewhere(resume):
                # Continuing another run's checkpoint: this folder gets its own copy first, so that
                # it is a whole run (an auto resume of it continues from here, not from step 0).
                self.save()
            log = RunLog(self.output_dir, enabled=self.is_main, start_step=self.step)
            losses = self._loop(log, stop_after, progress)
        except BaseException:
            if log is not None:
                log.close()
            if self.is_main and (first_step is None or self.step == first_step):
                _remove_begun_records(self.output_dir, fresh, begun)
            raise
        result = TrainResult(self.output_dir, self.step, losses, self.skipped_steps)
        if self.step >= config.max_steps:
            tail = [x for x in losses[-config.log_every :] if math.isfinite(x)]
            result.model_dir = self.export(final_loss=sum(tail) / len(tail) if tail else None)
            if self.is_main:
                log.plot(self.output_dir / "loss.png")
        log.close()
        return result

    def _loop(self, log: RunLog, stop_after: int | None, show_progress: bool) -> list[float]:
        """The optimiser steps from ``self.step`` to ``max_steps`` (or ``stop_after``); their losses."""
        config = self.config
        progress = _progress(self.is_main and show_progress, config.max_steps, self.step)
        losses: list[float] = []
        samples_per_step = config.global_batch_size
        window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
        while self.step < config.max_steps and (stop_after is None or self.step < stop_after):
            set_lr(self.optimizer, lr_at(self.step, config))
            wait_start = time.perf_counter()
            micro_batches = self.data.next_step()
            window_wait += time.perf_counter() - wait_start
            loss, grad_norm, applied = self.train_step(micro_batches)
            self.step += 1
            window_steps += 1
            losses.append(loss)
            if applied:
                self.consecutive_bad = 0
            else:
                self.skipped_steps += 1
                self.consecutive_bad += 1
                logger.warning(
                    "step %d: non-finite loss or gradient (loss=%s, grad norm=%s); step skipped",
                    self.step,
                    loss,
                    grad_norm,
                )
                if self.consecutive_bad >= config.max_bad_steps:
                    last = checkpoint_dirs(self.output_dir)
                    raise TrainingError(
                        f"{self.consecutive_bad} non-finite steps in a row at step {self.step}; stopping. "
                        f"Last good checkpoint: {last[-1] if last else 'none'}"
                    )
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                mean_loss = float(
                    self.accelerator.reduce(
                        torch.tensor([loss], device=self.accelerator.device), reduction="mean"
                    ).item()
                )
                padding = sum(
                    b.padding_fraction() for b in micro_batches if hasattr(b, "padding_fraction")
                ) / len(micro_batches)
                log.scalars(
                    self.step,
                    loss=mean_loss,
                    lr=lr_at(self.step - 1, config),
                    grad_norm=grad_norm,
                    samples_per_s=samples_per_step * window_steps / max(elapsed, 1e-9),
                    data_wait_fraction=window_wait / max(elapsed, 1e-9),
                    padding_fraction=padding,
                    skipped_steps=self.skipped_steps,
                )
                progress.set_postfix(
                    loss=f"{mean_loss:.4f}",
                    lr=f"{lr_at(self.step - 1, config):.2e}",
                    sps=f"{samples_per_step * window_steps / max(elapsed, 1e-9):.1f}",
                )
                window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
            progress.update(1)
            if self.val_data is not None and config.val_every and self.step % config.val_every == 0:
                self.last_val_loss = round(self.validate(), 6)
                log.scalars(self.step, val_loss=self.last_val_loss)
            if (
                self.val_data is not None
                and config.decode_every
                and self.step % config.decode_every == 0
                and self.is_main
            ):
                self.val_data.load_state_dict({})
                batches = self.val_data.next_step()
                log.samples(self.step, self.decode(batches[0], config.decode_samples))
            if self.step % config.save_every == 0 or self.step == config.max_steps:
                self.save()
        progress.close()
        return losses

    def export(self, final_loss: float | None = None) -> Path:
        """Write the finished aligner as a model folder that ``thinkdiff generate`` loads.

        ``final_loss`` (this rank's mean training loss over the last logging window) and the
        last validation loss go into ``thinkdiff.json`` and so into the model card.
        """
        target = self.output_dir / "model"
        self.accelerator.wait_for_everyone()
        if self.is_main:
            config = self.config
            info = ThinkDiffInfo(
                variant=config.variant,
                source_model=config.lvlm if config.variant == "lvlm" else config.vision_model,
                proxy_t5=config.proxy_t5,
                diffusion_decoder=config.diffusion_decoder,
                in_dim=self.in_dim,
                out_dim=self.proxy.d_model,
                features=config.features,
                extra={
                    "steps": self.step,
                    "global_batch_size": config.global_batch_size,
                    "aligner_norm": config.aligner_norm,
                    "split": config.split,
                    **self.objective.record(),
                    "init_aligner": config.init_aligner,
                    "lr": config.lr,
                    "data": list(config.data),
                    "final_train_loss": None if final_loss is None else round(final_loss, 6),
                    "final_val_loss": self.last_val_loss,
                },
            )
            save_model(target, self.unwrapped_aligner(), info)
        self.accelerator.wait_for_everyone()
        return target


def train(
    config: TrainConfig,
    resume: str | Path | None = "auto",
    stop_after: int | None = None,
    allow_change: tuple[str, ...] = (),
    progress: bool = True,
) -> TrainResult:
    """Build a :class:`Trainer` for ``config`` and run it (``progress``: a step bar on the main
    rank); the process group is closed at the end."""
    trainer = Trainer(config)
    try:
        return trainer.fit(resume=resume, stop_after=stop_after, allow_change=allow_change, progress=progress)
    finally:
        trainer.accelerator.end_training()


# ---------------------------------------------------------------------------- logging
class RunLog:
    """Metrics to ``metrics.jsonl`` and TensorBoard, decoded samples to ``samples.jsonl`` (main rank only)."""

    def __init__(self, output_dir: Path, enabled: bool, start_step: int) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        # After a resume, drop lines logged after the checkpoint so the record has no duplicate steps.
        if self.metrics_path.is_file():
            kept = [line for line in _metric_lines(self.metrics_path) if json.loads(line)["step"] <= start_step]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is a core dependency, but a trimmed install still trains
            logger.warning("tensorboard is not installed; scalars go to metrics.jsonl only")

    def scalars(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(
                    f"train/{name}" if not name.startswith("val") else f"val/{name}", value, step
                )

    def samples(self, step: int, rows: list[dict[str, str]]) -> None:
        if not self.enabled:
            return
        with (self.output_dir / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        for row in rows:
            logger.info("step %d  target: %r\n%s decoded: %r", step, row["target"], " " * 8, row["decoded"])
        if self.writer is not None:
            text = "\n\n".join(f"**target** {r['target']}  \n**decoded** {r['decoded']}" for r in rows)
            self.writer.add_text("val/decoded", text, step)

    def plot(self, path: Path) -> None:
        """A loss-curve PNG of everything logged so far; none when nothing was (a finished
        checkpoint resumed into a new run folder exports its model without a step)."""
        from thinkdiff.plotting import plot_curves

        if not self.metrics_path.is_file():
            return
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        curves = {
            label: [(r["step"], r[key]) for r in rows if key in r]
            for key, label in (("loss", "train"), ("val_loss", "validation"))
        }
        plot_curves(curves, path, xlabel="step", ylabel="proxy T5 cross-entropy")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _remove_begun_records(output_dir: Path, fresh: bool, begun: list[str]) -> None:
    """Undo what a run that never stepped wrote: the whole folder when it made it, else the records
    it began (``begun``: those that did not exist before it)."""
    if fresh:
        shutil.rmtree(output_dir, ignore_errors=True)
        return
    for name in begun:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _metric_lines(path: Path) -> list[str]:
    """The good lines of a ``metrics.jsonl``; a line cut off by a kill (or otherwise unreadable) is
    dropped with a warning naming it, so one broken line cannot block every resume."""
    good = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer step")
        except ValueError as exc:
            logger.warning("%s line %d is cut off or unreadable (%s); dropping it", path, number, exc)
            continue
        good.append(line)
    return good


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True
    )
