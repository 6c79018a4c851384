"""Memory budgets (issue 12): the planner's predicted peak against the measured one, budgets respected,
kept tile graphs exact, too-small budgets named, and the cost model's parts."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from conftest import EXACT, Residual, assert_exact, timm_trunk
from torch import nn

from timm_stream.engine import MemoryBudgetError, StreamingCNN, format_bytes, parse_memory
from timm_stream.engine.function import ReduceSink, StreamFunction, TileRunner
from timm_stream.engine import streaming
from timm_stream.engine.memory import HEAP_FRAGMENTS, LiveBytes, TraceCost, host_cost, simulate_step, simulate_trace
from timm_stream.testing import randomize_, relative_error

PROBE = pathlib.Path(__file__).with_name("memory_probe.py")


def small_net(seed: int = 0) -> nn.Sequential:
    """Stride 4, two stages that the default stitching cuts apart, float64."""
    net = nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()),
        block=Residual(nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, 1, 1))),
        down=nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()),
        head=nn.Conv2d(16, 16, 3, 1, 1),
    ))
    return randomize_(net, seed).double()


def image(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text,expected", [("6GiB", 6 * 2**30), ("512 MiB", 512 * 2**20), ("20GB", 20 * 10**9),
                                           ("1.5e9", 1_500_000_000), ("2 kib", 2048), (1000, 1000),
                                           (2.5e3, 2500), ("7", 7)])
def test_parse_memory_reads_bytes_and_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["6 GiBs", "", "-1GB", 0, -5, True, None, "GB", float("nan"), [1]])
def test_parse_memory_refuses_what_it_cannot_read(bad):
    with pytest.raises(ValueError, match="memory_budget must be"):
        parse_memory(bad)


def test_format_bytes_uses_binary_units():
    assert format_bytes(3 * 2**30 // 2) == "1.50 GiB"
    assert format_bytes(512) == "512 B"


def test_streamingcnn_needs_a_tile_size_or_a_budget():
    with pytest.raises(ValueError, match="tile_size=.*memory_budget="):
        StreamingCNN(small_net())


# ------------------------------------------------------------------------------------------ simulation
def test_live_bytes_counts_allocations_not_views():
    base = torch.zeros(1000)  # made before the counter: not counted
    with LiveBytes() as counter:
        view = base[10:20].view(2, 5)  # views allocate nothing
        base.add_(1)  # neither does an in-place op
        assert counter.live == 0
        a = torch.zeros(250)  # 1000 bytes
        b = a * 2  # 1000 more
        assert counter.live == 2000
        del a
        assert counter.live == 1000
    assert counter.peak == 2000
    del view, b


def test_simulation_matches_the_live_bytes_of_a_real_step():
    """The meta simulation of forward + backward sees the same allocations as a real CPU run."""
    net = timm_trunk("resnet18").eval()
    predicted = simulate_step(net, (1, 3, 256, 256), torch.float32)
    x = torch.randn(1, 3, 256, 256)
    params = [p for p in net.parameters()]
    with LiveBytes() as counter:
        y = net(x)
        graph = counter.live
        torch.autograd.grad(y, params, torch.ones_like(y))
    # the real run also counts the output's gradient (ones_like), which the simulation leaves to the caller
    assert abs(graph - predicted.graph) <= 0.01 * predicted.graph
    assert abs(counter.peak - y.numel() * 4 - predicted.peak) <= 0.02 * predicted.peak


def test_host_cost_models_mapped_blocks_and_the_heap():
    """glibc's model: blocks from the threshold on are mapped (resident while alive, every byte fresh);
    smaller ones come from a heap that keeps its high-water mark resident and reuses freed memory."""
    sizes = [10, 100, 10, 30]
    events = [0, 1, ~0, 2, ~2, ~1, 3, ~3]  # a heap block, a mapped one, the heap block reused, then a larger one
    graph, peak, fresh = host_cost(sizes, events, None, mark=2)
    assert (graph, peak, fresh) == (110, 110, 0)  # a caching allocator: live bytes, nothing fresh
    graph, resident, fresh = host_cost(sizes, events, 50, mark=2)
    # heap: 10 (fresh), freed, 10 reused (not fresh), freed, 30 (20 more fresh); mapped: 100 (fresh)
    assert fresh == 10 + 100 + 20 and graph == 110
    # 100 mapped + the heap's 10 (and its fragments) while the mapped block lived; later the heap's 30
    assert resident == max(100 + int(10 * (1 + HEAP_FRAGMENTS)), int(30 * (1 + HEAP_FRAGMENTS)))
    assert host_cost(sizes, events, 5)[1:] == (110, 150)  # every block mapped: resident = live, all fresh


def test_trace_cost_interpolates_any_tile_from_two():
    """Block sizes linear in the tile's area: exact at the two samples, close to a direct simulation
    between them, with the allocator model applied to the interpolated trace."""
    net = timm_trunk("resnet18")
    piece = nn.Sequential(*list(net.children())[:5])
    traces = {n: simulate_trace(piece, (1, 3, n, n), torch.float32) for n in (192, 512, 960)}
    for threshold in (None, 2**20):
        cost = TraceCost(((192, 192), traces[192]), ((960, 960), traces[960]), threshold)
        assert cost((192, 192)) == traces[192].cost(threshold) and cost((960, 960)) == traces[960].cost(threshold)
        between, direct = cost((512, 512)), traces[512].cost(threshold)
        for field in ("graph", "peak", "forward_peak", "flops", "fresh", "forward_fresh"):
            assert abs(getattr(between, field) - getattr(direct, field)) <= 0.03 * max(getattr(direct, field), 1), field
    assert traces[960].cost(2**20).fresh > traces[960].cost(2**40).fresh > 0  # mapped blocks fault more


def test_a_grids_costliest_tile_need_not_be_its_largest():
    """With a host allocator the peak is not monotone in the tile area (blocks cross the mmap threshold:
    the review measured 20.3 MiB at 272² and 18.6 MiB at 280² on a regnet stem), so the cost model takes
    the most over the grid's distinct tile sizes."""
    from timm_stream.engine.budget import PieceCost, peak_memory
    from timm_stream.engine.memory import StepCost

    def cost(size):  # the smaller (border) tile keeps more resident than the larger one
        peak = 100 if tuple(size) == (10, 12) else 60
        return StepCost(graph=10, peak=peak, forward_peak=20, flops=1)

    piece = PieceCost(rows=(12, 10), cols=(12,), cost=cost, map_bytes=0, input_map_bytes=0, param_bytes=0)
    assert piece.largest.peak == 100
    assert peak_memory([piece], [0]) >= 100


