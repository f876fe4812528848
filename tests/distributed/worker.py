"""Run under ``mpiexec -n P``: train each requested rule a few steps with ``parallel='data'`` and
let rank 0 save the final parameters (tests/distributed/test_data_parallel.py compares them with
the single-process run)."""
import json
import sys

import numpy as np

from dualnet.train import Config, load_checkpoint, train


def main(spec_path):
    spec = json.load(open(spec_path))
    for values in spec["runs"].values():
        config = Config.from_dict({**values, "parallel": "data"})
        train(config, max_steps=spec.get("max_steps"))
    from dualnet import distributed
    if distributed.world("data").rank == 0:
        for values in spec["runs"].values():
            params = load_checkpoint(f"{values['out']}/checkpoint.npz")[0]["params"]
            np.savez(f"{values['out']}/params.npz", **params)


if __name__ == "__main__":
    main(sys.argv[1])
