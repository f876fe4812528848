"""Run under ``mpiexec -n S`` (or as one plain process): train each run of the spec (its
``parallel`` field says how), resuming where the spec says so, and let rank 0 write each run's
final parameters to ``params.npz`` (tests/distributed/test_pipeline.py compares them)."""
import json
import sys

import numpy as np

from dualnet import distributed
from dualnet.train import Config, TrainingDiverged, load_checkpoint, train


def main(spec_path):
    spec = json.load(open(spec_path))
    rank = 0
    for values in spec["runs"].values():
        config = Config.from_dict(values)
        rank = distributed.world(config.parallel).rank
        try:
            train(config, resume=spec.get("resume", False), max_steps=spec.get("max_steps"))
        except TrainingDiverged as error:
            if rank == 0:
                print(f"diverged: {error}", flush=True)
            continue
        if rank == 0:
            params = load_checkpoint(f"{values['out']}/checkpoint.npz")[0]["params"]
            np.savez(f"{values['out']}/params.npz", **params)


if __name__ == "__main__":
    main(sys.argv[1])
