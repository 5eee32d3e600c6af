"""The package must import and work when the C++ extension cannot be built or is disabled; the
build cache is keyed by torch version and target ISA, and never loads a build this CPU cannot run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pvkernels import _backend

SNIPPET = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import pvkernels
print("WARN:", " | ".join(str(w.message) for w in caught))
print("CPP:", pvkernels.cpp_available())
x = torch.rand(2, 3, 8, 8)
v = pvkernels.pseudo_video(x, **pvkernels.schedules.linear_blur(3, 1.0))   # auto -> reference
print("OK:", tuple(v.shape))
try:
    pvkernels.pseudo_video(x, **pvkernels.schedules.linear_blur(3, 1.0), backend="cpp")
except RuntimeError as e:
    print("CPP-ERROR:", e)
"""


def run_code(code, env_extra):
    env = dict(os.environ, **env_extra)
    env.pop("PVKERNELS_BACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)


def run(env_extra, tmp_path):
    return run_code(SNIPPET, {"PVKERNELS_BUILD_DIR": str(tmp_path), **env_extra})


@pytest.mark.parametrize("env, reason", [({"CXX": "/bin/false"}, "could not be built"),
                                         ({"PVKERNELS_NO_CPP": "1"}, "PVKERNELS_NO_CPP")])
def test_import_survives_without_cpp(tmp_path, env, reason):
    result = run(env, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "CPP: False" in out and "OK: (2, 3, 3, 8, 8)" in out
    assert "CPP-ERROR:" in out and "C++ extension is unavailable" in out and reason in out
    if "CXX" in env:  # a failed build is reported once, clearly
        assert out.count("could not be built") == 1, out


# ---- the build cache is keyed by torch version and target ISA ---------------------------------
LOAD = "import pvkernels, pvkernels._backend as b; print('CPP:', b.cpp_available(), b.cpp_isa())"


def test_target_isa_of_the_x86_levels():
    if "__x86_64__" not in _backend._target_macros(()):
        pytest.skip("x86-64 levels only")
    v3, v4, base = (_backend.target_isa([f"-march={m}"]) for m in ("x86-64-v3", "x86-64-v4", "x86-64"))
    assert v3["simd"] == "avx2" and {"avx", "avx2", "fma", "f16c", "bmi2"} <= set(v3["features"])
    assert "avx512f" not in v3["features"]
    assert v4["simd"] == "avx512" and {"avx512f", "avx512bw", "avx512vl", "avx2"} <= set(v4["features"])
    assert base["simd"] == "plain" and "avx" not in base["features"]
    assert _backend.target_isa(["-march=x86-64-v4", "-DPVKERNELS_SIMD_PLAIN"])["simd"] == "plain"
    # one cache folder per ISA (and per torch version), so builds for different CPUs never meet
    dirs = {_backend.build_dir(isa) for isa in (v3, v4, base)}
    tag = "torch" + torch.__version__.replace("+", "_").replace(".", "_")
    assert len(dirs) == 3 and all(d.name.startswith(tag) for d in dirs)


def test_native_build_is_loadable_here():
    # every feature -march=native implies must be one this CPU lists (else the feature-name table
    # of _backend is wrong and every native build would be refused)
    native = _backend.target_isa(["-march=native"])
    assert _backend.missing_features(native) == [], native


def _loaded_build():
    isa = _backend._cpp_state["isa"]
    if isa is None:
        pytest.skip(f"the C++ extension is unavailable: {_backend._cpp_state['error']}")
    return isa, _backend.build_dir(isa)


def test_cached_build_of_a_lacking_isa_is_rebuilt_not_loaded(tmp_path):
    isa, built = _loaded_build()
    env = {"PVKERNELS_MARCH": isa["march"]}
    # a copy of this session's build in a fresh cache: loaded as it is (no compile)
    target = tmp_path / built.name
    subprocess.run(["cp", "-a", str(built), str(target)], check=True)
    result = run_code(LOAD, {**env, "PVKERNELS_BUILD_DIR": str(tmp_path)})
    assert f"CPP: True {isa['simd']}" in result.stdout, result.stderr
    assert "compiling" not in result.stderr and "rebuilding" not in result.stderr, result.stderr
    # the same build recorded as targeting a feature this CPU lacks: refused and rebuilt (the
    # rebuild fails here on purpose, with a compiler that only preprocesses, so nothing is compiled)
    cxx = tmp_path / "preprocess-only-cxx"
    cxx.write_text('#!/bin/sh\ncase " $* " in *" -dM "*) exec c++ "$@";; esac\nexit 1\n')
    cxx.chmod(0o755)
    cpu = _backend.cpu_features() or frozenset()
    lacking = next(f for f in [*_backend._FEATURE_MACROS.values(), "pvkernels_test_feature"] if f not in cpu)
    record = json.loads((target / "isa.json").read_text())
    (target / "isa.json").write_text(json.dumps({**record, "features": record["features"] + [lacking]}))
    result = run_code(LOAD, {**env, "PVKERNELS_BUILD_DIR": str(tmp_path), "CXX": str(cxx)})
    assert "CPP: False None" in result.stdout, result.stdout + result.stderr
    assert f"targets {lacking}, which this CPU lacks: rebuilding" in result.stderr, result.stderr
    assert "could not be built" in result.stderr
    assert not any(target.glob("pvkernels_cpp*.so"))  # the old build is gone, not loaded


# one compiler flag per feature of _FEATURE_MACROS (all known to GCC >= 12 and Clang >= 14): a target
# that adds one feature to the baseline, so a CPU lacking any of them gives the test a target
_FEATURE_FLAGS = {
    "avx512_vp2intersect": "-mavx512vp2intersect", "gfni": "-mgfni", "vaes": "-mvaes", "avx512_fp16": "-mavx512fp16", "amx_tile": "-mamx-tile", "amx_bf16": "-mamx-bf16", "amx_int8": "-mamx-int8",
    "avx512_bf16": "-mavx512bf16", "avx_vnni": "-mavxvnni", "avx512_vnni": "-mavx512vnni",
    "avx512_vpopcntdq": "-mavx512vpopcntdq", "avx512_bitalg": "-mavx512bitalg", "avx512_vbmi2": "-mavx512vbmi2",
    "avx512vbmi": "-mavx512vbmi", "avx512ifma": "-mavx512ifma", "avx512f": "-mavx512f", "avx2": "-mavx2",
}


def test_march_the_cpu_lacks_is_refused(tmp_path):
    cpu = _backend.cpu_features()
    if cpu is None or "__x86_64__" not in _backend._target_macros(()):
        pytest.skip("x86-64 with /proc/cpuinfo flags only")
    lacking = [(f, flag) for f, flag in _FEATURE_FLAGS.items() if f not in cpu]
    if not lacking:
        pytest.skip(f"this CPU has every feature a target flag was tried for: {sorted(_FEATURE_FLAGS)}")
    feature, flag = lacking[0]
    march = f"-march=x86-64 {flag}"
    assert _backend.missing_features(_backend.target_isa(march.split())) == [feature]
    result = run_code(LOAD, {"PVKERNELS_MARCH": march, "PVKERNELS_BUILD_DIR": str(tmp_path)})
    assert "CPP: False None" in result.stdout, result.stdout + result.stderr
    assert f"targets {feature}, which this CPU lacks" in result.stderr and "compiling" not in result.stderr


def test_march_the_compiler_does_not_know_is_reported(tmp_path):
    with pytest.raises(ValueError, match="does not know -march=pvkernels-no-such-cpu"):
        _backend.target_isa(["-march=pvkernels-no-such-cpu"])
    result = run_code(LOAD, {"PVKERNELS_MARCH": "-march=pvkernels-no-such-cpu", "PVKERNELS_BUILD_DIR": str(tmp_path)})
    assert result.returncode == 0 and "CPP: False None" in result.stdout, result.stdout + result.stderr
    cxx = os.environ.get("CXX", "c++")
    assert f"the compiler ({cxx}) does not know -march=pvkernels-no-such-cpu" in result.stderr, result.stderr
    assert "CalledProcessError" not in result.stderr and "Traceback" not in result.stderr


def test_auto_takes_the_reference_where_the_loaded_build_loses(monkeypatch):
    # a crossover of the loaded build's ISA vetoes "auto" at its shape class only; an explicit
    # backend="cpp" still runs cpp
    import pvkernels
    from pvkernels.ops import attention

    isa, _ = _loaded_build()
    monkeypatch.delenv("PVKERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "CROSSOVERS", (("spatial_attention", isa["simd"], "float32", ("n", ">=", 20)),))
    calls = []
    reference = attention.attention_reference
    monkeypatch.setattr(attention, "attention_reference", lambda *a: calls.append(a[0].shape[2]) or reference(*a))
    for S in (19, 20):
        q, k, v = (torch.randn(2, 3, S, 2, 8) for _ in range(3))
        out = pvkernels.spatial_attention(q, k, v)
        torch.testing.assert_close(out, reference(q, k, v, None, False, False), rtol=1e-4, atol=1e-5)
        pvkernels.spatial_attention(q, k, v, backend="cpp")
        pvkernels.spatial_attention(q.half(), k.half(), v.half())  # another dtype: another class
    assert calls == [20]


def test_triton_crossovers_veto_triton_only():
    # "cuda" rows are triton's on a GPU (spatial / temporal attention streamed past n 32); "*" rows
    # every cpp build's, never triton's
    spatial = _backend.fused_slower("spatial_attention", torch.float32, n=33, head_dim=32)
    assert spatial("triton")
    assert not _backend.fused_slower("spatial_attention", torch.float32, n=32, head_dim=32)("triton")
    assert _backend.fused_slower("temporal_attention", torch.bfloat16, n=64, head_dim=32)("triton")
    assert not _backend.fused_slower("lfq_entropy", d=8)("triton") and not spatial("reference")
    if _backend.cpp_available():
        assert _backend.fused_slower("lfq_entropy", d=8)("cpp")
        assert spatial("cpp") == (_backend.cpp_isa() == "plain")


def test_a_crossover_of_several_conditions_needs_them_all(monkeypatch):
    # spatial attention from n 256 at head dims up to 48 (the AVX2 row): n and the head dim of the call
    import pvkernels
    from pvkernels.ops import attention

    isa, _ = _loaded_build()
    monkeypatch.delenv("PVKERNELS_BACKEND", raising=False)
    row = ("spatial_attention", isa["simd"], "float32", (("n", ">=", 20), ("head_dim", "<=", 8)))
    monkeypatch.setattr(_backend, "CROSSOVERS", (row,))
    assert "| n >= 20 and head_dim <= 8 |" in _backend.crossover_table()
    calls = []
    reference = attention.attention_reference
    monkeypatch.setattr(attention, "attention_reference", lambda *a: calls.append(a[0].shape[2:]) or reference(*a))
    for S, D in ((19, 8), (20, 8), (20, 12), (33, 4)):
        q, k, v = (torch.randn(2, 3, S, 2, D) for _ in range(3))
        out = pvkernels.spatial_attention(q, k, v)
        torch.testing.assert_close(out, reference(q, k, v, None, False, False), rtol=1e-4, atol=1e-5)
    assert calls == [(20, 2, 8), (33, 2, 4)]


def test_crossovers_are_a_table_the_readme_prints():
    ops = ("pseudo_video", "vq_lookup", "spatial_attention", "temporal_attention", "lfq_entropy")
    for op, isa, dtype, condition in _backend.CROSSOVERS:
        assert op in ops and isa in ("avx512", "avx2", "plain", "*", "cuda"), (op, isa)
        assert dtype in ("*", "float32", "float16", "bfloat16")
        for c in _backend._conditions(condition):
            assert len(c) == 3 and isinstance(c[0], str) and c[1] in _backend._COMPARE, condition
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert _backend.crossover_table() in readme, "README: print pvkernels._backend.crossover_table() as it is now"