def test_cpu_plans_weigh_page_faults_not_only_flops(monkeypatch):
    """Measured at 4096² on 2 CPU cores (resnet18 trunk): 2x2 tiles keeping one graph took 42.5 s, 3x3
    tiles recomputing every one 37.7 s (un-tiled 36.1 s): larger tiles' blocks are mapped and fault in
    fresh pages. Counted in FLOPs alone the planner picked the larger tiles; with the pages, smaller ones."""
    trunk = timm_trunk("resnet18")
    budget = int(0.4 * 7.04 * 2**30)

    def first_tile() -> int:
        plan = StreamingCNN(trunk, memory_budget=budget, preprocess=lambda t: t.float() / 255).plan(
            (4096, 4096), torch.uint8)
        assert plan.peak_memory <= budget
        return max(plan.pieces[0].largest_tile)

    with_faults = first_tile()
    monkeypatch.setattr(streaming, "CPU_FRESH_FLOPS", 0.0)
    assert first_tile() > with_faults


def test_each_plan_runs_under_the_allocator_it_was_costed_for(monkeypatch):
    """On the CPU every plan is costed under two glibc mmap thresholds (32 MiB: heap reuse, few page
    faults; 256 KiB: every block mapped, resident = live); forward sets the chosen plan's threshold."""
    from timm_stream.engine.function import HOST_MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD

    assert StreamingCNN(small_net(), 24)._host_thresholds() == (HOST_MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD)
    assert StreamingCNN(small_net(), 24).plan((64, 56)).mmap_threshold == HOST_MMAP_THRESHOLD
    fixed = []
    monkeypatch.setattr(streaming, "use_fixed_mmap_threshold", fixed.append)
    s = StreamingCNN(small_net(), 24, memory_budget="64MiB")
    plan = s.plan((64, 56), torch.float64)
    assert plan.mmap_threshold in (HOST_MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD)
    s(image(1, 3, 64, 56)).sum().backward()
    assert fixed == [plan.mmap_threshold]
    s.memory_budget = 64.0 * 2**20  # a float budget set later plans and runs too
    s(image(1, 3, 64, 56))


