"""The shared count check: any integer type, never a bool, the argument named in the error."""

from __future__ import annotations

import numpy as np
import pytest
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_influence.utils.arguments import check_count


def test_integers_of_any_type_pass_and_bools_floats_and_small_values_do_not():
    for value in (1, np.int64(3), np.int32(7)):
        check_count("`k`", value)
    check_count("`cache_bytes`", 0, minimum=0)
    for value, expected in ((True, "a positive integer, got True"), (2.5, "got 2.5"), (0, "got 0"), ("3", "got '3'")):
        with pytest.raises(ValueError, match=rf"`k` must be {'' if value is True else '.*'}{expected}"):
            check_count("`k`", value)
    with pytest.raises(ValueError, match=r"`cache_bytes` must be an integer >= 0, got -1"):
        check_count("`cache_bytes`", -1, minimum=0)
    with pytest.raises(MisconfigurationException, match=r"`every_n_steps` must be a positive integer"):
        check_count("`every_n_steps`", 0, error=MisconfigurationException)
