"""setup.py's build flags: PTX for GPUs newer than sm_90, OpenMP kept in CUDA builds."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_namespace():
    """setup.py's definitions without running its top-level setup(...) call."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    body = [node for node in tree.body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) == "setup")]
    assert len(body) == len(tree.body) - 1, "setup.py should call setup(...) exactly once at top level"
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "hecate_setup_under_test"}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def test_cuda_build_emits_sm80_sm90_and_compute90_ptx():
    flags = _setup_namespace()["build_flags"](with_cuda=True)
    nvcc = flags["nvcc"]
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc
    assert "-gencode=arch=compute_90,code=sm_90" in nvcc
    # PTX: the driver JIT-compiles it on GPUs newer than sm_90 (Blackwell...).
    assert "-gencode=arch=compute_90,code=compute_90" in nvcc


@pytest.mark.parametrize("with_cuda", [False, True])
def test_openmp_in_every_build(with_cuda):
    flags = _setup_namespace()["build_flags"](with_cuda=with_cuda)
    assert "-fopenmp" in flags["cxx"]
    assert "-fopenmp" in flags["link"]
    assert ("nvcc" in flags) == with_cuda


def test_extension_passes_the_flags(monkeypatch):
    ns = _setup_namespace()
    made = {}

    def record(kind):
        def make(name, sources, **kw):
            made.update(kind=kind, name=name, sources=sources, **kw)
            return made
        return make

    ext = ns["cpp_extension"]
    monkeypatch.setattr(ext, "CUDAExtension", record("cuda"))
    monkeypatch.setattr(ext, "CppExtension", record("cpu"))
    for want_cuda in (False, True):
        made.clear()
        ns["_want_cuda"] = lambda: want_cuda
        ns["_extension"]()
        assert made["kind"] == ("cuda" if want_cuda else "cpu")
        assert "-fopenmp" in made["extra_compile_args"]["cxx"]
        assert "-fopenmp" in made["extra_link_args"]
        if want_cuda:
            assert "-gencode=arch=compute_90,code=compute_90" in made["extra_compile_args"]["nvcc"]
            assert any(s.endswith(".cu") for s in made["sources"])


def test_archs_override_builds_one_gpu_with_its_ptx(monkeypatch):
    ns = _setup_namespace()
    monkeypatch.setenv("HECATE_CUDA_ARCHS", "90")
    nvcc = ns["build_flags"](with_cuda=True)["nvcc"]
    assert [f for f in nvcc if f.startswith("-gencode")] == [
        "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError, match="HECATE_CUDA_ARCHS"):
        ns["nvcc_arch_flags"](";")