@pytest.mark.parametrize("arch,size", [("regnetx_002", 448), ("resnet18", 512)])
def test_the_named_minimum_is_a_floor(arch, size):
    """Every budget from the named minimum up plans (the reviewer's case: regnetx_002 at 448² failed at
    1.02x the minimum when the allocator model followed the budget)."""
    import timm

    model = timm.create_model(arch)
    trunk = nn.Sequential(*list(model.children())[:-1]) if arch.startswith("regnet") else timm_trunk(arch)
    with pytest.raises(MemoryBudgetError) as info:
        StreamingCNN(trunk, memory_budget="1KiB").plan((size, size))
    minimum = info.value.minimum
    for factor in (1.0, 1.02, 1.1, 1.3, 1.5, 2.0):
        plan = StreamingCNN(trunk, memory_budget=int(minimum * factor)).plan((size, size))
        assert plan.peak_memory <= int(minimum * factor), factor


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("pooled", [False, True])
def test_every_number_of_kept_tile_graphs_gives_the_same_gradients(pooled):
    """Kept tiles (graph from forward) and recomputed tiles give identical results, for every count."""
    net = small_net()
    s = StreamingCNN(net, 28, stitch="none", pool="avg" if pooled else None)
    x = image(2, 3, 64, 56)
    plan = s.plan((64, 56), torch.float64)
    n = plan.pieces[0].num_tiles
    assert n >= 6, str(plan)
    params = [p for p in net.parameters()]
    results = []
    for keep in range(n + 1):
        runner_plan = s.plan((64, 56), torch.float64)
        sink = None
        if pooled:
            sink = ReduceSink(runner_plan.pieces[0], s.pool, None)
        runner = TileRunner(s._pieces[0].module, runner_plan.pieces[0], params, torch.device("cpu"),
                            keep_tiles=keep, sink=sink)
        inp = x.clone().requires_grad_(True)
        out = StreamFunction.apply(runner, inp, *params)
        out = s.pool.finalize((out,) if isinstance(out, torch.Tensor) else tuple(out), sink.state) if pooled else out
        grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, [inp] + params, grad)
        results.append((out.detach(), grads))
    reference = net(x.clone()).mean(dim=(2, 3)) if pooled else net(x.clone())
    assert relative_error(results[0][0], reference) <= EXACT
    for keep, (out, grads) in enumerate(results[1:], start=1):
        assert torch.equal(out, results[0][0]), keep
        for g, g0 in zip(grads, results[0][1]):
            assert relative_error(g, g0) <= 1e-13, keep  # summation order only


