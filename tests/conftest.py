import copy

import pytest
import torch

from tests.pipeline_helpers import generate


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _progress_switched_on():
    """Every test starts with progress on: a job run in-process with ``--no-progress`` switches it off for the
    process (as its command line asks), which would otherwise silence the bars later tests look for."""
    from visadapt.progress import set_progress_enabled

    set_progress_enabled(True)
    yield


# ------------------------------------------------------------------------ tiny SD pipeline (tests opt in by name)


@pytest.fixture(scope="module")
def _one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("_one_thread")``): the tiny
    models' ops are far too small to split, and on a shared CPU spinning OpenMP workers made these tests up to
    50x slower. The count is restored for the other modules afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_pipe(_one_thread):
    """The tiny SD pipeline (:func:`visadapt.backbones.create_tiny_sd_pipeline`), one per test module; tests
    that change it take ``pipe``."""
    from visadapt.backbones import create_tiny_sd_pipeline

    pipe = create_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    generate(pipe)  # the first calls of a process are slow (kernel set-up); pay it once
    return pipe


@pytest.fixture()
def pipe(base_pipe):
    """A deep copy of ``base_pipe`` of the test's own."""
    return copy.deepcopy(base_pipe)


@pytest.fixture(scope="module")
def base_image(base_pipe):
    """``generate(base_pipe)``: the image without any adapter."""
    return generate(base_pipe)
