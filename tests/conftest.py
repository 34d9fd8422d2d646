import pytest
import torch

from fsae.data.synthetic import SyntheticSpec, generate


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A small generated data set in the VOC layout (shared by the pipeline tests)."""
    root = tmp_path_factory.mktemp("synthetic")
    spec = SyntheticSpec(num_train=24, num_val=8, image_size=64, body_axes=(10.0, 16.0),
                         part_radius=(2.5, 3.5), seed=3)
    return generate(root, spec, progress=False), spec


# The 32 px set of the distributed and fault tests: 16 train / 4 val images in the VOC layout.
TINY32 = dict(num_val=4, image_size=32, body_axes=(6.0, 9.0), part_radius=(1.5, 2.5), stripe_period=(4.0, 6.0),
              clutter_axes=(3.0, 5.0), seed=1)


def tiny32_data(root, num_train: int = 16):
    return generate(root, SyntheticSpec(num_train=num_train, **TINY32), progress=False)


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory):
    """``tiny32_data`` generated once per session."""
    return tiny32_data(tmp_path_factory.mktemp("tiny32"))


@pytest.fixture
def one_thread():
    """One intra-op thread: the float summation order of the OMP_NUM_THREADS=1 subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
