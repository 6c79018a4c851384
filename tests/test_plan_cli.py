"""``memory_budget`` through ``timm.create_model`` and the ``timm-stream plan`` command (issue 12).

The engine's planner (``StreamingCNN.plan``: predicted peak memory and time) is tested in the engine's
own tests; here: that the timm builder, the stream model, the features wrapper, the Lightning module
and the CLI pass the budget, batch and dtype through, and that planning a 65536² image allocates
nothing of its size.
"""
from __future__ import annotations

import json
import time
import typing

import pytest
import timm
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

import timm_stream  # noqa: F401 - registers the stream_<arch> models
from timm_stream.engine import MemoryBudgetError, parse_memory
from timm_stream.lightning.cli import main
from timm_stream.lightning.plan_cli import PRECISION_DTYPES

GIB = 2 ** 30
# Larger than any weight of the models used here (resnet18's biggest: 512x512x3x3 = 2.4 M elements),
# far smaller than any tile of a 65536² image, let alone the image (3 x 65536² = 1.3e10 elements).
ELEMENT_LIMIT = 2 ** 23


class RefuseLargeTensors(TorchFunctionMode):
    """Fails any torch call that returns a non-meta tensor of more than ``limit`` elements (meta tensors,
    the engine's shape-only trace, are free)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.numel())
                if t.numel() > self.limit:
                    raise AssertionError(f"{func} allocated a {tuple(t.shape)} tensor on {t.device}")
        return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def plan_error(model_name: str, size, budget, **kwargs) -> MemoryBudgetError:
    model = timm.create_model(model_name, memory_budget=budget, **kwargs)
    with pytest.raises(MemoryBudgetError) as info:
        model.stream_plan(size)
    return info.value


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("size, extra", [(65536, ()), (65536, ("--lazy", "--batch", "2", "--precision", "bf16-mixed"))],
                         ids=["65536-tensor", "65536-lazy-batch2-bf16"])
def test_cli_plans_a_huge_image_quickly_without_allocating_it(capsys, size, extra):
    guard = RefuseLargeTensors(ELEMENT_LIMIT)
    start = time.perf_counter()
    with guard:
        code, out, err = run_cli(capsys, "stream_resnet18", "--image-size", str(size), "--memory-budget", "2GiB",
                                 *extra)
    elapsed = time.perf_counter() - start
    assert code == 0, err
    assert guard.largest > 0  # the guard saw the model's weights being made: it was watching
    assert f"StreamPlan({size}x{size}" in out
    assert "predicted peak memory of the streamed part" in out and "budget 2.00 GiB" in out
    assert "predicted step time relative to un-tiled" in out
    assert "does NOT fit in the budget of 2.00 GiB" in out  # un-tiled 65536² needs terabytes
    assert elapsed < 60, f"planning took {elapsed:.0f} s"


def test_cli_numbers_are_the_models_plan(capsys):
    """What the CLI prints is the plan create_model + stream_plan gives for the same arguments."""
    from timm_stream.engine import format_bytes

    code, out, err = run_cli(capsys, "stream_test_resnet", "--image-size", "1536,1024", "--memory-budget", "96MiB",
                             "--batch", "3")
    assert code == 0, err
    plan = timm.create_model("stream_test_resnet", memory_budget="96MiB").stream_plan((1536, 1024), batch=3)
    assert str(plan) in out
    assert f"streamed part: {format_bytes(plan.peak_memory)} (budget 96.00 MiB)" in out
    assert f"relative to un-tiled: {plan.relative_time:.2f}x" in out
    assert ("fits in the budget" in out) == plan.fits_untiled


@pytest.mark.parametrize("budget", ["2GiB", "2 GiB", str(2 * GIB), "2147483648.0"])
def test_cli_budget_spellings_give_the_same_plan(capsys, budget):
    code, out, err = run_cli(capsys, "stream_test_resnet", "--image-size", "4096", "--memory-budget", budget)
    assert code == 0, err
    assert "(budget 2.00 GiB)" in out
    assert parse_memory(budget) == 2 * GIB


@pytest.mark.parametrize("argv, named", [
    (("--image-size", "4096", "--memory-budget", "lots"), "--memory-budget"),
    (("--image-size", "4096", "--memory-budget", "-5GiB"), "--memory-budget"),
    (("--image-size", "4096x0"), "--image-size"),
    (("--image-size", "4096", "--precision", "8-mixed"), "--precision"),
    (("--image-size", "4096", "--batch", "0"), "--batch"),
    (("--memory-budget", "1GiB",), "--image-size"),
])
def test_cli_bad_arguments_exit_2_naming_the_argument(capsys, argv, named):
    with pytest.raises(SystemExit) as info:
        main(["plan", "stream_test_resnet", *argv])
    assert info.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_too_small_budget_exits_2_naming_the_minimum(capsys):
    expected = plan_error("stream_test_resnet", (4096, 4096), "1KiB")
    assert expected.minimum > 1024
    code, out, err = run_cli(capsys, "stream_test_resnet", "--image-size", "4096", "--memory-budget", "1KiB")
    assert code == 2 and out == ""
    assert str(expected) in err
    # the minimum it names is workable: planning with exactly that budget succeeds and stays within it
    code, out, err = run_cli(capsys, "stream_test_resnet", "--image-size", "4096",
                             "--memory-budget", str(expected.minimum))
    assert code == 0, err
    plan = timm.create_model("stream_test_resnet", memory_budget=expected.minimum).stream_plan((4096, 4096))
    assert plan.peak_memory <= expected.minimum


def test_cli_too_small_budget_for_a_wider_batch_and_precision(capsys):
    """A variant: the minimum depends on batch and dtype; the CLI plans with both."""
    one = plan_error("stream_test_resnet", (2048, 2048), 4096)
    model = timm.create_model("stream_test_resnet", memory_budget=4096)
    with pytest.raises(MemoryBudgetError) as info:
        model.stream_plan((2048, 2048), batch=4)
    assert info.value.minimum > one.minimum
    code, _, err = run_cli(capsys, "stream_test_resnet", "--image-size", "2048", "--memory-budget", "4096",
                           "--batch", "4")
    assert code == 2 and str(info.value) in err


def test_cli_without_budget_plans_at_the_tile_size_and_prints_the_peak(capsys):
    code, out, err = run_cli(capsys, "stream_test_resnet", "--image-size", "2048", "--tile-size", "512")
    assert code == 0, err
    plan = timm.create_model("stream_test_resnet", tile_size=512).stream_plan((2048, 2048))
    assert max(plan.pieces[0].largest_tile) <= 512 and plan.num_tiles > 1
    assert str(plan) in out
    assert "predicted peak memory of the streamed part" in out and "no --memory-budget given" in out


def test_cli_precision_converts_the_model(capsys):
    peaks = {}
    for precision in ("64-true", "32", "bf16-mixed", "16-true"):
        code, out, err = run_cli(capsys, "stream_test_resnet", "--image-size", "2048", "--tile-size", "512",
                                 "--precision", precision)
        assert code == 0, err
        line = next(x for x in out.splitlines() if x.startswith("stream_test_resnet:"))
        assert f"precision {precision}" in line
        plan = timm.create_model("stream_test_resnet", tile_size=512).to(PRECISION_DTYPES[precision]).stream_plan(
            (2048, 2048))
        peaks[precision] = plan.peak_memory
    assert peaks["64-true"] > peaks["32"] > peaks["bf16-mixed"] == peaks["16-true"]


def test_cli_precision_names_are_lightnings():
    """Every precision Lightning names for plain dtypes (not transformer-engine) is accepted, and only those."""
    from lightning.fabric import connector

    names = {str(n) for n in typing.get_args(connector._PRECISION_INPUT_STR)
             + typing.get_args(connector._PRECISION_INPUT_STR_ALIAS) if not str(n).startswith("transformer")}
    assert set(PRECISION_DTYPES) == names


def test_cli_refuses_a_tile_below_the_receptive_field_and_an_unknown_model(capsys):
    code, _, err = run_cli(capsys, "stream_resnet18", "--image-size", "4096", "--tile-size", "8")
    assert code == 2 and "tile" in err
    code, _, err = run_cli(capsys, "resnet18", "--image-size", "4096")
    assert code == 2 and "stream_resnet18" in err  # names the streaming model meant


def test_cli_help_lists_plan_and_says_mixed_precision_is_approximated(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert "    plan " in listed[listed.index("Available subcommands"):]
    with pytest.raises(SystemExit) as info:
        main(["plan", "--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--memory-budget" in help_text and "approximated by their half dtype" in help_text


# ------------------------------------------------------------------------------- create_model(memory_budget)


@pytest.fixture(scope="module")
def resnet18_2048_range() -> tuple[int, int]:
    """(smallest workable budget, un-tiled need) in bytes of stream_resnet18's streamed part at 2048²."""
    error = plan_error("stream_resnet18", (2048, 2048), "1KiB")
    untiled = timm.create_model("stream_resnet18", tile_size=512).stream_plan((2048, 2048)).untiled_memory
    assert error.minimum < untiled
    return error.minimum, untiled


