"""Plain helpers shared by the tests that run the tiny SD pipeline or compare tensors before and after a load.

The fixtures that go with them (``_one_thread``, ``base_pipe``, ``pipe``, ``base_image``) are in ``conftest.py``.
Import them as ``from tests.pipeline_helpers import ...``, as ``tests/tiny_models.py`` is imported.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

import visadapt

PROMPT = "a red cube on a table"

# a float tensor is compared through an integer view of the same width: bit for bit (0.0 is not -0.0, and an
# unchanged NaN equals itself, which torch.equal denies)
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def generate(pipe, height: int = 32, width: int = 32, steps: int = 2, *, guidance_scale: float = 7.5,
             output_type: str = "pt"):
    """An image from ``steps`` DDIM steps of PROMPT with a fixed seed: ``(1, 3, height, width)`` in [0, 1] for
    ``output_type="pt"``, ``(1, height, width, 3)`` numpy for ``"np"``. The default guidance is the pipeline's
    own (classifier-free guidance, two UNet passes a step)."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=steps, height=height, width=width, guidance_scale=guidance_scale,
                    output_type=output_type, generator=torch.Generator().manual_seed(0)).images


#: :func:`generate` without classifier-free guidance (one UNet pass a step, half the time) as a numpy array,
#: which ``pytest.approx`` compares
generate_np = functools.partial(generate, guidance_scale=1.0, output_type="np")


def every_tensor(pipe_or_model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned: of an ``nn.Module`` (its ``state_dict`` keys), or of every torch
    component of a diffusers pipeline (keys ``<component>.<state_dict key>``)."""
    if isinstance(pipe_or_model, nn.Module):
        return {key: value.detach().clone() for key, value in pipe_or_model.state_dict().items()}
    return {f"{name}.{key}": value.detach().clone()
            for name, module in pipe_or_model.components.items() if isinstance(module, nn.Module)
            for key, value in module.state_dict().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same dtype, shape and bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = (t.view(_SAME_WIDTH_INT[t.element_size()]) for t in (a, b))
    return torch.equal(a, b)


def assert_same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Same keys and every tensor bit for bit equal (:func:`same_bits`): a NaN left as it was (a broken adapter's
    own tensors) is unchanged, a NaN written where a number was is a change."""
    assert sorted(before) == sorted(after)
    changed = [key for key in before if not same_bits(before[key], after[key])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """No adapter recorded on ``model`` and its tensors are ``before`` (from :func:`every_tensor`) bit for bit."""
    assert visadapt.api.records(model) == {}
    assert_same_tensors(before, every_tensor(model))
