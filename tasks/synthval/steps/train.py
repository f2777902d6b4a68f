"""`run_train`: the wiring of `synthval train` and `synthval finetune`.

    data URIs -> indexes and label space -> schedule (effective batch, steps) -> [lock the checkpoint
    folder] -> model (fresh, from an init checkpoint with its head mapped by label name, or resumed)
    -> per-step loop (engine) -> per epoch: validation loss and mAP, the last and the best checkpoint
    -> the final checkpoint's URI

Nothing is written before the inputs are checked: config numbers, data, the init checkpoint and the
ImageNet weights fail first (exit 2), then the checkpoint folder is locked, and only then do TensorBoard
events and checkpoints appear.

A retried pod runs the same command again: `resume="auto"` continues from the newest checkpoint in the
folder, and the run ends exactly as one that was never interrupted would, weights and optimizer state
bit for bit on the same hardware. That holds because every random draw is either restored or a pure
function of the seed: the checkpoint holds model, optimizer, scheduler, scaler, the position in the
epoch and each process's random state (per rank); the epoch's batch order is a function of (seed,
epoch); the augmentation of an image is a function of (seed, epoch, image); the DataLoader draws its
worker seeds from its own generator seeded by (seed, rank, epoch), never from torch's global one; and
validation runs its losses under a forked, seeded generator.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from synthval import __version__
from synthval.config import TrainConfig, accumulation_steps, to_dict
from synthval.detection import distributed, randomness
from synthval.detection.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointDirLock,
    CheckpointDirLockedError,
    checkpoint_uri,
    describe,
    is_synthval_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_config_from,
    model_state_of,
    prune_checkpoints,
    remove_partial_checkpoints,
    save_checkpoint,
)
from synthval.detection.engine import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    predict,
    train_one_epoch,
    unwrap,
    validation_loss,
)
from synthval.detection.model import (
    ARCHITECTURE_FIELDS,
    backbone_weights_uri,
    build_model,
    init_from_checkpoint,
    load_model_state,
    num_classes_in_state,
)
from synthval.errors import CheckpointError, ConfigError, DatasetError
from synthval.io import storage
from synthval.io.sources import local_dataset
from synthval.render.tensorboard import add_scalars, open_summary_writer

log = logging.getLogger(__name__)

BEST_NAME = "best.pt"
VAL_SAMPLE_IMAGES = 2  # worst and best validation images drawn per epoch in TensorBoard
VAL_METRIC_KEYS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "mAR1", "mAR10", "mAR100")
# Purposes of the random streams derived from the run's seed, so no two share draws.
_STREAM_PROCESS, _STREAM_LOADER, _STREAM_VALIDATION = 0, 1, 2


def run_train(
    config: TrainConfig,
    train_data_uri: str,
    val_data_uri: str | None,
    init_checkpoint_uri: str | None,
    checkpoint_dir_uri: str,
    tb_log_dir_uri: str,
    resume: str = "auto",
    dataset_format: str = "auto",
    bbox_definition_id: str | None = None,
    skip_broken: bool = False,
) -> dict:
    """Train (or fine-tune, with `init_checkpoint_uri`) and return the small XCom result.

    Result: {"checkpoint_uri": final checkpoint, "checkpoint_dir", "tb_log_dir", "epochs": epochs
    completed, "steps": optimizer steps in all, "images_per_second": training rate of this process
    group in this run, "num_train_images": images of the training split and budget; with validation
    data also "val_metrics": {"loss", "mAP", "mAP50"} of the last validation, "best_checkpoint_uri" and
    "best_val_metrics": {"mAP", "step"} of the checkpoint with the best validation mAP}.
    """
    device = distributed.resolve_device(config.device)
    distributed.init_distributed(device)
    try:
        return _Run(config, device).run(
            train_data_uri, val_data_uri, init_checkpoint_uri, checkpoint_dir_uri, tb_log_dir_uri, resume,
            dataset_format, bbox_definition_id, skip_broken,
        )
    finally:
        distributed.cleanup_distributed()


def _resolve_resume(resume: str, checkpoint_dir_uri: str) -> tuple[dict | None, str | None]:
    """Return (checkpoint state, its URI) to resume from, or (None, None)."""
    if resume == "none":
        return None, None
    if resume != "auto":
        return load_checkpoint(resume), resume
    for step, uri in reversed(list_checkpoints(checkpoint_dir_uri)):
        try:
            return load_checkpoint(uri), uri
        except CheckpointError as exc:  # an unreadable newest file must not block a retried pod
            log.warning("skipping unreadable checkpoint %s (%s)", uri, exc)
    return None, None


@dataclasses.dataclass
class _Plan:
    """How the run's images turn into optimizer steps."""

    accum: int  # batches per process per optimizer step
    world: int
    steps_per_epoch: int
    total_steps: int

    @property
    def batches_per_step(self) -> int:
        return self.accum * self.world


