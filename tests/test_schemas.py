"""The op schemas the Python side declares (pvkernels/ops/*.py: the Triton custom ops, the fake
kernels' signatures) are the ones the C++ extension registers (csrc/registration.cpp). Both are
written by hand; a mismatch would surface only as a wrong trace under torch.compile or as a
backend that cannot stand in for another."""
import pytest
import torch

from pvkernels import _backend
from pvkernels.ops import attention, lfq, pseudo_video, vq

# every op of the namespace pvkernels_cpp -> the schema (without its name) its Python module declares
DECLARED = {
    "pseudo_video": (pseudo_video, "_SCHEMA"),
    "vq_lookup": (vq, "_SCHEMA"),
    "vq_lookup_topk": (vq, "_SCHEMA_TOPK"),
    "attention_fwd": (attention, "_FWD_SCHEMA"),
    "attention_bwd": (attention, "_BWD_SCHEMA"),
    "lfq_entropy_fwd": (lfq, "_FWD_SCHEMA"),
    "lfq_entropy_bwd": (lfq, "_BWD_SCHEMA"),
}
TEST_HOOKS = {"philox_normal"}  # registered for tests/test_pseudo_video.py, not declared in Python
UTILITIES = {"release_output_cache": "() -> int"}  # pvkernels.empty_cache(): no tensors, never traced

needs_cpp = pytest.mark.skipif(not _backend.cpp_available(), reason="the C++ extension is unavailable")


def signature(schema) -> str:
    """A schema as text without its namespace and name: "(Tensor z, ...) -> (Tensor, Tensor)"."""
    return "(" + str(schema).partition("(")[2]


def declared(op: str):
    module, name = DECLARED[op]
    return torch._C.parse_schema(f"pvkernels_cpp::{op}{getattr(module, name)}")


@needs_cpp
def test_every_cpp_op_has_a_python_schema():
    names = torch._C._dispatch_get_all_op_names()
    registered = {name.split("::", 1)[1].split(".")[0] for name in names if name.startswith("pvkernels_cpp::")}
    assert registered == set(DECLARED) | TEST_HOOKS | set(UTILITIES)
    for op, schema in UTILITIES.items():
        assert signature(getattr(torch.ops.pvkernels_cpp, op).default._schema) == schema


@needs_cpp
@pytest.mark.parametrize("op", sorted(DECLARED))
def test_python_schema_is_the_cpp_schema(op):
    registered = getattr(torch.ops.pvkernels_cpp, op).default._schema
    assert signature(declared(op)) == signature(registered), f"pvkernels_cpp::{op}: Python and C++ differ"
    assert declared(op) == registered  # the parsed schemas too (aliasing, defaults)


@pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("op", sorted(DECLARED))
def test_triton_op_takes_the_declared_schema(op):
    # the Triton custom op stands in for the C++ one: same arguments and results
    registered = getattr(torch.ops.pvkernels, f"{op}_triton").default._schema
    assert signature(registered) == signature(declared(op))