def _budgets(s: StreamingCNN, size, batch: int) -> list[int]:
    """Budgets from the smallest workable one up to past the un-tiled need."""
    with pytest.raises(MemoryBudgetError) as info:
        StreamingCNN(s.module, memory_budget=1).plan(size, torch.float64, input_grad=True, batch=batch)
    low = info.value.minimum
    high = s.plan(size, torch.float64, input_grad=True, batch=batch).untiled_memory
    return [low, int(low * 1.5), (low + high) // 2, high]


def test_exact_for_every_budget_and_the_plans_differ():
    net = small_net()
    size = (64, 56)
    reference = StreamingCNN(net, 24)
    plans = set()
    for budget in _budgets(reference, size, batch=2):
        s = StreamingCNN(net, memory_budget=budget)
        plan = s.plan(size, torch.float64, input_grad=True, batch=2)
        assert plan.peak_memory <= budget
        plans.add((tuple(p.grid for p in plan.pieces), plan.kept))
        assert_exact(s, image(2, 3, *size))
    assert len(plans) >= 3, plans  # tiles and kept graphs change with the budget


def test_exact_with_a_budget_on_timm_resnet_pooled_and_masked():
    trunk = randomize_(timm_trunk("resnet18"), seed=3).double()
    s = StreamingCNN(trunk, memory_budget="120MiB", pool="avg")
    size = (192, 160)
    plan = s.plan(size, torch.float64, input_grad=True)
    assert plan.num_tiles > 2 and plan.peak_memory <= 120 * 2**20, str(plan)
    mask = torch.zeros(1, 1, 6, 5, dtype=torch.bool)
    mask[:, :, 1:5, :3] = True
    from timm_stream.testing import compare_streaming

    c = compare_streaming(s, image(1, 3, *size), lambda v: setattr(s, "streaming", v), mask=mask)
    assert c.worst <= EXACT, c


# ------------------------------------------------------------------------------------------ the planner
def test_a_budget_that_holds_the_untiled_run_runs_untiled():
    s = StreamingCNN(small_net(), memory_budget="1GiB")
    plan = s.plan((64, 56), torch.float64)
    assert all(p.num_tiles == 1 for p in plan.pieces)
    assert plan.relative_time == 1.0 and plan.fits_untiled
    assert plan.peak_memory == plan.untiled_memory


def test_too_small_a_budget_names_the_smallest_that_works():
    net = small_net()
    with pytest.raises(MemoryBudgetError, match="too small.*at least") as info:
        StreamingCNN(net, memory_budget="1KiB").plan((64, 56), torch.float64)
    minimum = info.value.minimum
    assert format_bytes(minimum) in str(info.value)
    plan = StreamingCNN(net, memory_budget=minimum).plan((64, 56), torch.float64)  # the minimum works
    assert plan.peak_memory <= minimum
    with pytest.raises(MemoryBudgetError):  # and forward raises it too
        StreamingCNN(net, memory_budget=minimum - 1)(image(1, 3, 64, 56))


def test_tile_size_caps_the_planners_tiles():
    net = small_net()
    s = StreamingCNN(net, 24, memory_budget="1GiB")
    plan = s.plan((64, 56), torch.float64)
    assert plan.pieces[0].largest_tile[0] <= 24 and plan.pieces[0].largest_tile[1] <= 24
    assert not all(p.num_tiles == 1 for p in plan.pieces)


def test_larger_budgets_never_predict_more_time():
    trunk = timm_trunk("resnet18")
    times = []
    for budget in ("300MiB", "600MiB", "1.2GiB", "3GiB"):
        plan = StreamingCNN(trunk, memory_budget=budget).plan((2048, 2048))
        assert plan.peak_memory <= parse_memory(budget)
        times.append(plan.relative_time)
    assert times == sorted(times, reverse=True) and times[-1] == 1.0, times


def test_plan_reports_predictions_without_a_budget():
    s = StreamingCNN(small_net(), 24)
    plan = s.plan((64, 56), torch.float64)
    assert plan.peak_memory > 0 and plan.relative_time > 1 and plan.untiled_memory > plan.peak_memory
    assert plan.memory_budget is None and not plan.fits_untiled
    assert "predicted for batch 1" in str(plan)


def test_a_65536_slide_is_planned_in_seconds_without_allocating():
    """Shapes only: planning a whole slide allocates nothing of its size."""
    trunk = timm_trunk("resnet18")
    s = StreamingCNN(trunk, memory_budget="2GiB", pool="avg", preprocess=lambda t: t.float() / 255)
    with RealBytes() as counter:
        plan = s.plan((65536, 65536), torch.uint8, lazy=True)
    assert plan.peak_memory <= 2 * 2**30 and plan.num_tiles > 100
    assert plan.untiled_memory > 1000 * 2**30  # the un-tiled run would need a terabyte
    assert counter.peak < 2**20, counter.peak


class RealBytes(LiveBytes):
    """Counts only tensors that hold memory (not the simulations' meta tensors)."""

    def _track(self, t):
        if t.device.type != "meta":
            super()._track(t)


# ------------------------------------------------------------------------------------------ measured
def _probe(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(PROBE), json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("spec", [
    {"arch": "resnet18", "size": 1024, "budget": "150MiB"},  # tiles and kept graphs chosen by the budget
    {"arch": "resnet18", "size": 1024, "tile": 384, "budget": "1GiB"},  # tiles capped: every graph kept
    {"arch": "resnet18", "size": 768, "budget": "250MiB", "batch": 2, "pool": "avg"},  # pooled, batch 2
    {"arch": "regnetx_002", "size": 1024, "budget": "120MiB"},  # another network
    {"arch": "resnet18", "size": 512, "budget": "180MiB"},  # the un-tiled plan under a budget (was +55%)
], ids=["resnet18-budget", "resnet18-capped-tile", "resnet18-pooled-batch2", "regnetx-budget", "untiled-plan"])
def test_predicted_peak_is_within_20_percent_of_measured_rss(spec):
    result = _probe(spec)
    predicted, measured = result["predicted"], result["measured"]
    assert abs(measured / predicted - 1) <= 0.2, (predicted, measured, result["plan"])
    if "budget" in spec:
        assert measured <= 1.1 * parse_memory(spec["budget"]), (measured, result["plan"])


def test_lazy_pooled_input_with_a_budget_is_exact_and_reads_tiles_only():
    from timm_stream.testing import RecordingLazyImage

    trunk = randomize_(timm_trunk("resnet18"), seed=4).double()
    s = StreamingCNN(trunk, memory_budget="150MiB", pool="avg")
    data = image(1, 3, 448, 384, seed=2)
    lazy = RecordingLazyImage(data)
    plan = s.plan((448, 384), torch.float64, lazy=True)
    assert plan.num_tiles > 1 and plan.peak_memory <= 150 * 2**20, str(plan)
    out = s(lazy)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    assert max((r.stop - r.start) * (c.stop - c.start) for r, c in lazy.reads) < 448 * 384  # tiles, not the image
    trunk.zero_grad(set_to_none=True)
    reference = trunk(data).mean(dim=(2, 3))
    reference.sum().backward()
    assert relative_error(out, reference) <= EXACT
    for n, p in trunk.named_parameters():
        assert relative_error(grads[n], p.grad) <= EXACT, n


def test_whole_slide_plans_stay_flat_in_the_slide_size():
    """Lazy + pooled: the planner keeps the predicted peak within the budget whatever the slide size
    (one piece: nothing grows with the image)."""
    trunk = timm_trunk("resnet18")
    s = StreamingCNN(trunk, memory_budget="1GiB", pool="avg", preprocess=lambda t: t.float() / 255)
    peaks = [s.plan((n, n), torch.uint8, lazy=True).peak_memory for n in (8192, 32768, 131072)]
    assert max(peaks) <= 2**30 and max(peaks) <= 1.15 * min(peaks), peaks
