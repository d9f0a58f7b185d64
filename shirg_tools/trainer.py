"""`ShirgTrainer`: transformers' Trainer with a per-step token budget, per-group learning rates and run checks.

Per optimizer step s (0-based `state.global_step` when its micro-batches are fetched):
  - budget: `schedule.entry_at(s)`, the same for every micro-batch and every process; the collated,
    budget-independent batches get their input_ids / labels for it in `get_batch_samples`, before the Trainer
    counts the accumulated batch's targets (`num_items_in_batch`);
  - padding: micro-batch m gets LaViDa's random extra EOS positions drawn from (seed, s, m) (the batch builder's
    `extra_positions`; the same on every process, repeated by a resumed run);
  - randomness: micro-batch m of process r seeds the diffusion masks (the model's `generator`) and the global RNG
    (LoRA dropout) with `noise_seed(seed, s, m, r)`, so a resumed run repeats the uninterrupted one exactly;
  - loss: the model divides its summed loss by `num_items_in_batch` (all targets of the accumulated batch, over
    all processes), so the loss is already scaled for gradient accumulation (`loss_is_scaled_for_ga`);
    the budget head's cost term (when on) is a per-micro-batch mean, divided by the accumulation steps;
  - a NaN/inf loss raises FloatingPointError naming the step, micro-batch and budget; so does saving weights that
    hold NaN/inf (a checkpoint or the final model): nothing is saved over good weights;
  - checkpoints are written aside and renamed into place once complete, with the run record inside
    (shirg_tools.output_folder): `--resume_from_checkpoint last` only ever finds complete checkpoints, and a run
    killed during a save (SIGTERM, SIGKILL) leaves no partial one.
Logs add, per logging window: `budgets` (the budget of each step, in order), `loss_<budget>` (the mean step loss
of each budget used), `skipped_samples` (cumulative, all processes) and `budget_cost` (when on: the mean of
E_p[K] / max K over the head's images, per 'adaptive' step; the logged losses include its weighted term).
"""

import collections
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from peft import PeftModel
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .budget_schedule import ADAPTIVE
from .lora import parameter_groups
from .output_folder import FolderWriter, staging_root
from .run_record import write_run_record

SKIP_EXAMPLES = 5  # skipped samples listed by reason in the summary


