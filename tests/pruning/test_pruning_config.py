"""config_list parsing, selection and refusal of bad configs before the model is touched."""

import pytest
import torch
from pruning_models import build_bert, build_mlp

from sparsekernels.pruning import ConfigError, FPGMPruner, L1NormPruner, LevelPruner
from sparsekernels.pruning.config import parse_config_list, select_targets

DEFAULT = ("Linear", "Conv1D", "Conv2d")
SUPPORTED = ("Linear", "Conv1D", "Conv2d", "Embedding")


def targets(model, config_list):
    return select_targets(model, parse_config_list(config_list), DEFAULT, SUPPORTED)


def test_op_types_and_names_select():
    m = build_mlp()
    assert set(targets(m, [{"op_types": ["Linear"], "sparsity": 0.5}])) == {"fc1", "fc2", "fc3"}
    assert set(targets(m, [{"op_types": ["default"], "sparsity": 0.5}])) == {"fc1", "fc2", "fc3"}
    assert set(targets(m, [{"op_names": ["fc2"], "sparsity": 0.5}])) == {"fc2"}
    assert set(targets(m, [{"op_names_re": ["fc[12]"], "sparsity": 0.5}])) == {"fc1", "fc2"}
    assert set(targets(m, [{"op_partial_names": ["c3"], "sparsity": 0.5}])) == {"fc3"}
    assert set(targets(m, [{"sparsity": 0.5}])) == {"fc1", "fc2", "fc3"}


def test_exclusions_nni2_and_nni3():
    m = build_mlp()
    t = targets(m, [{"op_types": ["Linear"], "sparsity": 0.5},
                    {"op_names": ["fc3"], "exclude": True}])
    assert set(t) == {"fc1", "fc2"}
    t = targets(m, [{"op_types": ["Linear"], "exclude_op_names": ["fc1"], "sparsity": 0.5}])
    assert set(t) == {"fc2", "fc3"}
    t = targets(m, [{"op_types": ["Linear"], "exclude_op_names_re": ["fc[23]"], "sparsity": .5}])
    assert set(t) == {"fc1"}


def test_exclude_op_types():
    bert = build_bert()
    t = targets(bert, [{"op_partial_names": ["embeddings"], "exclude_op_types": ["Linear"],
                        "sparsity": 0.5}])
    assert set(t) == {"embeddings.word_embeddings", "embeddings.position_embeddings",
                      "embeddings.token_type_embeddings"}


def test_later_entry_wins_and_aliases():
    m = build_mlp()
    t = targets(m, [{"op_types": ["Linear"], "sparsity": 0.5},
                    {"op_names": ["fc2"], "sparsity_per_layer": 0.25, "granularity": "in_channel"}])
    assert t["fc1"].sparsity == 0.5 and t["fc2"].sparsity == 0.25
    assert t["fc2"].granularity == "in_channel" and t["fc2"].index == 1
    assert t["fc1"].granularity is None          # filled in by each pruner
    t = targets(m, [{"op_types": ["Linear"], "sparse_ratio": 0.3}])
    assert t["fc1"].sparsity == 0.3
    t = targets(m, [{"op_types": ["Linear"], "total_sparsity": 0.3,
                     "max_sparsity_per_layer": {"fc1": 0.2}}])
    assert t["fc1"].max_sparsity_for("fc1") == 0.2 and t["fc1"].max_sparsity_for("fc2") == 1.0


