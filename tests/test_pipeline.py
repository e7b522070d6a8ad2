"""What ``medsr upscale`` writes, on real scans: the input's storage type, CT no lower than air, and provenance."""

from __future__ import annotations

import hashlib
import json
import shlex

import nibabel as nib
import numpy as np
import pytest
import torch

import medsr
from medsr.cli import main
from medsr.infer import super_resolve
from medsr.io import read_volume, write_volume
from medsr.samples import sample_path


@pytest.fixture(scope="module")
def ct_int16(tmp_path_factory):
    """Slices 50-51 of the Cranium CT over its whole field of view at half resolution (128 x 128 x 2: the edge of
    the reconstruction circle, where the model undershoots), stored as scanners store HU: int16 HU + 1024 with
    scl_inter -1024."""
    ct = read_volume(sample_path("cranium_ct"))
    corner = np.eye(4)
    corner[2, 3] = 50
    image = nib.Nifti1Image(
        np.rint(ct.array[0, ::2, ::2, 50:52].numpy() + 1024).astype(np.int16),
        ct.affine @ corner @ np.diag([2.0, 2.0, 1.0, 1.0]),
    )
    image.set_data_dtype(np.int16)
    image.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(image, path)
    return path


@pytest.mark.kernels
def test_an_int16_ct_comes_back_int16_no_lower_than_air_and_says_what_made_it(ct_int16, tmp_path):
    """`medsr upscale` of the int16 CT: int16 with the same scaling, the float32 output (--dtype float32) rounded;
    nothing below air (without the floor 1 % of the voxels are), as in memory; descrip, cal_min/cal_max, and a
    sidecar whose weights hash is the file's. Stored as int16 the file is under half the float32 one."""
    argv = ["upscale", str(ct_int16), str(tmp_path / "sr.nii.gz"), "--precision", "fp32"]
    assert main(argv) == 0
    assert main([*argv[:2], str(tmp_path / "float.nii.gz"), *argv[3:], "--dtype", "float32"]) == 0
    stored, floats = nib.load(tmp_path / "sr.nii.gz"), nib.load(tmp_path / "float.nii.gz")
    assert stored.get_data_dtype() == np.int16 and (stored.dataobj.slope, stored.dataobj.inter) == (1, -1024)
    assert floats.get_data_dtype() == np.float32
    hu, values = stored.get_fdata(dtype=np.float32), floats.get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(hu, np.rint(values))
    assert values.min() == hu.min() == -1024.0

    model = medsr.load_model("edsr_ct_x2")
    unfloored = super_resolve(read_volume(ct_int16, modality="CT"), model.network, model_scale=(2, 2), precision="fp32")
    assert float((unfloored.array < -1024).float().mean()) > 0.01
    in_memory = medsr.upscale(read_volume(ct_int16), precision="fp32")
    torch.testing.assert_close(in_memory.array[0], torch.from_numpy(values), rtol=0, atol=0)

    assert stored.header["descrip"] == b"medsr SR x2x2x1 edsr_ct_x2"
    assert (float(stored.header["cal_min"]), float(stored.header["cal_max"])) == (-1024.0, 3071.0)
    weights = (model.path / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "sr.json").read_text()) == {
        "Description": "medsr SR x2x2x1 edsr_ct_x2",
        "MedsrVersion": medsr.__version__,
        "CommandLine": shlex.join(["medsr", *argv]),
        "Sources": [str(ct_int16.absolute())],
        "Modality": "CT",
        "Model": "edsr_ct_x2",
        "ModelWeightsSHA256": hashlib.sha256(weights).hexdigest(),
        "Factors": [2.0, 2.0, 1.0],
        "Precision": "fp32",
        "Device": "cpu",
        "KSpaceConsistency": False,
        "IntensityFloor": -1024.0,
    }
    assert (tmp_path / "sr.nii.gz").stat().st_size < 0.5 * (tmp_path / "float.nii.gz").stat().st_size


@pytest.mark.kernels
def test_a_uint8_mr_comes_back_uint8_streamed_as_in_memory(tmp_path):
    """A Colin27 block at the edge of the head (uint8): streamed with k-space consistency, the uint8 file is the
    in-memory result written with dtype='input', and the float32 output rounded and clipped to [0, 255] (the model
    undershoots below 0 next to the scalp)."""
    source = tmp_path / "t1.nii.gz"
    nib.save(nib.load(sample_path("colin27")).slicer[0:64, 80:144, 90:93], source)
    options = {"modality": "MR", "precision": "fp32"}
    plan = medsr.upscale_file(source, tmp_path / "sr.nii.gz", **options)
    medsr.upscale_file(source, tmp_path / "float.nii.gz", dtype="float32", **options)
    in_memory = medsr.upscale(read_volume(source, modality="MR"), plan.model, precision="fp32")
    write_volume(in_memory, tmp_path / "memory.nii.gz", dtype="input")

    stored, values = nib.load(tmp_path / "sr.nii.gz"), nib.load(tmp_path / "float.nii.gz").get_fdata(dtype=np.float32)
    assert stored.get_data_dtype() == np.uint8
    raw = np.asarray(stored.dataobj.get_unscaled())
    np.testing.assert_array_equal(raw, nib.load(tmp_path / "memory.nii.gz").dataobj.get_unscaled())
    np.testing.assert_array_equal(raw, np.clip(np.rint(values), 0, 255))
    assert values.min() < -0.5
    sidecar = json.loads((tmp_path / "sr.json").read_text())
    assert sidecar["KSpaceConsistency"] is True and sidecar["IntensityFloor"] is None and "CommandLine" not in sidecar
