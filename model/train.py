"""Training of every method: sampled softmax + log-Q (Eqs. 2-4, 12) plus the RRL losses (III-D).

``train(cfg) -> Path`` is the entry point (the CLI and tests call it). It seeds everything, trains
with a progress bar (loss parts, examples/s), writes ``log.jsonl`` (one line per step: every loss
part, per-domain cross entropy, the auxiliary weights), checkpoints atomically and resumes from the
run directory's checkpoint. Under ``torchrun`` (WORLD_SIZE > 1) the same function runs
DistributedDataParallel: gloo on CPU, nccl on GPU; every rank reads its own shard of each epoch's
permutation and rank 0 writes the run directory.

Training examples: every train-split interaction (u, a, k); the behaviour sequence is the user's
non-test history strictly before it (``history_windows``), so the target never leaks into its own
input and test interactions never enter any input (the serving feature excludes them too).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from contracts.dataset import TEST, TRAIN, VALID, Dataset, history_windows, load_dataset
from contracts.io import atomic_write_json
from model.backbones import MatchingModel, build_model
from model.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT,
    check_entities,
    check_schema,
    load_checkpoint,
    save_checkpoint,
)
from model.config import METHODS, TrainConfig
from model.embeddings import EntityTable
from model.losses import Candidates, CandidateSampler, SampledSoftmaxLoss
from model.rrl.adversarial import fgsm_kl
from model.rrl.dal import DomainAdversarialLoss
from model.rrl.orthogonal import OrthogonalityLoss
from model.rrl.uncertainty import UncertaintyWeighting
from model.rrl.wasserstein import MultiViewWasserstein

AUX_NAMES = ("dal_shared", "dal_specific", "wasserstein", "ortho")
VALID_LOG = "valid.jsonl"  # one line per validation check: step, Recall-all@valid_n


class TrainingObjective(nn.Module):
    """The model plus its training-only losses; ``forward`` returns the total loss and its parts.

    Kept apart from the model (only ``.model`` is exported) and wrapped whole by DDP.
    """

    def __init__(self, model: MatchingModel, cfg: TrainConfig, num_domains: int) -> None:
        super().__init__()
        self.model = model
        self.rrl = cfg.rrl
        self.num_domains = num_domains
        self.ce = SampledSoftmaxLoss(log_q=cfg.loss.log_q)
        h = cfg.model.expert_dims[-1]
        r = cfg.rrl
        self.dal = DomainAdversarialLoss(h, num_domains, r.dal_hidden, r.grl_lambda) if r.dal else None
        self.mvwdl = (
            MultiViewWasserstein(
                h, num_domains, projection_dim=r.projection_dim, critic_dims=r.critic_dims, gp_weight=r.gp_weight
            )
            if r.mvwdl and num_domains > 1
            else None
        )
        self.ortho = OrthogonalityLoss(num_domains, r.ortho_mode) if r.ortho else None
        self.uwl = UncertaintyWeighting(
            AUX_NAMES, learnable=r.uwl, fixed_weight=r.aux_weight, log_var_range=r.uwl_log_var_range
        )

    def score_candidates(
        self, user: dict[str, Tensor], ent: dict[str, Tensor], domain: Tensor, own_positive: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits of every user against its candidates (either layout of ``Candidates``).

        Own-positive layout: ``ent`` holds ``pos:NAME`` (B, ...) and ``neg:NAME`` (N, ...) tensors; the
        positive is scored per user (B x 1 pairs), the shared negatives as a cross product (B x N).
        Returns logits (B, C) and the auxiliary representations of each user's positive pair.
        """
        if not own_positive:
            logits, aux = self.model.score(user, ent, domain)  # (B, C)
            b = logits.shape[0]
            idx = torch.arange(b, device=logits.device)
            # (B, h): the positive pair of each user (candidate b)
            return logits, {k: aux[k][idx, idx] for k in ("shared", "specific") if k in aux}
        pos = {n[4:]: t.unsqueeze(1) for n, t in ent.items() if n.startswith("pos:")}  # (B, 1, ...)
        neg = {n[4:]: t for n, t in ent.items() if n.startswith("neg:")}  # (N, ...)
        pos_logits, aux = self.model.score(user, pos, domain)  # (B, 1)
        if next(iter(neg.values())).shape[0]:
            neg_logits, _ = self.model.score(user, neg, domain)  # (B, N)
            logits = torch.cat([pos_logits, neg_logits], dim=1)
        else:
            logits = pos_logits
        return logits, {k: aux[k][:, 0] for k in ("shared", "specific") if k in aux}

    def forward(
        self, user_cat: Tensor, user_num: Tensor, seq: Tensor, domain: Tensor, cand: Candidates
    ) -> tuple[Tensor, dict[str, Any]]:
        user = self.model.user(user_cat, user_num, seq, domain)
        own = cand.positive is not None
        if cand.positive is not None:
            ent = {f"pos:{n}": t for n, t in self.model.entity(cand.positive).items()}
            ent.update({f"neg:{n}": t for n, t in self.model.entity(cand.rows).items()})
        else:
            ent = self.model.entity(cand.rows)
        logits, aux = self.score_candidates(user, ent, domain, own)  # (B, C)
        per_example = self.ce(logits, cand)  # (B,)
        ce = per_example.mean()
        parts: dict[str, Any] = {"ce": ce.detach(), "per_example": per_example.detach()}
        total = ce
        aux_losses: dict[str, Tensor] = {}
        if "shared" in aux and (self.dal or self.mvwdl or self.ortho):
            # float32: the critics' gradient penalty and the orthogonality norms are sums of squares
            e_s = aux["shared"].float()  # (B, h)
            e_d = aux["specific"].float()
            if self.dal is not None:
                aux_losses["dal_shared"], aux_losses["dal_specific"] = self.dal(e_s, e_d, domain)
            if self.mvwdl is not None:
                wd = self.mvwdl(e_s, domain)
                aux_losses["wasserstein"] = wd["loss"]
                parts["wasserstein_distance"] = wd["distance"]
                parts["gradient_penalty"] = wd["gp"]
            if self.ortho is not None:
                aux_losses["ortho"] = self.ortho(e_s, e_d, domain)
            weighted, weights = self.uwl(aux_losses)
            total = total + weighted
            parts["aux_weights"] = weights
        for name, value in aux_losses.items():
            parts[name] = value.detach()
        if self.rrl.adversarial and torch.is_grad_enabled():  # FGSM needs the gradient; skipped in eval
            adv = fgsm_kl(
                lambda e: self.score_candidates(user, e, domain, own)[0].float(), ent, logits.float(), ce, cand.valid,
                self.rrl.adv_epsilon,
            )
            total = total + self.rrl.adv_weight * adv
            parts["adversarial"] = adv.detach()
        parts["loss"] = total.detach()
        return total, parts


