"""The block pipeline: the model's blocks split into S contiguous stages, stage s on MPI rank s.

A local-greedy rule trains block k from block k's own local loss on block k−1's output: nothing
travels backward.  Stage s runs its blocks on batch t as soon as stage s−1 has sent it the output
of its last block for batch t, sends its own last output on (a non-blocking send) and applies its
update; it then goes on to batch t+1 while stage s+1 works on batch t.  So in steady state all S
stages compute at once, on S consecutive batches.

Exactness.  In one process, step t computes every block's output with the parameters θ_t and
then updates every block.  In the pipeline, stage s−1 sends the output of its blocks computed
with its parameters θ_t (its update for batch t comes after), so block k's estimate for batch t
sees the same input as in one process; the step's generator is (seed, epoch, step) on every
stage, and every random draw of the supported rules is keyed by block (FG-A's noise by site,
FG-W's directions by tensor, the guesses' by block, DFA's matrices by layer).  Every stage's
arithmetic is the one-process arithmetic of its blocks: the pipelined parameters equal the
single-process ones bit for bit (with the same BLAS threads).

Each rule says how a pipeline can train it (``Rule.pipeline``): 'local' (above), 'signal', or not
at all.  The 'signal' rules (DFA, DKP, FDFA, FG-A) need a small per-example signal from the end of
the network (the output error e [N, classes], with the logits' tangent [K, N, classes] for FDFA;
FG-A's loss derivatives d [K, N]): the last stage broadcasts it after its forward pass of batch t,
and every stage forms and applies its update for batch t before its forward pass of batch t+1
(exact, but the stages' forward passes no longer overlap).  FG-A's and FDFA's forward messages
also carry the output's tangent [K, N, ...] (``Rule.pipeline_tangents``).

The stages agree on when to stop: after each step every stage starts a non-blocking Allreduce of
two flags (Ctrl-C seen, non-finite loss or gradient), and waits for the one of step t before it
starts step t + S + 1, by which time every stage has finished step t; so every stage stops after the
same step.  Epoch ends are synchronisation points: rank 0 gathers every stage's parameters,
running statistics and optimiser state into the single-process checkpoint format, evaluates the
whole model, and writes; a checkpoint resumes on any number of stages, or on one process.
"""
import contextlib
import os
import resource
import time

import numpy

from .. import backend, rules
from .. import run as runner
from ..dual import Dual


def block_costs(model):
    """The estimated cost of each block: its parameter count (local head included), the read-out's
    added to the last block.  A dense or grouped layer's multiply-adds per example are its weights
    (times the tokens, the same for every block of a LocalMixer), so this is the forward cost up
    to a factor common to the blocks."""
    counts = model.param_counts()
    costs = [float(counts.get(k, 0)) for k in model.blocks()]
    costs[-1] += float(counts.get("head", 0))
    return costs


def partition(costs, stages):
    """Blocks per stage (a list of ``stages`` positive counts summing to ``len(costs)``): the
    contiguous split whose most expensive stage is cheapest (among ties, the first found), by
    dynamic programming over (blocks done, stages used)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"--parallel pipeline: {stages} stages for {n} blocks; launch at most {n} processes "
                         f"(mpiexec -n S, S <= {n})")
    prefix = numpy.concatenate([[0.0], numpy.cumsum(costs)])
    best = {(0, 0): (0.0, [])}
    for used in range(1, stages + 1):
        for done in range(used, n - (stages - used) + 1):
            options = [(max(best[(start, used - 1)][0], prefix[done] - prefix[start]), best[(start, used - 1)][1]
                        + [done - start]) for start in range(used - 1, done) if (start, used - 1) in best]
            best[(done, used)] = min(options, key=lambda option: option[0])
    return best[(n, stages)][1]


def check_stages(stages, num_blocks, processes):
    """A ``--stages`` override (blocks per stage): one positive count per process, summing to the
    model's blocks."""
    if len(stages) != processes or any(int(n) != n or n < 1 for n in stages) or sum(stages) != num_blocks:
        raise ValueError(f"--stages {','.join(map(str, stages))}: give one positive block count per process "
                         f"({processes}) summing to the model's {num_blocks} blocks")
    return [int(n) for n in stages]


