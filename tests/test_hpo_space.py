"""hpo.space: the declared space, narrowing (CLI strings and YAML), grids."""
import pytest

pytest.importorskip("optuna")

from dgl_crystalframer.hpo import space as S  # noqa: E402


def test_declared_space_covers_the_issue():
    assert set(S.SPACE["frame"].values) == {"none", "max", "weighted_pca", "static_local", "pca", "lattice"}
    assert (S.SPACE["num_layers"].low, S.SPACE["num_layers"].high) == (1, 8)
    assert set(S.SPACE["num_angle_basis"].values) >= {16, 32, 64}
    assert isinstance(S.SPACE["lr"], S.LogRange)
    assert "batch_size" in S.SPACE
    assert set(S.CLI_FLAGS.values()) <= set(S.SPACE) | set(S.OPTIONAL)


def test_narrow_from_cli_strings():
    sp = S.narrow(S.SPACE, {"frame": "max,none", "num_layers": "2..4", "num_angle_basis": "16,64",
                            "lr": "2e-4..1e-3", "batch_size": "64"})
    assert sp["frame"] == S.Choice(("none", "max"))  # declared order, whatever the order given
    assert sp["num_layers"] == S.IntRange(2, 4)
    assert sp["num_angle_basis"] == S.Choice((16, 64))
    assert sp["lr"].low == pytest.approx(2e-4) and sp["lr"].high == pytest.approx(1e-3)
    assert sp["batch_size"] == S.Choice((64,))
    assert S.SPACE["num_layers"] == S.IntRange(1, 8)  # the declaration itself is untouched


def test_narrow_yaml_forms(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("frame: [max]\nnum_layers: {low: 3, high: 3}\nlr: 5.0e-4\n"
                 "num_angle_basis: [16, 32]\nfixed:\n  epochs: 7\n")
    specs, fixed = S.load_space_file(str(f))
    assert fixed == {"epochs": 7}
    sp = S.narrow(S.SPACE, specs)
    assert sp["frame"].values == ("max",)
    assert sp["num_layers"] == S.IntRange(3, 3)
    assert sp["lr"].low == sp["lr"].high == pytest.approx(5e-4)
    assert isinstance(sp["lr"], S.LogRange)  # same distribution kind as the declaration


def test_layer_list_becomes_a_choice():
    sp = S.narrow(S.SPACE, {"num_layers": [2, 4, 8]})
    assert sp["num_layers"] == S.Choice((2, 4, 8))


@pytest.mark.parametrize("specs", [
    {"frame": "max,bogus"},
    {"num_layers": "0..4"},
    {"num_layers": "5..3"},
    {"num_angle_basis": "48"},
    {"lr": "1e-5..1e-3"},
    {"lr": "1e-4,2e-4"},
    {"unknown_param": "1"},
    {"frame": "1..2"},
])
def test_narrowing_outside_the_space_is_an_error(specs):
    with pytest.raises(S.SpaceError):
        S.narrow(S.SPACE, specs)


def test_grid_is_finite_and_follows_narrowing():
    sp = S.narrow(S.SPACE, {"frame": "max,none", "num_layers": "2..4", "num_angle_basis": "64",
                            "batch_size": "64"})
    g = S.grid(sp)
    assert g["frame"] == ["none", "max"]
    assert g["num_layers"] == [2, 3, 4]
    assert len(g["lr"]) == 3 and g["lr"][0] == S.SPACE["lr"].low and g["lr"][-1] == S.SPACE["lr"].high
    assert S.grid_size(sp) == 2 * 3 * 1 * 3 * 1
    fixed_lr = S.narrow(sp, {"lr": "5e-4"})
    assert S.grid(fixed_lr)["lr"] == [pytest.approx(5e-4)]
    assert S.grid_size(S.SPACE) == 6 * 8 * 3 * 3 * 4


def test_suggest_uses_every_parameter():
    import optuna

    study = optuna.create_study()
    trial = study.ask()
    params = S.suggest(trial, S.SPACE)
    assert set(params) == set(S.SPACE)
    assert params["frame"] in S.FRAMES and 1 <= params["num_layers"] <= 8


def test_model_presets_replace_frame_and_angle_basis_when_searched():
    from dgl_crystalframer.config import MODEL_PRESETS

    assert S.build_space({}) == S.SPACE  # not searched unless asked for
    sp = S.build_space({"model_preset": "crystalformer,lightweight", "num_layers": "4"})
    assert sp["model_preset"] == S.Choice(("crystalformer", "lightweight"))
    assert "frame" not in sp and "num_angle_basis" not in sp and sp["num_layers"] == S.IntRange(4, 4)
    assert S.build_space({"model_preset": "lightweight"})["model_preset"].values == ("lightweight",)
    assert set(S.OPTIONAL["model_preset"][0].values) == set(MODEL_PRESETS)
    with pytest.raises(S.SpaceError, match="model_preset fixes frame"):
        S.build_space({"model_preset": "default", "frame": "none"})
    with pytest.raises(S.SpaceError, match="bogus"):
        S.build_space({"model_preset": "bogus"})


def test_fine_tuning_sweeps_leave_the_architecture_to_the_checkpoint():
    sp = S.build_space({"lr": "1e-4..1e-3"}, fine_tuning=True)
    assert set(sp) == {"lr", "batch_size"}
    for arch in ({"frame": "max"}, {"num_layers": "2..4"}, {"model_preset": "lightweight"}):
        with pytest.raises(S.SpaceError, match="checkpoint fixes the architecture"):
            S.build_space(arch, fine_tuning=True)