@dataclass
class PreparedBatch:
    """A step's host-side inputs: (user_cat, user_num, seq, domain), the candidates, and the
    negative sampler's state right after drawing them (what a checkpoint saved after this step needs)."""

    inputs: tuple[Tensor, ...]
    cand: Candidates
    sampler_state: Tensor


class Prefetcher:
    """Runs an iterator of prepared batches ``depth`` items ahead in a daemon thread.

    The thread is the only one drawing negatives, in step order, so the batches are the very ones
    the inline loop would make. numpy and torch release the GIL in the heavy parts (gathers, history
    windows, searchsorted), so preparation overlaps the step. An exception in the thread is raised
    in the consumer; ``close()`` stops the thread (early stopping leaves batches unused).
    """

    _END = object()

    def __init__(self, source: Iterator[PreparedBatch], depth: int) -> None:
        import queue
        import threading

        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._source = source
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import queue

        try:
            for item in self._source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put(exc)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> PreparedBatch:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return cast(PreparedBatch, item)

    def close(self) -> None:
        import queue

        self._stop.set()
        try:  # unblock a producer waiting on a full queue
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5.0)


@dataclass(frozen=True)
class Examples:
    """Non-test interactions (sorted by user, time) and which of them are training examples."""

    user: np.ndarray  # (I',) int64
    entity: np.ndarray  # (I',) int64
    domain: np.ndarray  # (I',) int64
    user_start: np.ndarray  # (I',) first row of the same user
    train_rows: np.ndarray  # (P,) rows of train-split interactions


