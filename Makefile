.PHONY: install demo test test-all lint typecheck bench
install:
	bash scripts/install.sh
demo: install
	.venv/bin/climbrl demo
test: install
	.venv/bin/python -m pytest -m "not slow and not gpu"
test-all:
	.venv/bin/python -m pytest
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
	bash scripts/typing_root.sh && .venv/bin/pyright
typecheck:
	bash scripts/typing_root.sh && .venv/bin/pyright
bench:
	.venv/bin/python benchmarks/rollout_overhead.py
	.venv/bin/python benchmarks/weight_sync.py
