"""Logging: one variable (RATEL_LOG) sets the level of every ``ratel.*`` logger; reconfiguring never stacks."""
import logging

import pytest

from ratel.tools import log as ratel_log


@pytest.fixture
def clean_logger():
    logger = logging.getLogger("ratel")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_the_variable_sets_the_level_of_every_ratel_logger(monkeypatch, clean_logger, capsys):
    monkeypatch.setenv("RATEL_LOG", "debug")
    ratel_log.configure()
    assert clean_logger.level == logging.DEBUG
    logging.getLogger("ratel.passes").debug("pass %02d %s", 3, "outline_units")
    err = capsys.readouterr().err
    assert "ratel.passes: pass 03 outline_units" in err and "DEBUG" in err

    monkeypatch.setenv("RATEL_LOG", "WARNING")
    ratel_log.configure()
    logging.getLogger("ratel.runtime").info("not shown")
    assert capsys.readouterr().err == ""


def test_reconfiguring_replaces_its_handler(clean_logger):
    ratel_log.configure("info")
    ratel_log.configure("debug")
    ours = [h for h in clean_logger.handlers if isinstance(h, ratel_log._RatelHandler)]
    assert len(ours) == 1 and clean_logger.level == logging.DEBUG


def test_unset_leaves_logging_to_the_application(monkeypatch, clean_logger):
    monkeypatch.delenv("RATEL_LOG", raising=False)
    before = (clean_logger.level, list(clean_logger.handlers))
    ratel_log.configure()
    assert (clean_logger.level, list(clean_logger.handlers)) == before


def test_a_bad_value_warns_and_keeps_going(monkeypatch, clean_logger):
    monkeypatch.setenv("RATEL_LOG", "loud")
    with pytest.warns(UserWarning, match="RATEL_LOG='loud'"):
        ratel_log.configure()
    assert ratel_log.parse_level("Info") == logging.INFO and ratel_log.parse_level("15") == 15
