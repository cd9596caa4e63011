"""The one launch place (fastcomer.ops.triton_launch): every Triton launcher of fastcomer.ops
goes through it, so the static report records every kernel the library launches, and every
launch (and a search's CUDA graphs) runs on its tensors' device, not the current one. No GPU:
the CUDA device calls are faked, and a tensor says it is on cuda:1 without being there."""
import ast
import contextlib
import importlib
import inspect
import os
import pkgutil

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":  # jit functions are interpreted objects then
    pytest.skip("the launches are recorded outside the interpreter", allow_module_level=True)

import fastcomer.ops  # noqa: E402
from fastcomer.ops.registry import OPS  # noqa: E402
from fastcomer.ops.triton_launch import TritonLaunch, recorded  # noqa: E402
from fastcomer.search.cuda_graphs import StepGraphs  # noqa: E402


def jit_functions():
    """Every @triton.jit function defined in a module of fastcomer.ops, by qualified name."""
    found = {}
    for info in pkgutil.walk_packages(fastcomer.ops.__path__, "fastcomer.ops."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction) and value.fn.__module__ == info.name:
                found[f"{info.name}.{name}"] = value
    return found


def reached_from(kernel, reached):
    """The jit functions `kernel` calls, transitively (names resolved in its module)."""
    name = f"{kernel.fn.__module__}.{kernel.fn.__name__}"
    if name in reached:
        return
    reached.add(name)
    for node in ast.walk(ast.parse(inspect.cleandoc("\n" + inspect.getsource(kernel.fn)))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = kernel.fn.__globals__.get(node.func.id)
            if isinstance(callee, triton.runtime.JITFunction):
                reached_from(callee, reached)


def test_every_jit_function_is_reached_by_a_reported_variant():
    """The report's variants are the launchers' own launches (recorded on meta tensors): each
    @triton.jit function of fastcomer.ops is launched by one, or called from one that is."""
    reached = set()
    for op in OPS.values():
        for variant in op.kernel_variants("small", 90):
            reached_from(variant.kernel, reached)
    defined = jit_functions()
    assert len(defined) >= 15  # the scan finds the kernels (the five ops' modules)
    assert set(defined) - reached == set(), "jit functions no reported variant reaches"


def test_variants_are_specialised_as_triton_specialises_a_launch():
    """Pointers and multiples of 16 get tt.divisibility, ints equal to 1 become constants, and
    num_stages is Triton's default where a launcher sets none (the self-attention's unit strides)."""
    (variant,) = [v for v in OPS["self_attention_step"].kernel_variants("small", 90) if v.dtype == "fp32"]
    spec = variant.launch.specialised(90)
    names = variant.kernel.arg_names
    assert spec.signature["x_ptr"] == "*fp32" and spec.attrs[(names.index("x_ptr"),)] == [["tt.divisibility", 16]]
    assert spec.signature["stride_k_pos"] == "constexpr" and spec.constexprs[(names.index("stride_k_pos"),)] == 1
    assert spec.signature["d"] == "i32" and spec.attrs[(names.index("d"),)] == [["tt.divisibility", 16]]  # 256
    assert spec.options.num_warps == 8 and spec.options.num_stages == 3


def test_recorded_launches_are_not_run():
    class Kernel:
        def __getitem__(self, grid):
            raise AssertionError("a recorded launch ran")

    with recorded() as launches:
        TritonLaunch(Kernel(), (1,), (torch.empty(2, device="meta"),), {}).run()
    assert [launch.grid for launch in launches] == [(1,)]


class OnCuda(torch.Tensor):
    """A storage-less tensor that reports a CUDA device (nothing reads its data here)."""

    @staticmethod
    def __new__(cls, index):
        return torch.Tensor._make_wrapper_subclass(cls, (2,), dtype=torch.float32, device=torch.device("cuda", index))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"{func} on a fake CUDA tensor")


@pytest.fixture
def fake_devices(monkeypatch):
    """torch.cuda's current device as a list: [current]; torch.cuda.device sets it for a block."""
    current = [0]

    @contextlib.contextmanager
    def device(where):
        previous, current[0] = current[0], torch.device(where).index
        try:
            yield
        finally:
            current[0] = previous

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", lambda where: (entered.append(where), device(where))[1])
    return current, entered


@pytest.mark.parametrize("index", [0, 1])
def test_a_launch_runs_on_its_tensors_device(fake_devices, index):
    current, entered = fake_devices
    ran_on = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **options: ran_on.append(current[0])

    TritonLaunch(Kernel(), (1,), (3, OnCuda(index)), {"BLOCK": 16}).run()
    assert ran_on == [index] and current == [0]
    assert len(entered) == index  # no device guard when the tensors are on the current device


def test_cuda_graphs_warm_up_and_capture_on_the_search_device(fake_devices, monkeypatch):
    current, _ = fake_devices
    steps_on = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            steps_on.append(("replay", current[0]))

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None, **kwargs: contextlib.nullcontext())
    graphs = StepGraphs(lambda window: steps_on.append(("step", current[0])), True, device=torch.device("cuda", 1))
    for _ in range(3):  # warm-up on a side stream, capture, replay
        graphs(4)
    assert steps_on == [("step", 1), ("step", 1), ("replay", 1), ("replay", 1)] and current == [0]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_layer_on_the_second_gpu_runs_there():
    """With cuda:0 current, the Triton feed-forward step of a layer on cuda:1 matches torch's."""
    from fastcomer.model.decoder import TransformerDecoderLayer
    from fastcomer.ops.feed_forward_step import feed_forward_step

    torch.manual_seed(0)
    layer = TransformerDecoderLayer(256, 8, 1024, 0.0).to("cuda:1").eval()
    x, attended = torch.randn(2, 20, 256, device="cuda:1").unbind(0)
    with torch.cuda.device(0), torch.no_grad():
        fused = feed_forward_step(x, attended, layer, backend="triton")
        torch.cuda.synchronize(1)
        reference = feed_forward_step(x, attended, layer, backend="torch")
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
