import pytest

from fsae.data.synthetic import SyntheticSpec, generate


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A small generated data set in the VOC layout (shared by the pipeline tests)."""
    root = tmp_path_factory.mktemp("synthetic")
    spec = SyntheticSpec(num_train=24, num_val=8, image_size=64, body_axes=(10.0, 16.0),
                         part_radius=(2.5, 3.5), seed=3)
    return generate(root, spec, progress=False), spec