def training_examples(ds: Dataset) -> Examples:
    inter = ds.interactions
    split = np.asarray(inter.split)
    keep = split != TEST
    user = np.asarray(inter.user)[keep].astype(np.int64)
    counts = np.bincount(user, minlength=len(ds.users))
    starts = np.zeros(len(ds.users) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return Examples(
        user=user,
        entity=np.asarray(inter.entity)[keep].astype(np.int64),
        domain=np.asarray(inter.domain)[keep].astype(np.int64),
        user_start=starts[user],
        train_rows=np.flatnonzero(split[keep] == TRAIN),
    )


def entity_table(ds: Dataset) -> EntityTable:
    e = ds.entities
    return EntityTable(np.asarray(e.cat), np.asarray(e.num), np.asarray(e.entity_type))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dist_env() -> tuple[int, int, int]:  # torchrun's RANK/WORLD_SIZE/LOCAL_RANK, read only here
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


class Trainer:
    """One training run; ``run()`` trains and returns the run directory."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.world, self.rank, local = dist_env()
        self.distributed = self.world > 1
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device: str = cfg.device  # "cuda" becomes "cuda:LOCAL_RANK" under torchrun
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
            if device.startswith("cuda"):
                device = f"cuda:{local}"
                torch.cuda.set_device(local)
        self.device = torch.device(device)
        seed_everything(cfg.seed)  # same seed on every rank: identical initial replicas
        self.ds = load_dataset(cfg.data)
        self.schema = self.ds.schema
        self.examples = training_examples(self.ds)
        if self.examples.train_rows.shape[0] < cfg.batch_size * self.world:
            raise ValueError(
                f"{cfg.data}: {self.examples.train_rows.shape[0]} training interactions are fewer than one batch "
                f"({cfg.batch_size} x {self.world} processes)"
            )
        self.arch = METHODS[cfg.method].architecture
        model = build_model(self.schema, entity_table(self.ds), cfg.model, self.arch)
        self.objective = TrainingObjective(model, cfg, self.schema.num_domains).to(self.device)
        self.module: nn.Module = self.objective
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(self.objective, device_ids=[local] if self.device.type == "cuda" else None)
        # fused=True: one kernel over all parameters instead of a loop per tensor. At 1M entities the
        # dense update of the (1M x 32) entity table dominated a CPU step (Adam step 0.21 s -> 0.023 s
        # measured here); same update rule, so checkpoints resume either way.
        self.optimizer = torch.optim.Adam(
            self.objective.parameters(), lr=cfg.lr_at(0), weight_decay=cfg.weight_decay, fused=True
        )
        # bf16 autocast (TrainConfig.precision); CPU autocast runs too, which the tests use
        self.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        self.step_module: nn.Module = self.module  # what a training step calls: compiled or not
        self.compiled = False
        if cfg.compile:
            self._compile()
        self._sampler_state: Tensor | None = None  # with prefetch: the sampler's state after the last consumed batch
        counts = np.bincount(self.examples.entity[self.examples.train_rows], minlength=len(self.ds.entities))
        self.sampler = CandidateSampler(
            cfg.loss, counts, np.asarray(self.ds.entities.domain_mask), seed=cfg.seed * 1000 + self.rank + 1
        )
        self.steps_per_epoch = self.examples.train_rows.shape[0] // (cfg.batch_size * self.world)
        # --max-steps is the exact budget: run() wraps into further epochs (divmod of the step)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else self.steps_per_epoch * cfg.epochs
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        from model.evaluate import sample_users_within

        # drawn once, so every check scores the same users and the figures are comparable
        self.valid_users = (
            sample_users_within(self.ds, VALID, cfg.valid_users, cfg.seed, pair_budget=cfg.valid_pair_budget)
            if cfg.valid_users
            else np.empty(0, dtype=np.int64)
        )
        if cfg.early_stop and self.valid_users.size == 0:
            if int((np.asarray(self.ds.interactions.split) == VALID).sum()):
                raise ValueError(
                    f"{cfg.data}: --early-stop: not one validation user fits in --valid-pair-budget "
                    f"{cfg.valid_pair_budget:,} pairs ({len(self.ds.entities):,} entities); raise the budget"
                )
            raise ValueError(
                f"{cfg.data}: --early-stop needs validation interactions and the dataset has none "
                "(the split's n_valid is 0, or every (user, domain) is too short to hold one out)"
            )
        # early-stopping state; saved in the checkpoint so a resumed run keeps its patience
        # (last_step, last_value: the latest check, so a resumed run does not score the same step twice)
        self.best: dict[str, Any] = {
            "recall": None, "step": None, "bad_checks": 0, "stopped": False, "last_step": None, "last_value": None,
        }  # fmt: skip
        self.step = 0
        self._shard_epoch: int | None = None
        self._shard = np.empty(0, dtype=np.int64)
        self.users_cat = np.asarray(self.ds.users.cat)
        self.users_num = np.asarray(self.ds.users.num)
        self.out = Path(cfg.out)

    # ---- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.objective.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "method": self.cfg.method,
            "schema_fingerprint": self.schema.fingerprint(),
            "num_entities": len(self.ds.entities),
            "torch_rng": torch.get_rng_state(),
            # with prefetch the generator has run ahead: the state after the last batch trained on
            "sampler_rng": self._sampler_state if self._sampler_state is not None else self.sampler.gen.get_state(),
            "early_stop": dict(self.best),
        }

    def maybe_resume(self) -> None:
        path = self.out / CHECKPOINT
        if not (self.cfg.resume and path.is_file()):
            return
        state = load_checkpoint(path)
        check_schema(state, self.schema, where=str(path))
        check_entities(state, len(self.ds.entities), where=str(path))
        if state.get("method") != self.cfg.method:
            raise ValueError(f"{path}: run was trained with method {state.get('method')!r}, not {self.cfg.method!r}")
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best.update(state.get("early_stop", {}))
        # re-judged with this run's patience: resuming a stopped run with a larger one continues it
        self.best["stopped"] = bool(self.cfg.early_stop and self.best["bad_checks"] >= self.cfg.patience)
        torch.set_rng_state(state["torch_rng"])
        # each rank continues its own negative stream; rank 0's saved state is shifted per rank
        self.sampler.gen.set_state(state["sampler_rng"])
        if self.rank:
            self.sampler.gen.manual_seed(int(self.sampler.gen.initial_seed()) + self.step * 7919 + self.rank)

    # ---- data ----------------------------------------------------------------------------------
    def epoch_shard(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch's permutation of the training rows, computed once per epoch.

        Cached: permuting 10M rows costs ~0.3 s, which re-done every step was a quarter of a CPU step
        at the 1m preset. A pure function of (seed, epoch), so resuming mid-epoch gets the same order.
        """
        if self._shard_epoch != epoch:
            perm = np.random.default_rng(self.cfg.seed + 7919 * epoch).permutation(self.examples.train_rows)
            self._shard, self._shard_epoch = perm[self.rank :: self.world], epoch
        return self._shard

    def batch_rows(self, epoch: int, index: int) -> np.ndarray:
        b = self.cfg.batch_size
        shard = self.epoch_shard(epoch)
        rows = shard[index * b : (index + 1) * b]
        # sorted by domain: the stacked domain layers then run one matmul per domain (model.layers.Domains)
        return rows[np.argsort(self.examples.domain[rows], kind="stable")]

    def host_batch(self, rows: np.ndarray) -> tuple[Tensor, ...]:
        """(user_cat, user_num, seq, domain, positive rows) of ``rows``, on the host."""
        ex = self.examples
        users = ex.user[rows]
        seq = history_windows(ex.entity, ex.user_start[rows], rows, self.schema.max_seq_len)
        return (
            torch.as_tensor(self.users_cat[users], dtype=torch.long),
            torch.as_tensor(self.users_num[users], dtype=torch.float32),
            torch.as_tensor(seq, dtype=torch.long),
            torch.as_tensor(ex.domain[rows], dtype=torch.long),
            torch.as_tensor(ex.entity[rows], dtype=torch.long),
        )

    def make_batch(self, rows: np.ndarray) -> tuple[Tensor, ...]:
        """``host_batch`` with the model inputs on the device (the positive rows stay on the host)."""
        *inputs, pos = self.host_batch(rows)
        return (*(t.to(self.device) for t in inputs), pos)

    def prepare(self, rows: np.ndarray) -> PreparedBatch:
        """Everything a step needs from the host: inputs, candidates, log-Q, masks (pinned on CUDA).

        Draws the step's negatives, so batches must be prepared in step order (the prefetch thread does).
        """
        user_cat, user_num, seq, domain, pos = self.host_batch(rows)
        cand = self.sampler.candidates(pos, domain)
        inputs: tuple[Tensor, ...] = (user_cat, user_num, seq, domain)
        if self.device.type == "cuda":  # page-locked: the copy to the device is asynchronous
            inputs = tuple(t.pin_memory() for t in inputs)
            cand = cand.pin_memory()
        return PreparedBatch(inputs=inputs, cand=cand, sampler_state=self.sampler.gen.get_state())

    def batches(self) -> Iterator[PreparedBatch]:
        """The prepared batches of steps self.step .. total_steps, prefetched when ``cfg.prefetch`` > 0."""

        def gen(start: int) -> Iterator[PreparedBatch]:
            for step in range(start, self.total_steps):
                epoch, index = divmod(step, self.steps_per_epoch)
                yield self.prepare(self.batch_rows(epoch, index))

        if self.cfg.prefetch == 0:
            return gen(self.step)
        return Prefetcher(gen(self.step), self.cfg.prefetch)

    # ---- compilation ---------------------------------------------------------------------------
    def _compile(self) -> None:
        """torch.compile the objective (TrainConfig.compile); a failure here or at the first step
        falls back to eager with one warning line."""
        try:
            self.step_module = cast(nn.Module, torch.compile(self.module, dynamic=True))
            self.compiled = True
        except Exception as exc:  # torch.compile unavailable on this platform / Python
            self._compile_failed(exc)

    def _compile_failed(self, exc: BaseException) -> None:
        import sys

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        print(f"warning: torch.compile unavailable, training eagerly ({type(exc).__name__}: {first})",
              file=sys.stderr, flush=True)
        self.step_module, self.compiled = self.module, False

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> float | None:
        """Validation Recall-all@valid_n averaged over domains (rank 0 scores; the figure is shared).

        Users see only their train history (``model.evaluate.history_sequences``), the validation
        interaction is the target. None when the dataset has no validation users.
        """
        if self.valid_users.size == 0:
            return None
        value: list[float | None] = [None]
        if self.rank == 0:
            from model.evaluate import average_over_domains, recall_all

            ns = (self.cfg.valid_n,)
            per_domain, _, _ = recall_all(
                self.objective.model, self.ds, self.valid_users, ns, split=VALID, device=str(self.device)
            )
            value[0] = average_over_domains(per_domain, ns)[str(self.cfg.valid_n)] if per_domain else None
        if self.distributed:
            import torch.distributed as dist

            dist.broadcast_object_list(value, src=0)
        return value[0]

    def check(self) -> float | None:
        """One validation check: track the best figure, write best.pt, count checks without gain."""
        value = self.validate()
        self.best.update(last_step=self.step, last_value=value)
        if value is None:
            return None
        best = self.best["recall"]
        if best is None or value > best:
            self.best.update(recall=value, step=self.step, bad_checks=0)
            if self.rank == 0 and self.cfg.early_stop:
                save_checkpoint(self.out / BEST_CHECKPOINT, self.state())
        else:
            self.best["bad_checks"] += 1
            if self.cfg.early_stop and self.best["bad_checks"] >= self.cfg.patience:
                self.best["stopped"] = True
        return value

    def _report_check(self, value: float | None, bar: Any) -> None:
        """A validation check as a valid.jsonl line and a console line (plain print off a terminal)."""
        if self.rank != 0 or value is None:
            return
        with open(self.out / VALID_LOG, "a") as f:
            f.write(json.dumps({"step": self.step, "valid_recall_all": value, "valid_n": self.cfg.valid_n}) + "\n")
        line = f"step {self.step}: validation Recall-all@{self.cfg.valid_n} {value:.4f}"
        if self.best["stopped"]:
            line += f" (no gain in {self.cfg.patience} checks: stopping early)"
        # printed with or without --no-progress: a long early-stopping run should show it is alive
        if self.cfg.progress and bar.console.is_terminal:
            bar.console.log(line)
        else:
            print(line, flush=True)

    # ---- loop ----------------------------------------------------------------------------------
    def _forward(self, inputs: tuple[Tensor, ...], cand: Candidates) -> tuple[Tensor, dict[str, Any]]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_dtype is not None):
            if not self.compiled:
                return self.step_module(*inputs, cand)
            try:
                return self.step_module(*inputs, cand)
            except Exception as exc:  # compiling happens at a call (the first, or a recompile): fall back
                if not _is_compile_error(exc):
                    raise
                self._compile_failed(exc)  # the forward failed before any backward: rerun the same batch
                return self.step_module(*inputs, cand)

    def train_step(self, batch: np.ndarray | PreparedBatch) -> dict[str, Any]:
        """One optimizer step on ``batch`` (training rows, or a batch from ``prepare``)."""
        prepared = batch if isinstance(batch, PreparedBatch) else self.prepare(batch)
        nb = self.device.type == "cuda"
        inputs = tuple(t.to(self.device, non_blocking=nb) for t in prepared.inputs)
        cand = prepared.cand.to(self.device, non_blocking=nb)
        domain = prepared.inputs[3]
        lr = self.cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.module.train()
        loss, parts = self._forward(inputs, cand)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {parts}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._sampler_state = prepared.sampler_state if self.cfg.prefetch else None
        per = parts.pop("per_example").cpu()
        dom = domain
        parts["lr"] = lr
        parts["ce_domain"] = {
            self.schema.domains[k]: float(per[dom == k].mean()) for k in range(self.schema.num_domains) if bool((dom == k).any())
        }
        return parts

    def close(self) -> None:
        """Leave the process group after ``run()`` (distributed runs; a no-op otherwise, and when
        the group is already gone, so a second call is harmless).

        The DDP wrapper is dropped first: its Reducer holds the gloo group, and a Reducer freed after
        ``destroy_process_group()`` ran ~ProcessGroupGloo on a torn-down group, which hung one rank of
        the two-process test forever on a mutex (2 of 3 runs of ``pytest tests/model`` hung that way;
        py-spy showed ~Reducer -> ~ProcessGroupGloo -> pthread_mutex_lock). Freed here, the group's
        last reference goes inside ``destroy_process_group()``, the order torch supports.
        """
        if not self.distributed:
            return
        import gc

        import torch.distributed as dist

        if not dist.is_initialized():
            return
        dist.barrier()  # rank 0 writes the checkpoint and run.json after the last step
        self.module = self.objective
        gc.collect()  # the DDP wrapper sits in reference cycles (hooks); free it now, not at some later GC
        dist.destroy_process_group()

    def run(self) -> Path:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from unimatch.progress import LineProgress

        cfg = self.cfg
        is_main = self.rank == 0
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", cfg.to_json())
            self.schema.save(self.out / "schema.json")
        self.maybe_resume()
        start_step = self.step
        stale = self.out / BEST_CHECKPOINT
        if is_main and stale.is_file() and (start_step == 0 or not cfg.early_stop):
            # best.pt of an earlier run in this directory (this trainer's own output): load_run would
            # prefer it over the weights this run trains
            stale.unlink()
        if is_main and start_step == 0:
            (self.out / VALID_LOG).unlink(missing_ok=True)  # a fresh run starts its own, like log.jsonl
        # a resumed run appends to its log; a fresh one starts it over
        mode = "a" if start_step else "w"
        log = open(self.out / "log.jsonl", mode) if is_main else None  # noqa: SIM115 - closed in finally
        t_start = time.perf_counter()
        t_last = t_start
        batches: Iterator[PreparedBatch] = iter(())
        ex_per_s = 0.0
        try:
            with Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                disable=not (cfg.progress and is_main),
                transient=False,
            ) as bar:
                task = bar.add_task(f"train {cfg.method}", total=self.total_steps, completed=self.step, info="")
                # off a terminal rich draws nothing until the end: periodic plain lines instead
                lines = (LineProgress(f"train {cfg.method}", self.total_steps, unit="steps", initial=self.step)
                         if cfg.progress and is_main and not bar.console.is_terminal else None)
                batches = self.batches()
                while self.step < self.total_steps and not self.best["stopped"]:
                    epoch = self.step // self.steps_per_epoch
                    parts = self.train_step(next(batches))
                    self.step += 1
                    now = time.perf_counter()
                    ex_per_s = cfg.batch_size * self.world / max(now - t_last, 1e-9)
                    t_last = now
                    record = _jsonable({"step": self.step, "epoch": epoch, "examples_per_s": ex_per_s, **parts})
                    bar.update(task, advance=1, info=_progress_info(record))
                    if lines is not None:
                        lines(self.step, info=_progress_info(record))
                    if log is not None and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    if cfg.early_stop and self.step % self.eval_every == 0 and self.step < self.total_steps:
                        self._report_check(self.check(), bar)
                    if is_main and self.step % cfg.checkpoint_every == 0:
                        save_checkpoint(self.out / CHECKPOINT, self.state())
            # the last check: after the final step (unless an early-stop check just scored that step)
            if self.best["last_step"] == self.step:
                final_value = self.best["last_value"]
            else:
                final_value = self.check()
                self._report_check(final_value, bar)
        finally:
            if isinstance(batches, Prefetcher):
                batches.close()
            if log is not None:
                log.close()
        elapsed = time.perf_counter() - t_start
        if is_main:
            save_checkpoint(self.out / CHECKPOINT, self.state())
            steps_done = self.step - start_step
            summary = {
                "method": cfg.method,
                "steps": self.step,
                "steps_this_session": steps_done,
                "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.step / max(self.steps_per_epoch, 1),
                "valid_n": cfg.valid_n,
                "valid_users": int(self.valid_users.size),
                "valid_recall_all_final": final_value,
                "valid_recall_all_best": self.best["recall"],
                "best_step": self.best["step"],
                "early_stop": cfg.early_stop,
                "early_stopped": bool(self.best["stopped"]),
                "checkpoint_used": BEST_CHECKPOINT if (self.out / BEST_CHECKPOINT).is_file() else CHECKPOINT,
                "world_size": self.world,
                "seconds": elapsed,
                "examples_per_s": steps_done * cfg.batch_size * self.world / max(elapsed, 1e-9),
                "schema_fingerprint": self.schema.fingerprint(),
            }
            atomic_write_json(self.out / "run.json", summary)
            plot_aux_losses(self.out)
        return self.out


