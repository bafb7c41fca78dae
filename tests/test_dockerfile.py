"""The Dockerfile, linted without Docker: it parses (Docker's own Go parser, the `dockerfile`
package, when installed), every RUN is valid shell, the image installs the extras whose GPU
tests it should run, and what its commands name exists in the build context."""
import fnmatch
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _instructions():
    """[(INSTRUCTION, text)] with line continuations joined and comments dropped."""
    out, pending = [], ""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        for line in f:
            stripped = line.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if stripped.startswith("#"):  # a comment inside a continued instruction
                continue
            pending += line.rstrip("\n")
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def test_docker_go_parser_accepts_it():
    dockerfile = pytest.importorskip("dockerfile")  # in the dev extras
    commands = dockerfile.parse_file(os.path.join(ROOT, "Dockerfile"))
    assert [c.cmd.upper() for c in commands] == [word for word, _ in _instructions()]


def test_structure_and_shell_syntax():
    instructions = _instructions()
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "CMD", "LABEL", "USER", "EXPOSE", "ENTRYPOINT"}
    assert {w for w, _ in instructions} <= known
    first = next(w for w, _ in instructions if w != "ARG")
    assert first == "FROM", "only ARGs may come before FROM"
    for word, text in instructions:
        if word == "RUN":
            check = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
            assert check.returncode == 0, f"RUN is not valid shell: {text[:120]}: {check.stderr}"
    cmd = [text for w, text in instructions if w == "CMD"]
    assert len(cmd) == 1 and cmd[0].startswith("["), "one CMD, exec form"
    import json

    argv = json.loads(cmd[0])
    assert argv[:2] == ["bash", "-c"]
    check = subprocess.run(["bash", "-n", "-c", argv[2]], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_installs_the_extras_its_gpu_tests_need():
    runs = " ".join(text for w, text in _instructions() if w == "RUN")
    extras = re.search(r'pip install[^&]*-e "\.\[([a-z,]+)\]"', runs)
    assert extras, "hecate is installed with its extras"
    assert {"dev", "deepspeed", "megatron"} <= set(extras.group(1).split(","))


def test_files_it_runs_are_in_the_build_context():
    cmd = next(text for w, text in _instructions() if w == "CMD")
    named = set(re.findall(r"(?:tools|tests)/[\w/]+\.(?:sh|py)", cmd))
    assert {"tools/gpu_check.sh", "tests/gpu/nccl_smoke.py", "tests/gpu/fssdp_equivalence.py"} <= named
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = [p.strip().rstrip("/") for p in f if p.strip() and not p.startswith("#")]
    for path in named:
        assert os.path.exists(os.path.join(ROOT, path)), path
        assert not any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in ignored), path
    # the environment and build outputs stay out of the context
    assert {".venv", "build", ".git"} <= set(ignored)


def test_arch_list_matches_setup_py():
    env = {}
    for word, text in _instructions():
        if word == "ARG" and "=" in text:
            k, v = text.split("=", 1)
            env[k] = v.strip('"')
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    default = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "DEFAULT_CUDA_ARCHS")
    assert env["HECATE_CUDA_ARCHS"] == default
    assert env["TORCH_CUDA_ARCH_LIST"].replace("+PTX", "").replace(".", "") == default
