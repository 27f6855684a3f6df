"""env_vars.env_var: set for the block, then exactly as before (the engine's OMP_NUM_THREADS, the
Hub's HF_HUB_OFFLINE)."""

import os

import pytest

from mmpr_pipeline.env_vars import env_var


def test_a_variable_that_was_unset_is_unset_again(monkeypatch):
    monkeypatch.delenv("MMPR_TEST_VAR", raising=False)
    with env_var("MMPR_TEST_VAR", "2"):
        assert os.environ["MMPR_TEST_VAR"] == "2"
    assert "MMPR_TEST_VAR" not in os.environ


def test_a_variable_that_was_set_gets_its_value_back_even_after_an_error(monkeypatch):
    monkeypatch.setenv("MMPR_TEST_VAR", "1")
    with pytest.raises(RuntimeError), env_var("MMPR_TEST_VAR", "2"):
        assert os.environ["MMPR_TEST_VAR"] == "2"
        raise RuntimeError("inside")
    assert os.environ["MMPR_TEST_VAR"] == "1"