class _Run:
    """One training run's state; `run` is the whole flow."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.main = distributed.is_main_process()
        self.rank = distributed.rank()

    # -- inputs, all checked before anything is written ----------------------------------------------

    def _load_data(self, train_uri: str, val_uri: str | None, fmt: str, bbox_id: str | None, skip: bool):
        from synthval.data import LabelSpace, default_split, load_dataset, match_labels

        data = self.config.data
        train_path = local_dataset(train_uri)
        data = dataclasses.replace(data, split=default_split(train_path, fmt, data.split, own="train"))
        train_index = load_dataset(train_path, format=fmt, split=data.split, seed=self.config.seed,
                                   max_images=data.max_images, bbox_definition_id=bbox_id, skip_broken=skip)
        if train_index.num_boxes == 0:
            raise DatasetError(f"{train_uri}: split {data.split!r} holds no boxes to train on")
        space = LabelSpace.from_index(train_index)
        if self.main:
            log.info("training data %s: %d images, %d boxes, %d labels (split %r)", train_uri, len(train_index),
                     train_index.num_boxes, len(space.names), data.split)
        val_index = None
        if val_uri:
            val_path = local_dataset(val_uri)
            data = dataclasses.replace(data, val_split=default_split(val_path, fmt, data.val_split, own="val"))
            val_index = load_dataset(val_path, format=fmt, split=data.val_split,
                                     seed=self.config.seed, bbox_definition_id=bbox_id, skip_broken=skip)
            if val_path == train_path and data.val_split == data.split:
                raise ConfigError(f"data.val_split: {data.val_split!r} is the training split of {train_uri} too; "
                                  "validate on images the run does not train on (for example seed-train / "
                                  "seed-val, or train / val)")
            match = match_labels(space, val_index)
            if not match.shared:
                raise DatasetError(f"{val_uri}: no label of the validation data is a label of the training data. "
                                   + match.describe())
            if self.main:
                log.info("validation data %s: %d images (split %r). %s", val_uri, len(val_index), data.val_split,
                         match.describe())
        self.config = dataclasses.replace(self.config, data=data)  # checkpoints record the splits used
        return train_index, val_index, space

    def _plan(self, sampler: Any, num_images: int) -> _Plan:
        config, world = self.config, distributed.world_size()
        accum = accumulation_steps(config, world)
        steps_per_epoch = len(sampler) // (world * accum)
        if steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size={config.data.batch_size} x {accum} accumulation x {world} processes needs more "
                f"than the {num_images} training images for one step")
        total_steps = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        lr_factor(config, steps_per_epoch, total_steps)  # warns once if the warm-up must be fitted
        return _Plan(accum, world, steps_per_epoch, total_steps)

    def _init_state(self, init_uri: str | None, fresh_start: bool) -> dict | None:
        """The init checkpoint (read now, so a bad one fails before anything is written)."""
        if init_uri is None:
            if fresh_start and self.config.model.weights_backbone:
                backbone_weights_uri(self.config.model)  # a missing ImageNet file fails here, naming it
            return None
        return load_checkpoint(init_uri)

    # -- model --------------------------------------------------------------------------------------

    def _architecture_from(self, model_config: dict, uri: str) -> None:
        """Make the model config's architecture fields those of the checkpoint's model."""
        stored = model_config_from(model_config, uri)
        changes = {f: getattr(stored, f) for f in ARCHITECTURE_FIELDS
                   if getattr(stored, f) != getattr(self.config.model, f)}
        if changes:
            log.warning("%s holds a %s model; taking its architecture (%s) over the config's", uri, stored.name,
                        ", ".join(f"{k}={v}" for k, v in changes.items()))
            self.config.model = dataclasses.replace(self.config.model, **changes)

    def _resumed_model(self, space: Any, resumed: dict, resumed_uri: str) -> nn.Module:
        if not is_synthval_checkpoint(resumed):
            raise CheckpointError(f"{resumed_uri}: not a synthval training checkpoint, so there is no run to "
                                  "resume; start from its weights with --init-checkpoint instead")
        names = resumed.get("label_names")
        if list(names or []) != list(space.names):
            raise CheckpointError(
                f"{resumed_uri}: the checkpoint was trained on other labels ({len(names or [])} labels) than "
                f"this run's training data ({len(space.names)}); use another --checkpoint-dir or --resume none")
        self._architecture_from(resumed["config"]["model"], resumed_uri)
        model = build_model(self.config.model, space.num_classes, load_backbone_weights=False)
        load_model_state(model, model_state_of(resumed, resumed_uri), resumed_uri)
        return model

    def _initial_model(self, space: Any, train_index: Any, init_state: dict | None, init_uri: str | None
                       ) -> nn.Module:
        if init_state is None:
            return build_model(self.config.model, space.num_classes)
        info = describe(init_state, init_uri)
        self._architecture_from(info["model_config"], init_uri)
        model = build_model(self.config.model, space.num_classes, load_backbone_weights=False)
        weights = model_state_of(init_state, init_uri)
        old_names: Sequence[str | None] | None = info["label_names"]
        if old_names is None:
            # A seed checkpoint: its class k is the dataset label id k (GroceriesReal's convention).
            old_names = [train_index.label_names.get(k) for k in range(1, num_classes_in_state(weights))]
            log.info("%s carries no label names: taking its class k as label id k of the training data", init_uri)
        mapping = init_from_checkpoint(model, weights, old_names, space.names, init_uri)
        if self.main:
            log.info("fine-tuning from %s: %s", init_uri, mapping.describe())
        return model

    def _loader(self, index: Any, class_ids: dict, train: bool, batch_sampler: Any = None, epoch: int = 0) -> Any:
        from synthval.data import DetectionDataset, collate_detection

        data = self.config.data
        dataset = DetectionDataset(index, class_ids, train=train, hflip_prob=data.hflip_prob if train else 0.0,
                                   photometric=data.photometric and train, seed=self.config.seed)
        dataset.set_epoch(epoch)
        # Worker seeds come from this generator, never from torch's global one, whose state is the model's.
        seed = randomness.stream_seed(self.config.seed, _STREAM_LOADER, self.rank, epoch)
        generator = torch.Generator().manual_seed(seed)
        common = {"collate_fn": collate_detection, "num_workers": data.num_workers, "generator": generator,
                  "pin_memory": self.device.type == "cuda", "persistent_workers": False}
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **common)
        return torch.utils.data.DataLoader(dataset, batch_size=data.batch_size, shuffle=False, **common)

    # -- the run ------------------------------------------------------------------------------------

    def run(self, train_uri, val_uri, init_uri, checkpoint_dir_uri, tb_uri, resume, fmt, bbox_id, skip) -> dict:
        if not resume:
            raise ConfigError("--resume: expected auto, none or a checkpoint URI")
        randomness.seed_process(randomness.stream_seed(self.config.seed, _STREAM_PROCESS, self.rank))
        train_index, val_index, space = self._load_data(train_uri, val_uri, fmt, bbox_id, skip)

        from synthval.data import build_batch_sampler

        config = self.config
        sampler = build_batch_sampler(train_index, config.data.batch_size, config.data.aspect_ratio_group_factor,
                                      seed=config.seed, shuffle=True)
        plan = self._plan(sampler, len(train_index))
        fresh_start = resume == "none" or (resume == "auto" and not list_checkpoints(checkpoint_dir_uri))
        init_state = self._init_state(init_uri, fresh_start)

        lock = CheckpointDirLock(checkpoint_dir_uri)
        refused = None
        if self.main:
            try:
                lock.acquire()
            except CheckpointError as exc:
                refused = str(exc)
        refused = distributed.broadcast_object(refused)
        if refused is not None:
            raise CheckpointDirLockedError(refused)
        try:
            if self.main:
                remove_partial_checkpoints(checkpoint_dir_uri)
            distributed.barrier()
            resumed, resumed_uri = _resolve_resume(resume, checkpoint_dir_uri)
            if resumed is not None:
                model = self._resumed_model(space, resumed, resumed_uri)
            else:
                model = self._initial_model(space, train_index, init_state, init_uri)
            del init_state
            return self._train(model.to(self.device), sampler, plan, train_index, val_index, space,
                               checkpoint_dir_uri, tb_uri, resumed, resumed_uri)
        finally:
            lock.release()

    def _restore(self, resumed: dict, resumed_uri: str, plan: _Plan, optimizer: Any, scheduler: Any,
                 scaler: Any) -> None:
        stored_bps = resumed.get("batches_per_step")
        if stored_bps is not None and int(stored_bps) != plan.batches_per_step:
            raise CheckpointError(
                f"{resumed_uri}: trained with {stored_bps} batches of {self.config.data.batch_size} images per "
                f"optimizer step, this run takes {plan.batches_per_step} ({plan.world} processes x {plan.accum} "
                f"accumulation): resume with the same effective batch (data.effective_batch_size="
                f"{int(stored_bps) * self.config.data.batch_size}) or use another --checkpoint-dir")
        try:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if scaler is not None and resumed.get("scaler"):
                scaler.load_state_dict(resumed["scaler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{resumed_uri}: optimizer or scheduler state does not fit this config "
                                  f"({exc}); use --resume none or another --checkpoint-dir") from exc
        ranks = (resumed.get("rng") or {}).get("ranks") or []
        try:
            if len(ranks) != plan.world:
                raise ValueError(f"it holds {len(ranks)} process(es)' random states, this run has {plan.world}")
            randomness.restore_rng(ranks[self.rank])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            # Continue deterministically, though not as the uninterrupted run would have.
            log.warning("%s: cannot restore this process's random state (%s); drawing a fresh one from the "
                        "seed and step", resumed_uri, exc)
            randomness.seed_process(
                randomness.stream_seed(self.config.seed, _STREAM_PROCESS, self.rank, int(resumed["step"])))

    def _train(self, model: nn.Module, sampler: Any, plan: _Plan, train_index: Any, val_index: Any, space: Any,
               checkpoint_dir_uri: str, tb_uri: str, resumed: dict | None, resumed_uri: str | None) -> dict:
        config = self.config
        class_ids = space.class_ids(train_index)
        steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer, steps_per_epoch, total_steps)
        amp_dtype = distributed.resolve_amp_dtype(config.amp, self.device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        epoch, epoch_step, step = 0, 0, 0
        last_metrics: dict[str, Any] = {}
        best: dict[str, Any] | None = None
        if resumed is not None:
            self._restore(resumed, resumed_uri, plan, optimizer, scheduler, scaler)
            epoch, epoch_step, step = int(resumed["epoch"]), int(resumed["epoch_step"]), int(resumed["step"])
            last_metrics = dict(resumed.get("metrics") or {})
            best = resumed.get("best")
            if epoch_step >= steps_per_epoch:
                epoch, epoch_step = epoch + 1, 0
            if self.main:
                log.info("resuming from %s: epoch %d, step %d of %d", resumed_uri, epoch, step, total_steps)

        if distributed.is_distributed():
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        if self.main:
            effective = config.data.batch_size * plan.batches_per_step
            log.info("training %s on %s: %d classes, %d steps (%d per epoch, %d epochs%s), %d images per step "
                     "(batch %d x %d accumulation x %d processes), %s lr %g, amp %s", config.model.name,
                     self.device, len(space.names), total_steps, steps_per_epoch, config.epochs,
                     f", capped by max_steps={config.max_steps}" if config.max_steps is not None else "",
                     effective, config.data.batch_size, plan.accum, plan.world, config.optimizer.name,
                     config.optimizer.lr, amp_dtype or "off")
        writer = open_summary_writer(tb_uri)
        final_uri = resumed_uri if (resumed is not None and step >= total_steps) else None
        best_uri = storage.join_uri(checkpoint_dir_uri, BEST_NAME)
        images = seconds = 0.0

        def save(at_epoch: int, at_epoch_step: int, finished: bool, improved: bool = False) -> str:
            uri = checkpoint_uri(checkpoint_dir_uri, step)
            rng = distributed.all_gather_objects(randomness.rng_state())  # every process's own, in rank order
            if self.main:
                state = {
                    "format": FORMAT, "format_version": FORMAT_VERSION, "synthval_version": __version__,
                    "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "epoch": at_epoch, "epoch_step": at_epoch_step, "step": step, "total_steps": total_steps,
                    "finished": finished, "rng": {"ranks": rng}, "world_size": plan.world,
                    "grad_accum_steps": plan.accum, "batches_per_step": plan.batches_per_step,
                    "config": to_dict(config), "label_names": list(space.names), "metrics": last_metrics,
                    "best": best,
                }
                save_checkpoint(uri, state)
                if improved:
                    save_checkpoint(best_uri, state)
                prune_checkpoints(checkpoint_dir_uri, config.keep_checkpoints)
            distributed.barrier()
            return uri

        try:
            while step < total_steps:
                skip = epoch_step * plan.batches_per_step
                batches = randomness.EpochBatches(sampler, epoch, per_epoch=steps_per_epoch * plan.batches_per_step,
                                                  skip=skip)
                loader = self._loader(train_index, class_ids, True, batches, epoch=epoch)
                epoch_start_step = step

                def on_step(info: dict[str, Any]) -> None:
                    nonlocal step
                    step = info["global_step"]
                    if step % config.log_every_steps == 0 or step == total_steps:
                        add_scalars(writer, "train", {**info["losses"], "loss": info["loss"]}, step)
                        writer.add_scalar("train/lr", info["lr"], step)
                        writer.add_scalar("train/images_per_second", info["images_per_second"], step)
                    if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 \
                            and step < total_steps and step - epoch_start_step + epoch_step < steps_per_epoch:
                        save(epoch, epoch_step + step - epoch_start_step, finished=False)

                stats = train_one_epoch(
                    model, optimizer, scheduler, loader, self.device, epoch, scaler=scaler, amp_dtype=amp_dtype,
                    grad_accum_steps=plan.accum, max_steps=min(steps_per_epoch - epoch_step, total_steps - step),
                    log_every=config.log_every_steps, on_step=on_step, global_step=step, total_steps=total_steps,
                )
                images += stats["images"]
                seconds += stats["seconds"]
                epoch_step += stats["steps"]
                epoch_done = epoch_step >= steps_per_epoch
                finished = step >= total_steps
                add_scalars(writer, "epoch", {k: v for k, v in stats.items() if k.startswith("loss")}, epoch)
                improved = False
                if val_index is not None and (finished or (epoch_done and (epoch + 1) % config.val_every_epochs == 0)):
                    last_metrics = self._validate(model, val_index, space, amp_dtype, epoch, step, writer)
                    if last_metrics.get("mAP") is not None and (best is None or last_metrics["mAP"] > best["mAP"]):
                        best = {"step": step, "epoch": epoch, "mAP": last_metrics["mAP"]}
                        improved = True
                if epoch_done:
                    epoch, epoch_step = epoch + 1, 0
                final_uri = save(epoch, epoch_step, finished, improved)
                writer.flush()
        finally:
            writer.close()
        if final_uri is None:  # nothing left to train: the resumed checkpoint is the result
            final_uri = resumed_uri
        result = {
            "checkpoint_uri": final_uri, "checkpoint_dir": storage.absolute_uri(checkpoint_dir_uri),
            "tb_log_dir": storage.absolute_uri(tb_uri),
            "epochs": -(-step // steps_per_epoch), "steps": step,
            "images_per_second": round(images / seconds, 3) if seconds else 0.0,
            "num_train_images": len(train_index),  # the real budget, when the data are real
        }
        if last_metrics:
            result["val_metrics"] = {k: last_metrics.get(k) for k in ("loss", "mAP", "mAP50") if k in last_metrics}
        if best is not None:
            result["best_checkpoint_uri"] = storage.absolute_uri(best_uri)
            result["best_val_metrics"] = {"mAP": best["mAP"], "step": best["step"]}
        if self.main:
            log.info("training done: %d steps, final checkpoint %s%s", step, final_uri,
                     f", best {best_uri} (val mAP {best['mAP']:.4f} at step {best['step']})"
                     if best else "")
        return result

    def _validate(self, model: nn.Module, val_index: Any, space: Any, amp_dtype: Any, epoch: int, step: int,
                  writer: Any) -> dict[str, Any]:
        """Validation loss and COCO metrics: each process takes its share, the main process scores."""
        from synthval.scoring.coco_eval import CocoEvaluator

        rank, world = self.rank, distributed.world_size()
        shard = val_index.subset(list(range(rank, len(val_index), world)))
        val_ids = space.class_ids(val_index)
        losses = validation_loss(unwrap(model), self._loader(shard, val_ids, False), self.device, amp_dtype,
                                 seed=randomness.stream_seed(self.config.seed, _STREAM_VALIDATION, epoch))
        predictions = predict(unwrap(model), self._loader(shard, val_ids, False), self.device, amp_dtype)
        gathered = distributed.all_gather_objects(predictions)
        metrics: dict[str, Any] = {}
        if self.main:
            all_predictions = [p for part in gathered for p in part]
            evaluator = CocoEvaluator(val_index, val_ids, list(space.names))
            evaluator.process(all_predictions)
            result = evaluator.evaluate()
            metrics = {**losses, **{k: result.get(k) for k in VAL_METRIC_KEYS}}
            add_scalars(writer, "val", metrics, step)
            # The same pictures evaluation and the run report show (per-class AP, PR curves, worst/best).
            from synthval.render.tensorboard import tensorboard_images

            for tag, image in tensorboard_images(evaluator.matches, result, num_images=VAL_SAMPLE_IMAGES).items():
                writer.add_image("val/" + tag.split("/", 1)[1], image, step, dataformats="HWC")
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            log.info("validation after epoch %d (step %d): %s", epoch, step, shown)
        return distributed.broadcast_object(metrics)