class StageModel:
    """The view of ``model`` that a stage's rule sees: ``forward`` runs blocks ``blocks`` only (the
    input is the previous stage's output) and keeps the value of their last output in ``output``
    (the first pass of a step; reset with ``output = None``); ``blocks()``, ``parameters_of`` and
    ``state_of`` answer for the stage's blocks (and the read-out on the last stage).  Everything
    else is the model's."""

    def __init__(self, model, blocks):
        self._model, self._blocks, self.output, self.output_tangent = model, blocks, None, None
        self.last = blocks.stop == model.num_blocks

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, params, x, labels=None, plan=None, state=None):
        trace = self._model.forward(params, x, labels, plan, state, blocks=self._blocks)
        if self.output is None:
            self.output, self.output_tangent = trace.last_output, trace.last_tangent
        return trace

    def blocks(self):
        return self._blocks

    def owns(self, block):
        return block in self._blocks or (block is None and self.last)

    def parameters_of(self, block, local_head=None):
        return self._model.parameters_of(block, local_head) if self.owns(block) else []

    def state_of(self, block, local_head=None):
        return self._model.state_of(block, local_head) if self.owns(block) else []

    def names(self):
        """The stage's parameter names: its blocks' and, on the last stage, the read-out's."""
        owned = list(self._blocks) + ([None] if self.last else [])
        return [name for k in owned for name in self._model.parameters_of(k)]

    def state_keys(self):
        return [key for k in self._blocks for key in self._model.state_of(k)]


class _MergedOptimizer:
    """The optimiser state of all stages as one ``state_dict`` (what ``save_checkpoint`` asks)."""

    def __init__(self, parts):
        self.parts = parts

    def state_dict(self):
        merged = dict(self.parts[0])
        merged["state"] = {name: tensor for part in self.parts for name, tensor in part["state"].items()}
        return merged


class _MergedRule:
    """The rule state of all stages as one ``state_dict``: rank 0's, overlaid by what each stage
    created or changed (FA's matrices are the same everywhere; DFA's and DKP's B_l and a guess's
    fixed NTK heads are made and learned on the stage of their block)."""

    def __init__(self, parts):
        self.parts = parts

    def state_dict(self):
        merged = {}
        for part in self.parts:
            merged.update(part)
        return merged