LIN = {"op_types": ["Linear"]}
BAD = [
    ({"op_types": ["Linear"], "sparsity": 0.5, "sparsityy": 1}, r"unknown key 'sparsityy'"),
    ({"op_types": ["Linear"], "sparsity": 1.0}, r"'sparsity' must lie in \[0, 1\)"),
    ({"op_types": ["Linear"], "sparsity": -0.1}, r"must lie in"),
    ({"op_types": ["Linear"], "sparsity": "0.5"}, r"must be a number"),
    ({"op_types": ["Linear"], "sparsity": 0.5, "sparsity_per_layer": 0.5}, r"set only one"),
    ({"op_types": ["Linear"], "sparsity": 0.5, "sparse_ratio": 0.5}, r"set only one"),
    ({"op_types": ["Linear"], "sparsity": 0.5, "total_sparsity": 0.5}, r"conflict"),
    ({**LIN, "sparsity": 0.5, "max_sparsity_per_layer": 0.5}, r"only applies with 'total_spars"),
    ({"op_types": ["Linear"]}, r"no amount"),
    ({"op_types": "Linear", "sparsity": 0.5}, r"must be a list of strings"),
    ({**LIN, "sparsity": 0.5, "granularity": "row"}, r"'granularity' must be one of"),
    ({"op_types": ["Linear"], "sparsity": 0.5, "granularity": "block"}, r"needs 'block_size'"),
    ({"op_types": ["Linear"], "sparsity": 0.5, "block_size": [2, 2]}, r"'block_size' only applies"),
    ({**LIN, "sparsity": 0.5, "granularity": "block", "block_size": [5, 2]}, r"does not tile"),
    ({"op_names": ["nothere"], "sparsity": 0.5}, r"matches no module"),
    ({"op_types": ["ReLU"], "sparsity": 0.5}, r"cannot prune"),
    ({"op_names": ["act"], "sparsity": 0.5}, r"selects 'act' of type ReLU"),
    ({"op_names_re": ["a.t"], "sparsity": 0.5}, r"cannot prune"),
    ({"total_sparsity": 0.5, "max_sparsity_per_layer": {"fc9": 0.5}}, r"names 'fc9'"),
    ({"total_sparsity": 0.5, "max_sparsity_per_layer": 1.5}, r"must lie in \[0, 1\]"),
    ({"op_types": ["Linear"], "sparsity": 0.5, "op_names_re": ["("]}, r"not a valid regex"),
    ({"op_types": ["Linear"], "exclude": True, "sparsity": 0.5}, r"only selects modules"),
    ({"op_types": ["Linear"], "sparsity": 0.5, "granularity": "head"}, r"not a Q/K/V/output"),
]


@pytest.mark.parametrize("entry,message", BAD, ids=[m for _, m in BAD])
def test_bad_entry_refused_and_model_unchanged(entry, message):
    m = build_mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match=r"config_list\[1\]: .*" + message):
        L1NormPruner(m, [{"op_types": ["Linear"], "sparsity": 0.1}, entry])
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(mod._forward_pre_hooks for mod in m.modules())


def test_error_names_the_offending_entry():
    with pytest.raises(ConfigError, match=r"config_list\[1\]"):
        LevelPruner(build_mlp(), [{"sparsity": 0.5}, {"op_names": ["fc9"], "sparsity": 0.5}])


def test_whole_list_errors():
    with pytest.raises(ConfigError, match="list of dicts"):
        LevelPruner(build_mlp(), {"sparsity": 0.5})
    with pytest.raises(ConfigError, match="empty"):
        LevelPruner(build_mlp(), [])
    with pytest.raises(ConfigError, match="only excludes"):
        LevelPruner(build_mlp(), [{"op_names": ["fc1"], "exclude": True}])


def test_pruner_refuses_granularity_it_cannot_score():
    with pytest.raises(ConfigError, match="FPGMPruner does not support granularity 'fine'"):
        FPGMPruner(build_mlp(), [{"op_types": ["Linear"], "sparsity": 0.5,
                                  "granularity": "fine"}])


def test_head_amounts_must_agree_across_projections():
    bert = build_bert()
    with pytest.raises(ConfigError, match="different amounts"):
        L1NormPruner(bert, [{"op_names_re": [r".*attention\.self\.(query|key|value)"],
                             "sparsity": 0.5, "granularity": "head"},
                            {"op_names_re": [r".*attention\.self\.query"],
                             "sparsity": 0.25, "granularity": "head"}])


def test_bad_mode_and_missing_dummy_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        L1NormPruner(build_mlp(), [{"sparsity": 0.5}], mode="balance")
    with pytest.raises(ValueError, match="needs dummy_input"):
        L1NormPruner(build_mlp(), [{"sparsity": 0.5}], mode="dependency_aware")


@pytest.mark.parametrize("pruner,expected", [(LevelPruner, "fine"), (L1NormPruner, "out_channel"),
                                             (FPGMPruner, "out_channel")])
def test_nni_default_granularity_per_pruner(pruner, expected):
    p = pruner(build_mlp(), [{"sparsity": 0.5}])
    assert {c.granularity for c in p._targets.values()} == {expected}
