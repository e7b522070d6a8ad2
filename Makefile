# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install samples demo test lint figures models clean

# torch is installed first and pinned, so nothing pulls a CUDA build.
$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/installed

samples: install
	$(BIN)/medsr samples

demo: samples
	$(BIN)/medsr demo --out demo_output

# The README's degradation figures (HR | LR | difference), one per modality, from the sample scans.
FIGURES := docs/figures
figures: samples
	mkdir -p $(FIGURES)
	$(BIN)/medsr simulate "$$($(BIN)/medsr samples --path colin27)" /tmp/medsr_mr.nii.gz -f --modality MR \
		--factors 1,1,4 --slice-thickness 4 --noise rician --noise-sigma 3 --figure $(FIGURES)/degrade_mr.png
	$(BIN)/medsr simulate "$$($(BIN)/medsr samples --path ct_head_slice)" /tmp/medsr_ct.nii.gz -f \
		--factors 2,2,1 --psf-fwhm 1.2,1.2,0 --noise gaussian --noise-sigma 20 --figure $(FIGURES)/degrade_ct.png
	$(BIN)/medsr simulate "$$($(BIN)/medsr samples --path us_echo)" /tmp/medsr_us.nii.gz -f \
		--factors 2,2,1 --psf-fwhm 3.0,1.5,0 --noise speckle --figure $(FIGURES)/degrade_us.png
	$(BIN)/medsr simulate "$$($(BIN)/medsr samples --path xray_chest)" /tmp/medsr_xray.nii.gz -f \
		--factors 2,2,1 --psf-fwhm 0.5,0.5,0 --noise poisson --photons 2000 --figure $(FIGURES)/degrade_xray.png

# Score every shipped model on its held-out data next to the interpolation baselines, and again after 30 s of
# fine-tuning on each LR (--adapt): rewrites their cards, scores and docs/models.md; fails if one does not beat the
# best baseline (zero-fill, Lanczos-3, B-spline or cubic). About 20 minutes on 2 cores.
models: samples
	$(BIN)/medsr models --evaluate --adapt 30 --precision fp32 --table docs/models.md

lint: install
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

# The tests marked `kernels` (exact resume, streamed = in-memory, bf16) run again as on an AVX2-only CPU (oneDNN
# and ATen limited to AVX2, so no bf16 instructions): a machine with AVX-512 or AMX cannot hide a difference.
test: samples lint
	$(BIN)/python -m pytest -q
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q -m kernels

clean:
	rm -rf $(VENV) demo_output .pytest_cache
