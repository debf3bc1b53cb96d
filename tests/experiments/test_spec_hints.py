"""A spec's keys put where it does not take them, as a researcher writes them in TOML: each error
ends with the line to write instead (spec_hints.py), not only that something is unknown."""

import pytest

from torchpeer.experiments import load_spec

GOOD = """\
[sweep]
base = "ptb-tiny"
tokens = [20000]
warmup_frac = 0.1

[base]
"data.tokenizer" = "byte"

[grid]
"train.lr" = [1e-3, 3e-3]
"""


@pytest.mark.parametrize(
    "old, new, message",
    [
        (  # the dotted key of a field without quotes: TOML reads it as the table train = {lr = [...]}
            '"train.lr" = [1e-3, 3e-3]',
            "train.lr = [1e-3, 3e-3]",
            "[grid] train.lr = [0.001, 0.003] has no quotes around its key, so TOML reads it as a table; "
            'quote the field: "train.lr" = [0.001, 0.003]',
        ),
        (
            '"data.tokenizer" = "byte"',
            'data.tokenizer = "byte"',
            '[base] data.tokenizer = "byte" has no quotes around its key, so TOML reads it as a table; '
            'quote the field: "data.tokenizer" = "byte"',
        ),
        (
            '[grid]\n"train.lr" = [1e-3, 3e-3]',
            "[variants.small]\nmodel.peer.top_k = 4",
            "[variants.small] model.peer.top_k = 4 has no quotes around its key, so TOML reads it as a table; "
            'quote the field: "model.peer.top_k" = 4',
        ),
        (  # a field axis written as a named axis
            '[grid]\n"train.lr" = [1e-3, 3e-3]',
            '[grid.size]\n"model.d_model" = [16, 32]',
            '[grid.size] "model.d_model" = [16, 32]: the options of a named axis are tables (e.g. s1 = { '
            '"model.d_model" = 16 }); a field and its list of values go in [grid] itself: "model.d_model" = [16, 32]',
        ),
        ("warmup_frac = 0.1", "warmup = 0.1", "unknown field(s) ['warmup'] in [sweep]; did you mean warmup_frac?"),
        (  # a config field in [sweep]: where it goes, as it is written there
            "warmup_frac = 0.1",
            "lr = 0.003",
            "unknown field(s) ['lr'] in [sweep]; config fields go in [base] (every run) or in a variant, as "
            '"train.lr" = 0.003',
        ),
        (  # a stopping field: plan.py sets it per run from budgets or tokens
            "warmup_frac = 0.1",
            "max_steps = 100",
            "unknown field(s) ['max_steps'] in [sweep]; a sweep sizes each run by [sweep] budgets = [...] "
            "(training FLOPs) or tokens = [...], or a variant's own",
        ),
        ("[grid]", "[grids]", "unknown table(s) ['grids']; a spec has [sweep], [base], [variants.NAME], [grid], "),
        ("[grid]", "[grids]", "; did you mean [grid]?"),
        (  # a run config's table: its fields go in [base]
            '[grid]\n"train.lr" = [1e-3, 3e-3]',
            "[train]\nlr = 3e-3",
            "unknown table(s) ['train']; a spec has [sweep], [base], [variants.NAME], [grid], [seeds]; [train] is "
            'a table of a run config: give its fields for every run in [base], as "train.lr" = 0.003',
        ),
        (  # a key above the first table header belongs to none
            "[sweep]\n",
            "tokens = [20000]\n[sweep]\n",
            "unknown table(s) ['tokens']; a spec has [sweep], [base], [variants.NAME], [grid], [seeds]; "
            "tokens = [20000] comes before every table header, so it is in none: move it under [sweep]",
        ),
    ],
)
def test_misplaced_keys_say_what_to_write(tmp_path, old, new, message):
    assert old in GOOD
    path = tmp_path / "mine.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ValueError) as e:
        load_spec(str(path))
    assert message in str(e.value)
    assert str(e.value).startswith(f"{path}: ")


def test_a_named_axis_called_like_a_config_section_still_works(tmp_path):
    """[grid.model] dense = {...}: an axis named like a config table, options quoted, is no unquoted key."""
    path = tmp_path / "mine.toml"
    path.write_text(GOOD + '[grid.model]\ndense = { "model.ffw" = "dense" }\npeer = { "model.ffw" = "peer" }\n')
    assert [v.name for v in load_spec(str(path)).variants] == [
        "lr=0.001-dense",
        "lr=0.001-peer",
        "lr=0.003-dense",
        "lr=0.003-peer",
    ]


@pytest.mark.parametrize(
    "old, new, where",
    [
        ('"data.tokenizer" = "byte"', '"data.tokenizer" = "byte"\n"train.max_steps" = 3', "[base]"),
        ('[grid]\n"train.lr" = [1e-3, 3e-3]', '[variants.short]\n"train.max_tokens" = 5000', "[variants.short]"),
        ('"train.lr" = [1e-3, 3e-3]', '"train.max_flops" = [1e9, 2e9]', "[grid]"),
    ],
)
def test_a_runs_length_given_as_a_config_field_is_refused_not_dropped(tmp_path, old, new, where):
    """plan.py sets train.max_steps / max_tokens / max_flops per run from the budgets or tokens, so a
    spec's own value was silently replaced ("train.max_steps" = 3 in [base] trained 100 steps)."""
    path = tmp_path / "mine.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ValueError) as e:
        load_spec(str(path))
    field = new.split("\n")[-1].split(" = ")[0]
    assert f"{path}: {where} {field} = " in str(e.value)
    assert str(e.value).endswith(
        "would be ignored: a sweep sizes each run by [sweep] budgets = [...] (training FLOPs) or tokens = [...], "
        "or a variant's own"
    )
