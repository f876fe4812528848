"""How CuPy arrays cross ranks: NCCL, a CUDA-aware MPI, or the host (``world.GPU_TRANSPORTS``).

The choice and its errors are checked everywhere; the transports themselves only where a GPU is:
two ranks training on CUDA must follow the single-process CUDA trajectory through each transport
this machine offers (NCCL needs one GPU per rank).
"""
import dataclasses
import importlib
import os

import numpy as np
import pytest

from dualnet import backend, cli, distributed
from dualnet.train import Config, train

from .test_data_parallel import MODELS, base, needs_mpi, params_of, run_mpi

world_module = importlib.import_module("dualnet.distributed.world")  # the module, not the function world()


@pytest.mark.parametrize("nccl, cuda_aware, expected", [
    (True, True, "nccl"), (True, False, "nccl"), (False, True, "cuda-aware"), (False, False, "host")])
def test_auto_prefers_nccl_then_cuda_aware_mpi_then_the_host(nccl, cuda_aware, expected):
    assert world_module.resolve_transport(nccl, cuda_aware) == expected


@needs_mpi
def test_an_unknown_transport_is_refused_by_name():
    with pytest.raises(ValueError, match="gpu_transport='infiniband'; choose one of auto, nccl, cuda-aware, host"):
        distributed.MPIWorld(gpu_transport="infiniband")


@needs_mpi
def test_the_cli_refuses_an_unknown_transport_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("DUALNET_GPU_TRANSPORT", "smoke-signals")
    assert cli.main(["train", "--model", "mlp", "--rule", "fg-w", "--dataset", "digits", "--parallel", "data"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DUALNET_GPU_TRANSPORT='smoke-signals'; choose one of") and "\n" not in err


@needs_mpi
@pytest.mark.skipif(world_module._nccl_available(), reason="NCCL is installed here")
def test_nccl_without_nccl_says_what_to_install():
    with pytest.raises(distributed.TransportUnavailable, match="install NCCL .* or set DUALNET_GPU_TRANSPORT=host"):
        distributed.MPIWorld(gpu_transport="nccl").transport()


@needs_mpi
def test_host_arrays_never_touch_the_gpu_transport():
    world = distributed.MPIWorld(gpu_transport="nccl")  # would raise if asked for, without NCCL
    total = world.allreduce(np.arange(3.0))
    np.testing.assert_array_equal(total, np.arange(3.0))
    assert world.allreduces == 1 and world.bytes_sent == 24


def _transports():
    if not backend.cuda_available():
        return []
    import cupy
    found = ["host"]
    if world_module._nccl_available() and cupy.cuda.runtime.getDeviceCount() >= 2:
        found.append("nccl")  # NCCL refuses two ranks on one device
    if world_module._mpi_cuda_aware():
        found.append("cuda-aware")
    return found


@needs_mpi
@pytest.mark.skipif(not backend.cuda_available(), reason="needs a CUDA GPU (cupy.is_available())")
@pytest.mark.parametrize("transport", _transports() or ["host"])
@pytest.mark.parametrize("rule", ["fg-w", "fg-a", "bp"])
def test_two_gpu_ranks_follow_the_single_gpu_trajectory(tmp_path, transport, rule):
    config = Config(rule=rule, device="cuda", **MODELS["mlp"], **base(str(tmp_path / "single")))
    train(config)
    expected = params_of(config.out)
    parallel = dataclasses.replace(config, out=str(tmp_path / "parallel"))
    run_mpi(2, {rule: parallel}, tmp_path, env={"DUALNET_GPU_TRANSPORT": transport})
    got = params_of(parallel.out)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=2e-4, atol=2e-6, err_msg=f"{rule} over {transport}: {name}")
    assert os.path.exists(os.path.join(parallel.out, "metrics.jsonl"))


def test_gpu_gradients_reach_the_allreduce_on_the_device(fake_cupy):
    """``combine`` puts a step's gradients, loss and statistics in one buffer on the gradients'
    device, so that the GPU transport (not the host) carries them (the CuPy stand-in here)."""
    import cupy

    from dualnet.distributed.data_parallel import combine
    from dualnet.rules.base import Estimate

    class TwoRanks(distributed.SingleProcess):
        size, sent = 2, []

        def allreduce(self, array):
            self.sent.append(array)
            return array * 2

    grads = {"w": cupy.asarray(np.arange(6.0, dtype=np.float32).reshape(2, 3)),
             "b": cupy.asarray(np.ones(3, np.float32))}
    state = {"bn": (cupy.asarray(np.full(3, 4.0, np.float32)),)}
    world = TwoRanks()
    combined, loss, new_state, flag = combine(world, Estimate(grads, 1.5, state), 0.5, flag=1.0)
    assert len(world.sent) == 1 and backend.namespace(world.sent[0]) is cupy
    assert world.sent[0].dtype == np.float32
    for name, g in grads.items():
        assert backend.namespace(combined[name]) is cupy
        np.testing.assert_array_equal(combined[name].get(), g.get())  # 2 ranks x weight 0.5
    np.testing.assert_array_equal(new_state["bn"][0].get(), np.full(3, 4.0))
    assert (loss, flag) == (1.5, 2.0)