class PipelineRun(runner.Run):
    """``Run`` with the model's blocks split over the ranks of ``world`` (one stage each)."""

    def __init__(self, config, resume, overwrite, world):
        check_rule(config)
        super().__init__(config, resume, overwrite, world)
        model, counts = self.model, self._layout()
        starts = numpy.concatenate([[0], numpy.cumsum(counts)]).astype(int)
        self.counts, self.stage = counts, world.rank
        self.whole = model
        self.model = StageModel(model, range(starts[self.stage], starts[self.stage + 1]))
        self.params = {name: self.params[name] for name in self.model.names()}
        self.state = {key: self.state[key] for key in self.model.state_keys()}
        self.optimizer.state = {name: s for name, s in self.optimizer.state.items() if name in self.params}
        if not self.model.last:  # the epoch's loss so far (a resumed checkpoint's) is the last stage's to carry
            self.position["loss_sum"] = 0.0
        self.sending, self.flags, self.stop_flags = [], [], numpy.zeros(2)
        self.forward_bytes, self.lag = 0, world.size + 1
        self.clock = {"busy": 0.0, "idle": 0.0, "signal": 0.0}  # seconds computing / waiting for input / for e
        self.signal_bytes = 0
        self.loaded_rule = dict(self.rule.state)  # what each stage leaves as it was gets rank 0's copy

    def _layout(self):
        """Blocks per stage: ``config.stages`` or the balanced split; one-line errors for a model the
        pipeline cannot split."""
        model, processes = self.model, self.world.size
        if model.num_blocks < 1 or not (model.has_local_heads or self.rule.pipeline == "signal"):
            raise ValueError(f"--parallel pipeline needs a model of blocks with local heads; {model.name} has "
                             f"{model.num_blocks} blocks{'' if model.has_local_heads else ' and no local heads'}")
        if self.config.stages:
            return check_stages(self.config.stages, model.num_blocks, processes)
        return partition(block_costs(model), processes)

    def _prepare_directory(self, replace):
        self._layout()  # nothing is written for a layout that cannot run
        super()._prepare_directory(replace)

    # --- one step ------------------------------------------------------------------------
    def _train_step(self, xb, yb, epoch, step, interrupted):
        """Stage s's step on batch t: receive block input, estimate its blocks, send their output on,
        update; returns whether the stages agreed to stop after this step."""
        config, position, world = self.config, self.position, self.world
        started = time.perf_counter()
        self.clock.setdefault("first", started)
        while len(self.flags) >= self.lag:  # step t − S − 1: every stage has finished it by now
            self.stop_flags = numpy.maximum(self.stop_flags, self.flags.pop(0).wait())
        if self.stop_flags[1] > 0:
            self._drain()  # raises on every stage after the same step
        x = xb if self.stage == 0 else self._receive()
        received = time.perf_counter()
        self.clock["idle"] += received - started
        self.model.output = None
        rng = runner.step_rng(config.seed, epoch, step)
        if self.rule.pipeline == "signal":
            batch = rules.Batch.whole(len(yb))
            forward = self.rule.forward_pass(self.model, self.params, x, yb, rng, self.state, batch)
            self._send_output()
            estimate = self.rule.updates(self.model, self.params, forward, self._signal(forward, yb), batch)
        else:
            estimate = self.rule(self.model, self.params, x, yb, rng, self.state)
            self._send_output()
        loss = 0.0 if estimate.loss is None else float(estimate.loss)
        diverged = not numpy.isfinite(loss) or not self._finite_gradients(estimate.grads)
        if not diverged:
            self.params = self.optimizer.step(self.params, estimate.grads)
            self.state = estimate.state or self.state
            position["loss_sum"] += loss
        position["step"] = step + 1
        self.flags.append(world.iallreduce(numpy.array([float(interrupted), float(diverged)])))
        self.clock["last"] = time.perf_counter()
        self.clock["busy"] += self.clock["last"] - received
        return bool(self.stop_flags[0] > 0)

    def _receive(self):
        """The previous stage's output for this batch (a ``Dual`` with its tangent for FG-A)."""
        value = backend.to_device(self.world.recv(self.stage - 1))
        if not self.rule.pipeline_tangents:
            return value
        return Dual._make(value, backend.to_device(self.world.recv(self.stage - 1, tag=1)))

    def _send_output(self):
        """Start sending this stage's output (the next stage's input) for the batch."""
        if not self.model.last:
            self._wait_sends()
            self.sending.append(self.world.isend(self.model.output, self.stage + 1))
            self.forward_bytes += self.model.output.nbytes
            if self.rule.pipeline_tangents:
                tangent = self.model.output_tangent
                self.sending.append(self.world.isend(tangent, self.stage + 1, tag=1))
                self.forward_bytes += tangent.nbytes

    def _signal(self, forward, labels):
        """The rule's per-example signal (DFA's e [N, classes], FG-A's d [K, N]), computed on the last
        stage and broadcast to all."""
        signal = self.rule.signal(forward, labels) if self.model.last else None
        waited = time.perf_counter()
        signal = self.world.broadcast_arrays(signal, self.world.size - 1)
        self.clock["signal"] += time.perf_counter() - waited
        if self.model.last:
            self.signal_bytes += sum(array.nbytes for array in signal)
        return signal

    def _wait_sends(self):
        while self.sending:
            self.sending.pop(0).wait()

    def _drain(self):
        """Finish every started send and flag reduction (at epoch ends, checkpoints and stops)."""
        self._wait_sends()
        while self.flags:
            self.stop_flags = numpy.maximum(self.stop_flags, self.flags.pop(0).wait())
        if self.stop_flags[1] > 0:
            raise self._diverged("a loss or a gradient", "non-finite (on some stage)")

    def _agreed(self, flag):
        return bool(self.stop_flags[0] > 0) or super()._agreed(flag)

    # --- the whole model on rank 0 -----------------------------------------------------------
    def _gathered(self):
        """On rank 0: (params, state, optimizer state dict, position) of the whole model, in the
        single-process format, gathered from every stage; None on the other ranks."""
        self._drain()
        numpy_of = backend.to_numpy
        mine = ({name: numpy_of(p) for name, p in self.params.items()},
                {key: tuple(numpy_of(a) for a in v) for key, v in self.state.items()},
                self.optimizer.state_dict(), self.position["loss_sum"], self._rule_state())
        parts = self.world.gather(mine)
        if parts is None:
            return None
        params = {name: backend.to_device(p) for part in parts for name, p in part[0].items()}
        state = {key: tuple(backend.to_device(a) for a in v) for part in parts for key, v in part[1].items()}
        params = {name: params[name] for name in self.whole.specs}  # declaration order
        position = {**self.position, "loss_sum": sum(part[3] for part in parts)}
        return params, state, _MergedOptimizer([part[2] for part in parts]), position, _MergedRule(
            [part[4] for part in parts])

    def _rule_state(self):
        """Rank 0: the whole rule state; other stages: the entries they created or changed since
        the start (or the resume) of the run."""
        if self.stage == 0:
            return self.rule.state_dict()
        return {name: backend.to_numpy(value) for name, value in self.rule.state.items()
                if self.loaded_rule.get(name) is not value}

    @contextlib.contextmanager
    def _as_whole(self, gathered):
        """Rank 0 with the whole model for the duration (evaluation, checkpoint)."""
        kept = self.model, self.params, self.state, self.position
        self.model, self.params, self.state, self.position = self.whole, gathered[0], gathered[1], gathered[3]
        try:
            yield
        finally:
            self.model, self.params, self.state, self.position = kept

    def _epoch_metrics(self, wall):
        gathered, line = self._gathered(), None
        if gathered is not None:
            with self._as_whole(gathered):
                line = super()._epoch_metrics(wall)
        return self.world.bcast(line)

    def _save(self):
        params, state, optimizer, position, rule = self._gathered() or (None,) * 5
        self._write_checkpoint(params, state, optimizer, rule, position)

    def _write_summary(self, stopped=None):
        self._drain()
        clock = self.clock
        mine = (self.forward_bytes, clock["busy"], clock["idle"], clock.get("first", 0.0), clock.get("last", 0.0),
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, self.signal_bytes, clock["signal"])
        stages = self.world.gather(mine)
        summary = super()._write_summary(stopped)
        steps = max(self._steps, 1)
        summary.pop("bytes_sent_per_step", None)
        summary["stages"] = self.counts
        if stages is not None:  # rank 0: the forward messages of a batch, and each stage's clock
            summary.update(bytes_per_batch=sum(stage[0] for stage in stages) / steps,
                           stage_busy_s=[stage[1] for stage in stages], stage_idle_s=[stage[2] for stage in stages],
                           steps_wall_s=max(stage[4] for stage in stages) - min(stage[3] for stage in stages),
                           stage_peak_rss_mb=[stage[5] for stage in stages], steps=self._steps)
            if self.rule.pipeline == "signal":  # the last stage's broadcast of e, and each stage's wait for it
                summary.update(signal_bytes_per_batch=sum(stage[6] for stage in stages) / steps,
                               stage_signal_wait_s=[stage[7] for stage in stages])
        if self.writes:
            runner.write_json(os.path.join(self.out, "summary.json"), summary)
        return summary



def check_rule(config):
    """One-line errors for a rule or option the pipeline cannot train (the rule says: ``Rule.pipeline``,
    ``Rule.pipeline_refusal``), before anything is built."""
    rule = rules.create(config.rule, **config.rule_options)
    refusal = rule.pipeline_refusal()
    if refusal:
        raise ValueError(f"--parallel pipeline: {refusal}")
    if rule.pipeline is None:
        kinds = {name: rules.create(name).pipeline for name in rules.names()}
        local, signal = ([name for name, kind in kinds.items() if kind == wanted] for wanted in ("local", "signal"))
        raise ValueError(f"--parallel pipeline trains the local greedy rules ({', '.join(local)}) and the rules "
                         f"that need only a small per-example signal from the last stage ({', '.join(signal)}); "
                         f"{config.rule!r} needs a signal from later blocks that the pipeline does not carry")
    if config.diagnostics:
        raise ValueError("--parallel pipeline: --diagnostics is not supported (it needs every block at once)")
