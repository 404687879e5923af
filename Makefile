.PHONY: run test setup lint bench

# Set up .venv and start the app (127.0.0.1) on its built-in default.
run:
	bash scripts/setup.sh
	.venv/bin/python launch.py

# Set up .venv with the test tools and run every test.
test:
	bash scripts/setup.sh --test
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q --durations=8

lint:
	.venv/bin/ruff check .

bench:
	.venv/bin/python benchmarks/decode_speed.py
