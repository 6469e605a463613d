# The two commands a new user needs (each sets up .venv on first use):
#   make demo   the main job: the whole system on the real sample frames in tests/data/frames
#   make test   contracts lint + stub drift check + the test suite
.PHONY: setup demo test protos lint

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test:
	bash scripts/test.sh

protos: setup
	bash scripts/gen_protos.sh

lint: setup
	node_modules/.bin/buf lint
