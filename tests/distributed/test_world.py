"""The ranks of a run fail together: what one rank finds on disk or cannot do reaches every rank.

The MPI tests launch ``mpiexec`` with a different command per rank (MPMD), to make one rank
slower or give it an error of its own, and assert that the run finishes, or that every rank
stops within seconds with one line on stderr: a rank waiting in a collective for a rank that
gave up would hang until the timeout.  The last tests hold ``together``'s rules on a stand-in
world.
"""
import os
import shutil
import subprocess
import sys

import pytest

from dualnet import distributed

MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or __import__("importlib").util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = ["-m", "dualnet", "train", "--dataset", "digits", "--train-limit", "100", "--eval-limit", "50",
         "--batch-size", "50", "--parallel", "data"]


def launch(*ranks, timeout=180):
    """``mpiexec -n 1 <rank 0's command> : -n 1 <rank 1's command> ...``; each command a list."""
    argv = [MPIEXEC]
    for index, command in enumerate(ranks):
        argv += ([":"] if index else []) + ["-n", "1"] + command
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def python(*arguments):
    return [sys.executable, *arguments]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error")]


@needs_mpi
def test_a_slow_rank_joins_the_run_rank_zero_started(tmp_path):
    """Rank 1 is slow after MPI started: it begins its run once config.json exists, or after 10 s
    if that never appears before every rank has joined (as it should not).  Rank 1 must take the
    directory for rank 0's fresh run, not for an old run in the way."""
    out = str(tmp_path / "run")
    waits = python("-c", "import os, sys, time; from dualnet import cli, distributed\n"
                         "distributed.world('data')  # MPI_Init: both ranks have started\n"
                         "for _ in range(200):\n"
                         f"    if os.path.exists({out + '/config.json'!r}):\n"
                         "        break\n"
                         "    time.sleep(0.05)\n"
                         "sys.exit(cli.main(sys.argv[1:]))", *TRAIN[2:], "--out", out)
    done = launch(python(*TRAIN, "--out", out), waits)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "summary.json"))


@needs_mpi
def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    """Rank 1 alone is given a rule option the rule does not have (a node with other settings):
    every rank stops, and rank 0 reports rank 1's error in one line."""
    out = str(tmp_path / "run")
    done = launch(python(*TRAIN, "--out", out), python(*TRAIN, "--out", out, "--rule-opt", "no_such=1"))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1:") and "no_such" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@needs_mpi
def test_a_setup_error_on_one_rank_reaches_every_rank(tmp_path):
    """Rank 1 alone cannot read the dataset (a node without the data): every rank stops with it."""
    out = str(tmp_path / "run")
    missing = python("-c", "import sys; from dualnet import cli; from dualnet.data import datasets, errors\n"
                           "def load_digits():\n"
                           "    raise errors.DatasetNotFound('digits: not on this node')\n"
                           "datasets.load_digits = load_digits\n"
                           "sys.exit(cli.main(sys.argv[1:]))", *TRAIN[2:], "--out", out)
    done = launch(python(*TRAIN, "--out", out), missing)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert error_lines(done.stderr) == ["error: rank 1: digits: not on this node"], done.stderr[-2000:]


@needs_mpi
def test_an_unexpected_failure_on_one_rank_ends_every_rank(tmp_path):
    """A bug that raises on rank 1 in the middle of training (here: its fourth step) ends the whole
    run at once, with rank 1's error, instead of leaving rank 0 waiting for it."""
    out = str(tmp_path / "run")
    failing = python("-c", "import sys; from dualnet import cli, run\n"
                           "step = run.Run._train_step\n"
                           "def failing(self, *args):\n"
                           "    if self._steps == 3:\n"
                           "        raise RuntimeError('simulated bug')\n"
                           "    return step(self, *args)\n"
                           "run.Run._train_step = failing\n"
                           "sys.exit(cli.main(sys.argv[1:]))", *TRAIN[2:], "--out", out, "--epochs", "3")
    done = launch(python(*TRAIN, "--out", out, "--epochs", "3"), failing)
    assert done.returncode != 0
    assert "rank 1" in done.stderr and "simulated bug" in done.stderr, done.stderr[-2000:]


class _Ranks(distributed.SingleProcess):
    """Rank ``rank`` of ``size``, where the other ranks' allgather contributions are ``others``."""

    def __init__(self, rank, size, others):
        super().__init__()
        self.rank, self.size, self.others = rank, size, others

    def allgather(self, value):
        return [value if r == self.rank else self.others.get(r) for r in range(self.size)]


def test_together_raises_the_lowest_failing_rank_s_error_on_every_rank():
    def work(rank):
        def run():
            if rank == 1:
                raise ValueError("no data here")
            return "fine"
        return run
    for rank in range(3):
        others = {1: ValueError("no data here"), 2: KeyError("later")}
        with pytest.raises(ValueError, match=r"^rank 1: no data here$"):
            distributed.together(_Ranks(rank, 3, others), work(rank))
    with pytest.raises(ValueError, match="^mine$"):  # a rank's own error is raised as it is
        distributed.together(_Ranks(0, 3, {2: KeyError("later")}), lambda: (_ for _ in ()).throw(ValueError("mine")))
    assert distributed.together(_Ranks(1, 3, {}), lambda: "fine") == "fine"


def test_an_error_that_cannot_travel_is_sent_as_its_message():
    class Unpicklable(Exception):
        def __init__(self, first, second):
            super().__init__(f"{first} and {second}")

    def failing():
        raise Unpicklable("one", "two")
    sent = {}

    class Recording(_Ranks):
        def allgather(self, value):
            sent["value"] = value
            return super().allgather(value)
    with pytest.raises(Unpicklable):
        distributed.together(Recording(1, 2, {}), failing)
    assert isinstance(sent["value"], distributed.RankFailed) and "Unpicklable: one and two" in str(sent["value"])


@needs_mpi
def test_a_slow_rank_follows_rank_zero_through_a_comparison(tmp_path):
    """``compare()`` under mpiexec, rank 1 late for the comparison (it starts once compare.json
    exists) and for each rule (once the rule's config.json exists), or 10 s late where those never
    appear before it joins (as they should not): it must still join rank 0's fresh comparison."""
    out = str(tmp_path / "cmp")
    setup = ("import os, sys, time; from dualnet import compare, distributed; from dualnet.train import Config\n"
             "def wait(path):\n"
             "    for _ in range(200):\n"
             "        if os.path.exists(path):\n"
             "            break\n"
             "        time.sleep(0.05)\n"
             "configs = [Config(rule=rule, dataset='digits', train_limit=100, eval_limit=50, batch_size=50,\n"
             f"                  parallel='data', out=os.path.join({out!r}, rule)) for rule in ('bp', 'fg-w')]\n"
             "distributed.world('data')  # MPI_Init: both ranks have started\n")
    late = ("run_one = compare._run_one\n"
            "def late(config, *args):\n"
            "    wait(os.path.join(config.out, 'config.json'))\n"
            "    return run_one(config, *args)\n"
            "compare._run_one = late\n"
            f"wait({out + '/compare.json'!r})\n")
    done = launch(python("-c", setup + f"compare.compare(configs, {out!r})"),
                  python("-c", setup + late + f"compare.compare(configs, {out!r})"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = open(os.path.join(out, "results.md")).read()
    assert table.count("| finished |") == 2, table