def _is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from torch.compile's machinery (dynamo, inductor, a C compiler) rather
    than from the model, which eager mode would raise too."""
    from torch._dynamo.exc import TorchDynamoException

    mod = type(exc).__module__ or ""
    return isinstance(exc, TorchDynamoException) or mod.startswith(("torch._dynamo", "torch._inductor"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _progress_info(rec: dict[str, Any]) -> str:
    keys = ("loss", "ce", *AUX_NAMES, "adversarial")
    shown = " ".join(f"{k}={rec[k]:.3g}" for k in keys if isinstance(rec.get(k), float))
    return f"{shown} {rec['examples_per_s']:.0f} ex/s"


def plot_aux_losses(run: Path) -> Path | None:
    """The paper's Fig. 5: each auxiliary loss and its weight per step, from log.jsonl -> aux_losses.png."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    present = [n for n in AUX_NAMES if any(n in r for r in rows)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in present:
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        wts = [(r["step"], r["aux_weights"][name]) for r in rows if name in r.get("aux_weights", {})]
        axes[1].plot([p[0] for p in wts], [p[1] for p in wts], label=name)
    axes[0].set(title="auxiliary losses", xlabel="step")
    axes[1].set(title="auxiliary weights 1/(2 sigma^2) (UWL) or fixed", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    out = Path(run) / "aux_losses.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def train(cfg: TrainConfig) -> Path:
    """Train ``cfg.method`` on ``cfg.data`` into ``cfg.out`` (resuming if a checkpoint is there).

    Under torchrun every rank calls this; it returns once rank 0 has written the run directory.
    """
    trainer = Trainer(cfg)
    out = trainer.run()
    # Not in a `finally`: close() waits at a barrier, which a rank that failed mid-run would hang;
    # on an error the launcher (torchrun) tears the group down.
    trainer.close()
    return out
