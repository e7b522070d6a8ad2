"""The public API (``import medsr``) and the CLI as its client: same voxels, same warnings, no private imports."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import medsr
from medsr.cli import main
from medsr.io import atomic_output, check_output, temporary_path

SRC = Path(medsr.__file__).parent


def test_the_public_names_are_there_and_documented():
    assert medsr.__version__ and set(medsr.__all__) <= set(dir(medsr))
    for name in medsr.__all__:
        if name != "__version__":
            assert getattr(medsr, name).__doc__, name
    kinds = {entry.kind for entry in medsr.list_models()}
    assert kinds == {"shipped", "architecture"}


def test_python_api_equals_the_cli_voxels_affine_and_warnings(tmp_path, capsys):
    """medsr.upscale of a volume read with medsr.read_volume = `medsr upscale P Q --scale 2,2,1`, warnings included:
    a NIfTI names no modality (MR model, with a warning), and 0.9 mm pixels along i are finer than the model's."""
    rng = np.random.default_rng(0)
    array = torch.from_numpy(rng.random((1, 40, 36, 3), dtype=np.float32)) * 300
    source = tmp_path / "scan.nii.gz"
    medsr.write_volume(medsr.Volume(array, np.diag([0.9, 2.8, 3.0, 1.0])), source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        medsr.write_volume(medsr.upscale(medsr.read_volume(source), scale=(2, 2, 1)), tmp_path / "api.nii.gz")
    api_warnings = [str(w.message) for w in caught if issubclass(w.category, medsr.MedsrWarning)]
    assert any("names no modality" in m for m in api_warnings) and any("spacing along i" in m for m in api_warnings)

    assert main(["upscale", str(source), str(tmp_path / "cli.nii.gz"), "--scale", "2,2,1"]) == 0
    err = capsys.readouterr().err.replace(str(source), "scan")  # the API names an in-memory volume 'scan'
    cli_warnings = [line.removeprefix("medsr: warning: ") for line in err.splitlines() if "warning" in line]
    assert cli_warnings == api_warnings
    api, cli = (medsr.read_volume(tmp_path / name) for name in ("api.nii.gz", "cli.nii.gz"))
    torch.testing.assert_close(api.array, cli.array, rtol=0, atol=0)
    np.testing.assert_array_equal(api.affine, cli.affine)


def test_python_m_medsr_and_version():
    run = [sys.executable, "-m", "medsr", "--version"]
    done = subprocess.run(run, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"medsr {medsr.__version__}"
    assert "upscale" in subprocess.run([*run[:3], "--help"], capture_output=True, text=True, check=True).stdout


def test_usage_errors_are_one_line_naming_the_option(capsys):
    assert _exit_code(["upscale", "a.nii", "b.nii", "--scale", "inf,2,1"]) == 2
    assert _exit_code(["upscale", "a.nii", "b.nii", "--overlap", "-3"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "--scale" in errors[0] and "--overlap" in errors[1]


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code


def test_no_module_imports_the_cli_and_the_cli_imports_no_private_name():
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [
            (node.module, alias.name)
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        ]
        if path.name not in ("cli.py", "__main__.py"):
            assert not any(module == "medsr.cli" for module, _ in imported), path
            assert "import medsr.cli" not in path.read_text(), path
        if path.name == "cli.py":
            assert not [name for _, name in imported if name.startswith("_")]
            assert not [
                node.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "medsr"
                and node.attr.startswith("_")
                and node.attr != "__version__"
            ]


def test_the_atomic_writer_never_writes_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "table.md"
    for guess in (f".tmp.{target.name}", f".{os.getpid()}.x.medsr-tmp.{target.name}"):
        (tmp_path / guess).symlink_to(victim)
    with atomic_output(target) as tmp:
        assert not tmp.is_symlink()
        tmp.write_text("new")
    assert victim.read_text() == "precious" and target.read_text() == "new"
    target.unlink()
    target.symlink_to(victim)  # a symlink at the target itself is replaced, not followed
    with atomic_output(target) as tmp:
        tmp.write_text("newer")
    assert victim.read_text() == "precious" and not target.is_symlink() and target.read_text() == "newer"


def test_the_atomic_writer_cleans_up_on_any_exception_and_after_a_killed_process(tmp_path):
    target = tmp_path / "sr.nii.gz"
    for error in (ValueError, KeyboardInterrupt):
        with pytest.raises(error), atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".{dead.pid}.abc{medsr.io.TEMP_MARK}{target.name}"
    stale.write_bytes(b"debris of kill -9")
    alive = tmp_path / f".{os.getpid()}.abc{medsr.io.TEMP_MARK}{target.name}"
    alive.write_bytes(b"another writer, still running")
    with temporary_path(target):
        pass
    assert not stale.exists() and alive.exists()


def test_sigterm_during_a_write_leaves_nothing_at_or_beside_the_target(tmp_path):
    script = (
        "import sys, time; from medsr.io import atomic_output, exit_on_sigterm; exit_on_sigterm()\n"
        f"with atomic_output({str(tmp_path / 'out.nii.gz')!r}) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.iterdir())) == 1  # the temporary file
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_the_cli_is_terminated_cleanly_during_an_upscale(tmp_path):
    """`kill -TERM` of a real `medsr upscale` while it works: no output, no temporary file."""
    volume = medsr.Volume(torch.rand(1, 160, 160, 24) * 100, np.eye(4), medsr.Modality.MR)
    medsr.write_volume(volume, tmp_path / "lr.nii")
    (tmp_path / "out").mkdir()
    command = [sys.executable, "-m", "medsr", "upscale", str(tmp_path / "lr.nii"), str(tmp_path / "out" / "sr.nii")]
    process = subprocess.Popen([*command, "--precision", "fp32"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "out").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the temporary output exists
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    assert list((tmp_path / "out").iterdir()) == []


def test_check_output_refuses_inputs_and_existing_paths(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "old.nii").write_bytes(b"")
    with pytest.raises(ValueError, match="never overwrites its input"):
        check_output(tmp_path / "series" / "sr", [tmp_path / "series"])
    with pytest.raises(ValueError, match="exists; pass --force"):
        check_output(tmp_path / "old.nii", [tmp_path / "in.nii"])
    check_output(tmp_path / "old.nii", [tmp_path / "in.nii"], force=True)


def test_a_nifti_without_modality_gets_one_from_its_intensities(tmp_path, capsys):
    """A CT NIfTI in HU (a crop of the Cranium sample) gets the CT model, and says so; a NIfTI whose intensities are
    neither HU nor a magnitude image (z-scored) stops with one line asking for --modality, writing nothing."""
    from medsr.samples import sample_path

    ct = medsr.read_volume(sample_path("cranium_ct"))
    crop = ct.replace(array=ct.array[:, ::2, ::2, 50:52].contiguous())  # the whole field of view, air included
    source, target = tmp_path / "ct.nii.gz", tmp_path / "sr.nii.gz"
    medsr.write_volume(crop, source)
    assert main(["upscale", str(source), str(target)]) == 0
    err = capsys.readouterr().err
    assert "CT from its intensities" in err and "edsr_ct_x2" in err
    assert medsr.read_volume(target).spatial_shape == (256, 256, 2)

    scores = (crop.array - crop.array.mean()) / crop.array.std()
    medsr.write_volume(crop.replace(array=scores), tmp_path / "z.nii.gz")
    assert main(["upscale", str(tmp_path / "z.nii.gz"), str(tmp_path / "z_sr.nii.gz")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "names no modality" in lines[0] and "--modality" in lines[0]
    assert not (tmp_path / "z_sr.nii.gz").exists()
    with pytest.raises(ValueError, match="names no modality"):
        medsr.upscale(medsr.read_volume(tmp_path / "z.nii.gz"))


def test_device_cuda_runs_on_a_gpu_or_is_a_clear_error(tmp_path, capsys):
    """`--device cuda` upscales on the GPU where torch has one (same voxels as the CPU within bf16/TF32 tolerance);
    elsewhere it stops with one line saying there is no CUDA GPU, before writing anything."""
    scan = medsr.Volume(torch.rand(1, 40, 36, 2) * 300, np.diag([1.0, 1.0, 3.0, 1.0]), medsr.Modality.MR)
    source = tmp_path / "scan.nii.gz"
    medsr.write_volume(scan, source)
    args = ["upscale", str(source), str(tmp_path / "sr.nii.gz"), "--device", "cuda", "--precision", "fp32"]
    if not torch.cuda.is_available():
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "no CUDA GPU" in lines[0]
        assert not (tmp_path / "sr.nii.gz").exists() and not (tmp_path / "sr.json").exists()
        pytest.skip("no CUDA GPU here: checked the error; the GPU run needs a machine with one")
    assert main(args) == 0
    on_cpu = medsr.upscale(scan, precision="fp32", device="cpu")
    torch.testing.assert_close(medsr.read_volume(tmp_path / "sr.nii.gz").array, on_cpu.array, atol=1e-3 * 300, rtol=0)


def test_evaluate_on_a_device_this_machine_lacks_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the error case cannot be checked here")
    assert main(["evaluate", "--device", "cuda", "--slices", "120:122"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    result = medsr.evaluate("edsr_mr_x2", "colin27", (120, 122), precision="fp32", device="cpu")
    assert [row["method"] for row in result.comparison.rows][-1] == "edsr_mr_x2"