@pytest.mark.parametrize("spelling", ["MiB string", "int bytes", "float bytes"])
@pytest.mark.parametrize("fraction", [0.2, 0.6])
def test_create_model_budget_bounds_the_predicted_peak(resnet18_2048_range, spelling, fraction):
    smallest, untiled = resnet18_2048_range
    wanted = max(smallest, int(untiled * fraction))
    budget = {"MiB string": f"{-(-wanted // 2 ** 20)}MiB", "int bytes": wanted, "float bytes": float(wanted)}[spelling]
    model = timm.create_model("stream_resnet18", memory_budget=budget)
    assert model.memory_budget == parse_memory(budget) >= wanted
    plan = model.stream_plan((2048, 2048))
    assert plan.memory_budget == parse_memory(budget)
    assert plan.peak_memory <= parse_memory(budget)
    assert plan.num_tiles > 1  # below the un-tiled need: it had to tile


def test_create_model_budget_with_tile_size_caps_the_tiles():
    roomy = "8GiB"  # enough for the whole 2048² image as one tile
    free = timm.create_model("stream_resnet18", memory_budget=roomy).stream_plan((2048, 2048))
    assert max(free.pieces[0].largest_tile) > 512  # without a cap the planner takes larger tiles ...
    for tile in (512, (256, 384)):
        capped = timm.create_model("stream_resnet18", memory_budget=roomy, tile_size=tile).stream_plan((2048, 2048))
        cap = (tile, tile) if isinstance(tile, int) else tile
        # ... tile_size bounds the first piece's tiles (in input pixels; later pieces are sized by memory)
        assert all(capped.pieces[0].largest_tile[i] <= cap[i] for i in range(2))
        assert capped.num_tiles > 1
        assert capped.peak_memory <= parse_memory(roomy)