def noise_seed(seed: int, step: int, micro_batch: int, process: int) -> int:
    """A 63-bit seed of (seed, optimizer step, micro-batch, process) from numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, step, micro_batch, process]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SkipCounter:
    """Samples a process skipped: counts per reason and the first SKIP_EXAMPLES (index, detail) of each."""

    def __init__(self):
        self.counts = collections.Counter()
        self.examples = collections.defaultdict(list)

    def add(self, records: list):
        for index, reason, detail in records:
            if not self.counts[reason]:
                print(f"[data] skipped sample {index} ({reason}: {detail}); further skips are counted and summarised "
                      "at the end", flush=True)
            self.counts[reason] += 1
            if len(self.examples[reason]) < SKIP_EXAMPLES:
                self.examples[reason].append((index, detail))

    def total(self) -> int:
        return sum(self.counts.values())


def merge_skip_counters(states: list) -> dict:
    """{"total", "by_reason": {reason: count}, "examples": {reason: [[index, detail], ...]}} over processes."""
    counts, examples = collections.Counter(), collections.defaultdict(list)
    for state in states:
        counts.update(state["counts"])
        for reason, items in state["examples"].items():
            examples[reason].extend(items[: SKIP_EXAMPLES - len(examples[reason])])
    return {"total": sum(counts.values()), "by_reason": dict(counts), "examples": dict(examples)}


class ShirgTrainer(Trainer):
    """See the module docstring. Extra arguments: schedule (BudgetSchedule), batch_builder (BatchBuilder),
    learning_rates (parameter group -> lr, see lora.parameter_group_name), budget_cost_weight (weight of the
    adaptive-budget head's cost E_p[K] / max K on steps that use the head), run_record (the run's configuration,
    written into every checkpoint; see shirg_tools.run_record)."""

    loss_is_scaled_for_ga = True  # the model normalises by num_items_in_batch (transformers >= 5.24 reads this)

    def __init__(self, *args, schedule, batch_builder, learning_rates: dict, run_record: dict,
                 budget_cost_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_record = run_record
        self._checkpoint_staging = None  # while a checkpoint is saved: the folder it is staged in
        # forward(num_items_in_batch=...) divides the summed loss by it; stated, not inferred from **kwargs
        self.model_accepts_loss_kwargs = True
        self.schedule = schedule
        self.batch_builder = batch_builder
        self.learning_rates = learning_rates
        self.budget_cost_weight = budget_cost_weight
        self.budget_history = []  # [step, budget label] of every step this process trained (this run)
        self.skips = SkipCounter()
        self._window_labels = []
        self._window_losses = torch.zeros(len(schedule.entries), dtype=torch.float64, device=self.args.device)
        self._window_steps = [0] * len(schedule.entries)
        self._window_cost = torch.zeros((), dtype=torch.float64, device=self.args.device)
        self._budget_logits = []
        base_model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        self._budget_values = None
        budget_head = base_model.model.token_selector.budget_head
        if budget_head is not None:  # its budgets are config.budget_choices (the model checks it)
            self._budget_values = torch.tensor(base_model.config.budget_choices, dtype=torch.float32)
            budget_head.register_forward_hook(
                lambda module, inputs, output: self._budget_logits.append(output))

    # ---- batches -------------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the step's micro-batches, building each one's input_ids and labels for the step's budget."""
        step = self.state.global_step
        index = self.schedule.index_at(step)
        entry = self.schedule.entries[index]

        def model_inputs(micro_batch, batch):
            self.skips.add(batch.pop("skipped"))
            inputs = self.batch_builder.build(batch, entry, self.batch_builder.extra_positions(step, micro_batch))
            seed = noise_seed(self.args.seed, step, micro_batch, self.args.process_index)
            inputs["shirg_step"] = {"step": step + 1, "micro_batch": micro_batch, "budget": entry.label,
                                    "budget_index": index, "noise_seed": seed}
            return inputs

        built = (model_inputs(micro_batch, batch) for micro_batch, batch in enumerate(epoch_iterator))
        batch_samples, num_items_in_batch = super().get_batch_samples(built, num_batches, device)
        if batch_samples:
            self.budget_history.append([step + 1, entry.label])
            self._window_labels.append(entry.label)
            self._window_steps[index] += 1
        return batch_samples, num_items_in_batch

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """Trainer's count of the accumulated batch's targets, without the FIM marker positions (labels equal to
        the config's fim_token_id: never predicted, see the model's diffusion_loss)."""
        fim = self.accelerator.unwrap_model(self.model).config.fim_token_id
        if fim is not None:
            batch_samples = [{**batch, "labels": batch["labels"].masked_fill(batch["labels"] == fim, -100)}
                             for batch in batch_samples]
        return super()._get_num_items_in_batch(batch_samples, device)

    # ---- loss ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's diffusion loss with this micro-batch's masks seeded, plus the budget head's weighted cost."""
        info = inputs.pop("shirg_step")
        torch.manual_seed(info["noise_seed"])  # LoRA dropout of this micro-batch
        generator = torch.Generator(device=inputs["input_ids"].device).manual_seed(info["noise_seed"])
        self._budget_logits.clear()
        result = super().compute_loss(model, {**inputs, "generator": generator}, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if self._budget_logits and self.budget_cost_weight > 0:
            logits = torch.cat(self._budget_logits).float()  # (images, len(budgets))
            values = self._budget_values.to(logits.device)
            cost = (logits.softmax(dim=-1) @ values).mean() / values.max() / self.current_gradient_accumulation_steps
            self._window_cost += cost.detach().double()
            loss = loss + self.budget_cost_weight * cost
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step; raises FloatingPointError on a NaN/inf loss; adds the loss to its budget's window."""
        info = inputs["shirg_step"]
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {info['step']} (micro-batch {info['micro_batch']}, "
                f"budget {info['budget']}): training stopped; lower the learning rate or check the data"
            )
        self._window_losses[info["budget_index"]] += loss.detach().double()
        return loss

    # ---- saving --------------------------------------------------------------------------------------------------

    def save_model(self, output_dir=None, _internal_call=False):
        """Trainer's save_model, refused (FloatingPointError naming the step) when a trained tensor holds NaN/inf."""
        trained = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if trained and not bool(torch.stack([torch.isfinite(p).all() for _, p in trained]).all()):
            bad = [name for name, p in trained if not bool(torch.isfinite(p).all())]
            raise FloatingPointError(
                f"after step {self.state.global_step} {len(bad)} trained tensor(s) hold NaN/inf (e.g. {bad[0]}): "
                "training stopped and nothing was saved; lower the learning rate or check the data")
        super().save_model(output_dir, _internal_call)

    def _get_output_dir(self, trial):
        """Trainer's run folder; while a checkpoint is saved, its staging folder (see `_save_checkpoint`)."""
        return str(self._checkpoint_staging) if self._checkpoint_staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint `checkpoint-N`, written (by every process) into `.checkpoint-N.staging/checkpoint-N`
        of the output folder, completed with the run record and renamed into place by the main process; then the
        older checkpoints beyond save_total_limit are deleted."""
        run_dir = super()._get_output_dir(trial)
        final = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        # the run holds the lock of its output folder (train.py), which covers its checkpoints
        writer = FolderWriter(final, "checkpoint", overwrite=True, lock=False) if self.args.should_save else None
        try:
            if writer is not None:
                writer.stage()
            self.accelerator.wait_for_everyone()
            self._checkpoint_staging = staging_root(final)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._checkpoint_staging = None
            self.accelerator.wait_for_everyone()
            if writer is not None:
                write_run_record(writer.staging, self.run_record)
                writer.commit()
                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        finally:
            if writer is not None:
                writer.release()
        self.accelerator.wait_for_everyone()

    # ---- optimizer -----------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """The Trainer's optimizer class over `lora.parameter_groups`: per group its own learning rate, weight
        decay on all but biases and norms."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = parameter_groups(opt_model, self.learning_rates, self.args.weight_decay,
                                      set(self.get_decay_parameter_names(opt_model)),
                                      full_training=not isinstance(opt_model, PeftModel))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            unsupported = sorted({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
            if unsupported:
                raise ValueError(f"--optim {self.args.optim} builds its own parameter groups ({unsupported}); "
                                 "train.py needs per-group learning rates: use adamw_torch or another plain optimizer")
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---- logging and summary -------------------------------------------------------------------------------------

    def log(self, logs, start_time=None):
        """Trainer's log, with the budget entries of the training-loss logs (see the module docstring)."""
        if "loss" in logs and self._window_labels:
            losses = self.accelerator.reduce(self._window_losses.clone(), reduction="mean").tolist()
            skipped = torch.tensor(float(self.skips.total()), device=self.args.device)
            logs["budgets"] = ",".join(self._window_labels)
            for entry, total, count in zip(self.schedule.entries, losses, self._window_steps):
                if count:
                    logs[f"loss_{entry.label}"] = total / count
            logs["skipped_samples"] = int(self.accelerator.reduce(skipped, reduction="sum").item())
            adaptive_steps = sum(count for entry, count in zip(self.schedule.entries, self._window_steps)
                                 if entry.label == ADAPTIVE)
            if self.budget_cost_weight > 0 and adaptive_steps:
                cost = self.accelerator.reduce(self._window_cost.clone(), reduction="mean").item()
                logs["budget_cost"] = cost / adaptive_steps
            self._window_labels = []
            self._window_losses.zero_()
            self._window_steps = [0] * len(self._window_steps)
            self._window_cost.zero_()
        super().log(logs, start_time)

    def run_summary(self) -> dict:
        """Over all processes: the budget sequence each one trained ([step, budget] pairs, this run) and the
        skipped samples. Every process must call it (it gathers)."""
        budgets = gather_object([self.budget_history])
        skips = gather_object([{"counts": dict(self.skips.counts), "examples": dict(self.skips.examples)}])
        return {"budgets_per_process": budgets, "skipped": merge_skip_counters(skips)}
