"""The method registry: discovery, selection by name, hyperparameter overrides."""

import pytest

from benchmarks.errors import UserError
from benchmarks.method import Method, available_methods, build_method, resolve_methods


def test_discovers_the_methods_package():
    methods = available_methods()
    assert {"full", "freeze"} <= set(methods)
    for name, cls in methods.items():
        assert issubclass(cls, Method) and cls.name == name and cls.paper


def test_all_means_every_registered_method():
    assert resolve_methods("all") == list(available_methods())


def test_subset_keeps_order():
    assert resolve_methods("freeze, full") == ["freeze", "full"]


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown method 'nope'; valid: all, .*full"):
        resolve_methods("full,nope")


def test_unknown_hyperparameter_is_refused():
    with pytest.raises(UserError, match="has no hyperparameter"):
        build_method("full", {"rank": 3})
