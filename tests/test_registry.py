import pytest

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.graph.registry import OpTable


def test_register_and_lookup():
    table = OpTable("Test table")

    @table.register("A", "B")
    def conv(x):
        return x + 1

    assert table.lookup("A") is conv and table.lookup("B") is conv
    assert "A" in table and len(table) == 2


def test_duplicate_key_names_the_key():
    table = OpTable("Test table")
    table.register("A")(lambda x: x)
    with pytest.raises(KeyError, match="'A' is registered twice"):
        table.register("A")(lambda x: x)


def test_missing_key_names_key_and_place():
    table = OpTable("Test table")
    with pytest.raises(UnsupportedOpError, match="no converter for op 'Foo' at node n1"):
        table.lookup("Foo", where="at node n1")