def test_stream_plan_passes_batch_and_dtype_through():
    model = timm.create_model("stream_test_resnet", tile_size=512)
    one, four = model.stream_plan((2048, 2048)), model.stream_plan((2048, 2048), batch=4)
    assert four.peak_memory > one.peak_memory
    half = model.stream_plan((2048, 2048), dtype=torch.bfloat16)
    assert half.peak_memory < one.peak_memory


def test_features_only_model_takes_the_budget():
    size, kwargs = (2048, 2048), dict(features_only=True, out_indices=(1, 2, 3))
    error = plan_error("stream_resnet18", size, "1KiB", **kwargs)
    budget = int(error.minimum * 1.5)
    encoder = timm.create_model("stream_resnet18", memory_budget=budget, **kwargs)
    plan = encoder.stream_plan(size)
    assert plan.memory_budget == budget and plan.peak_memory <= budget
    assert len(plan.pieces) >= 3  # cut at the requested features
    # batch passes through: at the minimum for one image, two images do not fit
    tight = timm.create_model("stream_resnet18", memory_budget=error.minimum, **kwargs)
    assert tight.stream_plan(size).peak_memory <= error.minimum
    with pytest.raises(MemoryBudgetError) as info:
        tight.stream_plan(size, batch=2)
    assert info.value.minimum > error.minimum


def test_lightning_module_passes_memory_budget_from_model_kwargs():
    from timm_stream.lightning import StreamingClassifier

    module = StreamingClassifier("stream_test_resnet", model_kwargs={"memory_budget": "96MiB"})
    plan = module.model.stream_plan((4096, 4096))
    assert plan.memory_budget == 96 * 2 ** 20 and plan.peak_memory <= 96 * 2 ** 20


def test_a_budget_only_model_saves_and_reloads(tmp_path):
    """save_pretrained of a model whose tiles came from a memory_budget (tile_size None): the budget is the
    saving machine's, not saved; the reload gets the default tile, or a budget of its own."""
    model = timm.create_model("stream_test_resnet", memory_budget="1GiB", num_classes=3)
    assert model.tile_size is None
    timm_stream.save_pretrained(model, tmp_path)
    assert "chosen from a memory_budget" in (tmp_path / "README.md").read_text()
    assert "tile_size" not in json.loads((tmp_path / "config.json").read_text())["model_args"]
    again = timm_stream.load_pretrained(f"local-dir:{tmp_path}", memory_budget="512MiB")
    assert again.memory_budget == 512 * 2 ** 20
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    default = timm_stream.load_pretrained(f"local-dir:{tmp_path}")
    assert default.memory_budget is None and default.tile_size is not None
