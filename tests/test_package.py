import lightning_saver
from lightning_saver import errors


def test_public_api_is_explicit():
    assert "Saver" in lightning_saver.__all__
    assert set(dir(lightning_saver)) == set(lightning_saver.__all__)


def test_errors_subclass_builtins():
    assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(errors.CorruptCheckpointError, ValueError)
    assert issubclass(errors.DiskFullError, OSError)
    assert issubclass(errors.UnsupportedOpError, NotImplementedError)
