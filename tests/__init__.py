"""The tests: unit tests mirror clara/ (tests/model/ for clara/model/), end_to_end/ runs the launchers, the server
and several processes; helpers.py and conftest.py hold what several files need."""
