"""The experiment runner's entry point: ``train(config)`` starts or resumes a run.

A run's config, directory, checkpoints and loop live in ``dualnet.run``; the block pipeline's run
(``distributed.pipeline.PipelineRun``) extends that loop.  ``train`` picks one of the two, makes
the ranks of an MPI run agree on the directory and fail together, and runs the loop.  The names
a user of the runner needs are handed on here, so ``from dualnet.train import Config, train``
is the one import for a script (see ``__all__``).
"""
import contextlib
import dataclasses
import os

from . import backend, distributed
from .distributed.pipeline import PipelineRun
from .run import (
    RESUMABLE_FIELDS,
    SCHEDULES,
    Config,
    Interrupted,
    Run,
    RunError,
    RunExists,
    TrainingDiverged,
    build_model,
    build_optimizer,
    default_out,
    epoch_line,
    evaluate,
    first_segments,
    holds_run,
    load_checkpoint,
    parameter_groups,
    prepare_data,
    read_config,
)

__all__ = ["RESUMABLE_FIELDS", "SCHEDULES", "Config", "Interrupted", "RunError", "RunExists", "TrainingDiverged",
           "build_model", "build_optimizer", "default_out", "epoch_line", "evaluate", "first_segments",
           "holds_run", "load_checkpoint", "parameter_groups", "prepare_data", "read_config", "train"]


def train(config, resume=False, progress=None, on_epoch=None, overwrite=False, max_steps=None):
    """Run (or resume) the experiment described by ``config``; returns the summary dict.

    ``resume=True`` continues the run in ``config.out``; ``config`` may differ from the stored one
    only in ``RESUMABLE_FIELDS`` (``epochs`` is the new total).  ``overwrite=True`` replaces a run
    already in ``config.out`` (refused otherwise).  ``max_steps`` stops after that many training
    steps in this call (a checkpoint is written; the run resumes from there).  ``on_epoch(metrics)``
    is called after every epoch with that epoch's metrics line.  The run uses the backend of
    ``config.device`` ('cpu': NumPy, 'cuda': CuPy; None: the active one); 'cuda' without a usable
    GPU raises ``backend.DeviceUnavailable`` before anything is written.

    Under ``mpiexec`` rank 0 alone looks at what ``config.out`` holds (and its ``out`` is every
    rank's), and an error on any rank while the run starts or writes a checkpoint is raised on
    every rank (``distributed.together``): no rank is left waiting for one that stopped.
    """
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps={max_steps!r}: must be a whole number >= 1")
    world = distributed.world(config.parallel)
    out, found = distributed.from_rank_zero(world, lambda: (config.out, holds_run(config.out)))
    with contextlib.ExitStack() as context:
        config = distributed.together(world, lambda: _enter(context, dataclasses.replace(config, out=out),
                                                            resume, overwrite, found))
        if config.device == "cuda" and world.size > 1:
            world.use_local_gpu()  # one GPU per rank of a node
        run = PipelineRun if config.parallel == "pipeline" else Run
        return distributed.together(world, lambda: run(config, resume, overwrite, world)).loop(
            progress, on_epoch, max_steps)


def _enter(context, config, resume, overwrite, found):
    """``config`` checked and completed (device, absolute data_dir); its backend and BLAS limit are
    entered on ``context``.  ``found``: whether ``config.out`` already holds a run."""
    device = config.device or backend.device()
    if device not in backend.DEVICES:
        raise ValueError(f"Config.device={device!r}; choose one of {sorted(backend.DEVICES)}")
    config = dataclasses.replace(config, device=device, data_dir=config.data_dir and os.path.abspath(config.data_dir))
    config.check()
    if found and not resume and not overwrite:
        raise RunExists(f"{config.out} already holds a run; choose another --out, continue it with "
                        f"--resume {config.out}, or replace it with --overwrite")
    context.enter_context(backend.using(backend.DEVICES[device]))
    context.enter_context(_blas_limit(config.blas_threads))
    return config


def _blas_limit(count):
    """BLAS limited to ``count`` threads while the run trains (threadpoolctl); no change for None."""
    if count is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(count, user_api="blas")
