"""Each training script works as a user gets it: copied alone into an empty folder (as into
diffusers/examples/<folder>/), run without this repository on the import path; and its errors and warnings name flags
and settings, never a file of this repository, which such a user does not have."""

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import tiny
from helpers import ROOT, cli


# Each script with the fixture of its tiny pipeline, the pipeline class it saves and the flags its full run needs.
FULL_FLOW_RUN = ("--no-use_lora", "--max_sequence_length", str(tiny.T5_MAX_TOKENS))
SCRIPTS = {
    "train_diffusion_rpo.py": ("sd_pipeline_path", "StableDiffusionPipeline", ()),
    "train_diffusion_rpo_sdxl.py": ("sdxl_pipeline_path", "StableDiffusionXLPipeline", ()),
    "train_diffusion_rpo_sd3.py": ("sd3_pipeline_path", "StableDiffusion3Pipeline", FULL_FLOW_RUN),
    "train_diffusion_rpo_flux.py": ("flux_pipeline_path", "FluxPipeline", FULL_FLOW_RUN),
}
REPOSITORY_PATHS = ("configs/", "docs/", "tests/", "benchmarks/")


def copy_alone(script, tmp_path):
    """A folder holding only `script`, outside the repository."""
    folder = tmp_path / "examples" / "research_projects_rpo"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, script), folder)
    return folder


def run_outside_the_repository(command, folder, timeout):
    """`command` with cwd `folder` and the repository left off PYTHONPATH, after checking that the interpreter's
    import path then holds no folder of the repository (so an import of a repository module fails)."""
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in python_path if not in_repository(p, folder))}
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; print('\\n'.join(sys.path))"],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
        check=True,
    )
    assert not [p for p in probe.stdout.splitlines() if in_repository(p, folder)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=folder, env=env)


def in_repository(path, cwd):
    """Whether `path` is a folder of the repository; the interpreter's own environment (`make` puts a .venv in the
    clone) holds installed packages only, so it does not count."""
    path = os.path.realpath(os.path.join(cwd, path))
    return is_within(path, os.path.realpath(ROOT)) and not is_within(path, os.path.realpath(sys.prefix))


def is_within(path, folder):
    return path == folder or path.startswith(folder + os.sep)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_script_copied_alone_lists_its_flags(script, tmp_path, capsys):
    folder = copy_alone(script, tmp_path)
    result = run_outside_the_repository([sys.executable, script, "--help"], folder, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(SystemExit):
        importlib.import_module(script.removesuffix(".py")).parse_args(["--help"])
    in_the_repository = set(re.findall(r"--\w+", capsys.readouterr().out))
    assert len(in_the_repository) > 50
    assert {"--pretrained_model_name_or_path", "--dataset_name", "--loss_type", "--output_dir"} <= in_the_repository
    assert set(re.findall(r"--\w+", result.stdout)) == in_the_repository


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_script_copied_alone_trains_and_saves_a_pipeline_that_loads(
    script, pickapic_path, clip_model_path, tmp_path, request
):
    import diffusers

    pipeline_fixture, pipeline_class, extra = SCRIPTS[script]
    folder = copy_alone(script, tmp_path)
    out = folder / "out"
    flags = cli(request.getfixturevalue(pipeline_fixture), pickapic_path, clip_model_path, out, *extra)
    result = run_outside_the_repository([sys.executable, script, *flags], folder, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pipeline = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipeline) is getattr(diffusers, pipeline_class)
    assert (out / "README.md").exists() and (out / "validation_grid.png").exists()
    assert sorted(os.listdir(folder)) == sorted([script, "out"])  # nothing written beside the script


def message_call(node):
    """The call whose arguments make a user-facing message: `raise X(...)`, `<...>logger.warning(...)`,
    `parser.error(...)` or `warnings.warn(...)`; None for any other node."""
    if isinstance(node, ast.Raise):
        return node.exc if isinstance(node.exc, ast.Call) else None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    receiver = node.func.value
    name = receiver.id if isinstance(receiver, ast.Name) else getattr(receiver, "attr", "")
    method = node.func.attr
    is_warning = name.endswith("logger") and method == "warning"
    return node if is_warning or (name, method) in (("parser", "error"), ("warnings", "warn")) else None


def message_literals(source):
    """(line, text) of every string constant in `source` that can reach a message call's arguments: inside the call,
    in the enclosing function's assignments and for-loops that bind a name the message uses (followed transitively),
    and in the module-level constants any of those name (e.g. a table of refusal reasons)."""
    tree = ast.parse(source)
    module_constants = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        module_constants[name.id] = node.value
    literals = set()
    scopes = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for scope in [tree, *scopes]:
        bindings = []  # (names bound, the expression they come from) in this scope
        for node in ast.walk(scope):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bindings.append(({n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}, node.value))
            elif isinstance(node, (ast.For, ast.comprehension)):
                bindings.append(({n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}, node.iter))
        for node in ast.walk(scope):
            call = message_call(node)
            if call is None:
                continue
            sources, seen = [call], set()
            while sources:
                source = sources.pop()
                for part in ast.walk(source):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        literals.add((part.lineno, part.value))
                    elif isinstance(part, ast.Name) and part.id not in seen:
                        seen.add(part.id)
                        sources += [value for names, value in bindings if part.id in names]
                        if part.id in module_constants:
                            sources.append(module_constants[part.id])
    return sorted(literals)


def test_message_literals_follow_names_to_their_strings():
    source = (
        "REASONS = {'a': 'see docs/x.md'}\n"
        "def check(parser, args, logger):\n"
        "    for name, reason in REASONS.items():\n"
        "        parser.error(f'--{name}: {reason}')\n"
        "    hint = ' (configs/y.yaml)'\n"
        "    logger.warning('bad' + hint)\n"
        "    raise ValueError('tests/z')\n"
        "    logger.info('benchmarks/ is fine here')\n"
    )
    texts = {text for _, text in message_literals(source)}
    assert {"see docs/x.md", " (configs/y.yaml)", "tests/z", "bad"} <= texts
    assert "benchmarks/ is fine here" not in texts


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_messages_name_no_file_of_this_repository(script):
    with open(os.path.join(ROOT, script)) as f:
        literals = message_literals(f.read())
    assert len(literals) > 100  # the walk found the scripts' messages
    naming = [f"line {line}: {text!r}" for line, text in literals if any(path in text for path in REPOSITORY_PATHS)]
    assert not naming, "\n".join(naming)
