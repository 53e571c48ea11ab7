import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_saver.saving.names import Series, checkpoint_path, parse_temp_name, series_of, temp_name


@pytest.mark.parametrize(
    "save_path, step, expected",
    [
        ("ckpts/variable_file", 95, "ckpts/variable_file_95.safetensors"),
        ("ckpts/variable_file", None, "ckpts/variable_file.safetensors"),
        ("ckpts/model.safetensors", 7, "ckpts/model_7.safetensors"),
        ("ckpts/model.st", 7, "ckpts/model_7.st"),
        ("ckpts/run.v2/model_3", 10, "ckpts/run.v2/model_3_10.safetensors"),
        ("variable_file", 0, "variable_file_0.safetensors"),
    ],
)
def test_checkpoint_path_examples(save_path, step, expected):
    assert checkpoint_path(save_path, step) == expected


def test_bad_steps_are_refused_with_the_value():
    with pytest.raises(ValueError, match="global_step must be >= 0, found -1"):
        checkpoint_path("d/m", -1)
    with pytest.raises(TypeError, match="global_step must be an int, found str 'x'"):
        checkpoint_path("d/m", "x")
    with pytest.raises(TypeError, match="whole number, found 1.5"):
        checkpoint_path("d/m", 1.5)


def test_directory_as_save_path_is_refused():
    with pytest.raises(ValueError, match="names a directory"):
        series_of("ckpts/")


def test_parse_rejects_other_files():
    s = Series("d", "model", ".safetensors")
    assert s.parse("model_12.safetensors") == 12
    for name in ["model.safetensors", "model_x.safetensors", "model_012.safetensors", "model_1.st",
                 "other_1.safetensors", "model__1.safetensors", "model_1.safetensors.tmp"]:
        assert s.parse(name) is None, name


def test_find_lists_only_the_series(tmp_path):
    for name in ["m_1.safetensors", "m_20.safetensors", "m.safetensors", "m_x.safetensors", "n_3.st"]:
        (tmp_path / name).write_bytes(b"")
    found = Series(str(tmp_path), "m", ".safetensors").find()
    assert found == {1: str(tmp_path / "m_1.safetensors"), 20: str(tmp_path / "m_20.safetensors")}


def test_temp_names_round_trip():
    name = temp_name("m_5.safetensors", "0123abcd")
    assert name.startswith(".m_5.safetensors.") and name.endswith(".tmp")
    assert parse_temp_name(name) == ("m_5.safetensors", os.getpid())
    assert parse_temp_name("m_5.safetensors") is None


prefixes = st.text(alphabet="abcxyz_.-0123456789", min_size=1, max_size=12).filter(
    lambda p: not p.startswith(".") and not p.endswith(".") and p not in (".", "..")
)


@settings(max_examples=200, deadline=None)
@given(prefix=prefixes, step=st.integers(min_value=0, max_value=10**12))
def test_build_then_parse_gives_back_the_step(prefix, step):
    path = checkpoint_path(os.path.join("d", prefix), step)
    series = series_of(os.path.join("d", prefix))
    assert os.path.dirname(path) == "d"
    assert series.parse(os.path.basename(path)) == step
    # the unsuffixed name of the same series is never mistaken for a step
    assert series.parse(series.name(None)) is None


@settings(max_examples=200, deadline=None)
@given(epoch=st.integers(min_value=0, max_value=10**6), loss=st.floats(allow_nan=False, width=32),
       step=st.integers(min_value=0, max_value=10**12))
def test_templated_names_are_one_series_whose_step_parses(epoch, loss, step):
    from lightning_saver.integration.saver import render_filename

    template = "epoch={epoch}-val_loss={val_loss:.2f}"
    rendered = render_filename("{epoch}-{val_loss:.2f}", {"epoch": epoch, "val_loss": loss})
    series = Series("d", template, ".safetensors")
    assert series.parse(f"{rendered}_{step}.safetensors") == step
    assert series.parse(f"{rendered}.safetensors") is None
    assert Series("d", "model", ".safetensors").parse(f"{rendered}_{step}.safetensors") is None
