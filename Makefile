# The two commands: `make run` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test bench install lint clean catalogs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m devenv run

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench

# The report texts (jobs/locale): extract them from the code, merge them into every language's .po, compile.
# Edit the .po files between `make catalogs` runs; commit the .pot, .po and .mo files together.
LOCALE := jobs/locale
catalogs: $(STAMP)
	$(BIN)/pybabel extract -F babel.cfg -k N_ --no-wrap --sort-by-file --project b24-cancel \
		--copyright-holder "b24-cancel" -o $(LOCALE)/messages.pot .
	$(BIN)/pybabel update -i $(LOCALE)/messages.pot -d $(LOCALE) --no-wrap --ignore-obsolete
	$(BIN)/pybabel compile -d $(LOCALE) --statistics

clean:
	rm -rf $(VENV) var
