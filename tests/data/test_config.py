"""DataConfig.validate: a malformed [data] table is one ValueError/TypeError that says what to fix."""

from __future__ import annotations

import pytest

from torchpeer.data import DataConfig


@pytest.mark.parametrize("valid", [{"": "ptb:test"}, {" ": "ptb:test", "ptb": "ptb:valid"}])
def test_an_eval_set_with_an_empty_name_is_refused(valid):
    """data.valid = {"" = ...} (or `--data.valid. SPEC`) made a split "valid/" with unnamed results."""
    with pytest.raises(ValueError, match=r"^data.valid has an eval set with an empty name .*name each, e.g. "):
        DataConfig(valid=valid)
    assert DataConfig(valid={"test": "ptb:test"}).valid == {"test": "ptb:test"}
